"""``facegate serve``: run the HTTP server under uvicorn.

Command-line options override the ``FACEGATE_*`` environment; they are handed to the
app through that same environment, so one code path reads the settings. One process:
its FAISS index is built at open and lives in the process, so a second uvicorn worker
would never see the first one's enrolments. It scales with threads
(``FACEGATE_CPU_WORKERS``) and with replicas.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Exit status of a refused bundle: uvicorn's own for a failed start-up, which the lifespan
# (the same check) gives when the app is started another way.
STARTUP_REFUSED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default models/default)")
    parser.add_argument(
        "--gallery", default=None,
        help="gallery: SQLite file (default var/gallery.sqlite) or postgresql:// URL shared by replicas",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from facegate.core.errors import BundleError
    from facegate.gallery.opening import GalleryRefused, preflight
    from facegate.server.http import BoundedShutdownServer, h11_protocol
    from facegate.server.services import load_served_bundle
    from facegate.server.settings import Settings

    if args.bundle is not None:
        os.environ["FACEGATE_BUNDLE"] = str(args.bundle)
    if args.gallery is not None:
        os.environ["FACEGATE_GALLERY"] = str(args.gallery)
    settings = Settings()
    if not (settings.bundle / "manifest.json").is_file():
        print(
            f"facegate serve: no model bundle at {settings.bundle} (manifest.json missing).\n"
            "Pass --bundle PATH or set FACEGATE_BUNDLE; `make default-model` builds models/default.",
            file=sys.stderr,
        )
        return 2
    try:  # refuse a tampered, unsealed or untrusted bundle before uvicorn starts (docs/server.md)
        load_served_bundle(settings)
    except BundleError as err:
        print(f"facegate serve: refusing to start: {err.message}", file=sys.stderr)
        return STARTUP_REFUSED
    try:  # an empty, foreign, damaged, newer or unreachable gallery: its own exit status
        preflight(settings.gallery)
    except GalleryRefused as err:
        print(f"facegate serve: refusing to start: {err}", file=sys.stderr)
        return err.exit_code
    config = uvicorn.Config(
        "facegate.server.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        limit_concurrency=settings.max_connections,  # above it: 503 at once, not a pile-up
        # h11 explicitly: the header deadline (slowloris) lives in this subclass of its protocol
        http=h11_protocol(settings.header_timeout_s),
    )
    server = BoundedShutdownServer(config)
    server.run()
    return 0 if server.started else STARTUP_REFUSED  # uvicorn.run's status for a failed start
