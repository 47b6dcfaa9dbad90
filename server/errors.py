"""Every failure leaves the server as one JSON envelope: ``{"error": {"code", "message"}}``.

Core errors already carry ``code`` and ``status`` (``facegate.core.errors``); the few
server-only failures are subclasses here, and :func:`install_error_handlers` maps all
of them, FastAPI's validation errors and stray HTTP exceptions exactly once.
"""

from __future__ import annotations

from facegate.core.errors import FacegateError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class MissingAPIKey(FacegateError):
    code = "missing_api_key"
    status = 401


class WrongAPIKey(FacegateError):
    code = "forbidden"
    status = 403


class InsufficientScope(FacegateError):
    """A valid key without the scope the route needs (a verify key never writes)."""

    code = "insufficient_scope"
    status = 403


class TooManyRequests(FacegateError):
    """429 with ``Retry-After``: too many failed authentications (``auth_locked_out``) or
    a key over its request rate (``rate_limited``)."""

    status = 429

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.code = code
        self.headers = {"Retry-After": str(retry_after_s)}


class ThresholdOverrideForbidden(FacegateError):
    code = "threshold_override_forbidden"
    status = 403


class RequestTooLarge(FacegateError):
    code = "request_too_large"
    status = 413


class IdentityHasNoTemplates(FacegateError):
    """Every template of the identity was deleted: there is nothing to compare with (a
    similarity would be made up, and no decision can be right)."""

    code = "identity_has_no_templates"
    status = 409


class InvalidRequest(FacegateError):
    """A request that parsed but does not make sense (bad metadata JSON, missing image)."""

    code = "validation_error"
    status = 422


class UnsupportedBody(FacegateError):
    """The request body is neither multipart/form-data nor JSON."""

    code = "unsupported_media_type"
    status = 415


class TooManyImages(FacegateError):
    code = "too_many_images"
    status = 422


class NoUsableImage(FacegateError):
    code = "no_usable_image"
    status = 422


class NotReady(FacegateError):
    code = "not_ready"
    status = 503


_HTTP_CODES = {
    400: "bad_request",
    401: "missing_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "not_ready",
}


# Messages quote input (ids, file names, validation errors): a long input must not come
# back as a long error body.
MAX_MESSAGE_CHARS = 500


def truncate_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    return f"{message[: limit - 30]}... ({len(message) - limit + 30} more characters)"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": truncate_message(message)}}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from exceptions to the JSON envelope."""

    @app.exception_handler(FacegateError)
    async def _facegate(_: Request, exc: FacegateError) -> JSONResponse:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )
