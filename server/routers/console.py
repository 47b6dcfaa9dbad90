"""The operator console (/console): static pages in the package that call the public /v1
API from the browser with the operator's key. No build step, no CDN, nothing remote:
the files are served from ``facegate/server/console`` with a strict Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

from facegate.core.align import template_for
from facegate.core.dlib_chip import ARCFACE_IN_DLIB_FRAME
from facegate.server.deps import ServicesDep
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent.parent / "console"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Scripts, styles and fonts only from this server; photos are shown from blob: URLs.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["console"], include_in_schema=False)


@router.get("/console")
async def console_redirect() -> RedirectResponse:
    """Relative asset paths need the trailing slash."""
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/")
async def console_index() -> FileResponse:
    return _file("index.html")


@router.get("/console/geometry.json")
async def console_geometry(services: ServicesDep) -> dict:
    """Where the served model's alignment puts the five landmarks in its crop, so the page
    can draw the aligned crop from the landmarks any /v1 response carries."""
    geometry = services.bundle.geometry
    if geometry.method == "dlib_chip":
        padding = geometry.padding or 0.0
        points = (padding + ARCFACE_IN_DLIB_FRAME) / (2 * padding + 1) * geometry.size
    else:
        points = template_for(geometry.size)
    return {
        "method": geometry.method,
        "size": geometry.size,
        "points": [[round(float(x), 3), round(float(y), 3)] for x, y in points],
    }


@router.get("/console/{name}")
async def console_asset(name: str) -> FileResponse:
    return _file(name)


def _file(name: str) -> FileResponse:
    """A file of the console folder by plain name (no paths): anything else is 404."""
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(404, f"no console file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
