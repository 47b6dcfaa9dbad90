"""facegate.gallery: durable template store (SQLite or PostgreSQL), FAISS search and the
consistency monitor."""

from facegate.gallery.consistency import consistency_report
from facegate.gallery.protocol import GalleryStore, open_gallery
from facegate.gallery.store import Candidate, Gallery, Identity, Template

__all__ = [
    "Candidate", "Gallery", "GalleryStore", "Identity", "Template", "consistency_report",
    "open_gallery",
]
