"""facegate.gallery: durable template store, FAISS search and the consistency monitor."""

from facegate.gallery.consistency import consistency_report
from facegate.gallery.store import Candidate, Gallery, Identity, Template

__all__ = ["Candidate", "Gallery", "Identity", "Template", "consistency_report"]
