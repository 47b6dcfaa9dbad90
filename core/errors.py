"""Typed errors shared by every stage.

Each error carries a stable machine-readable ``code`` and the HTTP ``status`` the
server maps it to, so the mapping lives in one place (here) and the server turns
any ``FacegateError`` into ``{"error": {"code", "message"}}`` with that status.
"""

from __future__ import annotations


class FacegateError(Exception):
    """Base class: an error a caller can act on."""

    code = "facegate_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageDecodeError(FacegateError):
    code = "image_undecodable"
    status = 400


class ImageTooLarge(FacegateError):
    code = "image_too_large"
    status = 413


class UnsupportedImage(FacegateError):
    code = "unsupported_image_type"
    status = 415


class ImageDegenerate(FacegateError):
    """Geometry no face can be found in (a side too short, a strip), refused from the header."""

    code = "image_degenerate"
    status = 422


class WorkBudgetExceeded(FacegateError):
    """A photo's detection could not finish within the per-photo budget (the machine is
    too busy, or the photo too large for the budget): retry later or send a smaller photo."""

    code = "work_budget_exceeded"
    status = 503


class NoFaceError(FacegateError):
    code = "no_face"
    status = 422


class MultipleFacesError(FacegateError):
    code = "multiple_faces"
    status = 422


class BundleError(FacegateError):
    """A model bundle is missing, malformed, or its files do not match their sha256."""

    code = "bundle_invalid"
    status = 500


class UnknownIdentity(FacegateError):
    code = "unknown_identity"
    status = 404


class UnknownTemplate(FacegateError):
    code = "unknown_template"
    status = 404


class DuplicateIdentity(FacegateError):
    code = "duplicate_identity"
    status = 409


class ModelMismatch(FacegateError):
    """The gallery holds templates embedded by another model bundle."""

    code = "model_mismatch"
    status = 409
