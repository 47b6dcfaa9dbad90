"""facegate.gallery: durable template store, FAISS search and the consistency monitor."""

from facegate.gallery.store import Candidate, Gallery, Identity, Template

__all__ = ["Candidate", "Gallery", "Identity", "Template"]
