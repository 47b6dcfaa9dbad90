"""``facegate gallery reembed``: move a gallery to a new model bundle without its photos.

A gallery's templates belong to the model that made them; a server with another
bundle answers 409 ``model_mismatch`` until they are replaced. This re-embeds the crops
the gallery kept (``FACEGATE_KEEP_CROPS=true``) with the bundle's embedder, flipped as
the server embeds (``FACEGATE_FLIP``, default on), when they are in the bundle's
geometry; templates without a usable crop (none kept, or kept in another geometry,
e.g. ArcFace 112 crops for a dlib-chip model) are listed with what to do: re-enrol
those identities from their photos, or start with a fresh gallery file.

SQLite: stop the server first (it holds the gallery's index in memory). PostgreSQL
(``--gallery postgresql://...``): run it once, from any one machine, while the replicas
serve; each batch reaches every replica's index through the change sequence.
Exit status: 0 when every template is now of the bundle's model (or already was);
1 when templates of another model remain or on an error. No torch import.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROG = "facegate gallery reembed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    reembed = actions.add_parser(
        "reembed", help="re-embed the kept crops with a bundle's model (run with the server stopped)"
    )
    reembed.add_argument(
        "--bundle", type=Path, default=None, help="the new model bundle (default FACEGATE_BUNDLE or models/default)"
    )
    reembed.add_argument(
        "--gallery", default=None,
        help="gallery SQLite file or postgresql:// URL (default FACEGATE_GALLERY or "
        "var/gallery.sqlite)",
    )
    reembed.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=None,
        help="embed crops plus their mirror images; must match the server (default FACEGATE_FLIP, true)",
    )
    reembed.add_argument(
        "--runtime", default=None,
        help="embedder runtime: auto|tensorrt|onnxruntime-cuda|onnxruntime-cpu (default FACEGATE_RUNTIME, auto)",
    )
    reembed.add_argument(
        "--dry-run", action="store_true", help="report what would be re-embedded; change nothing"
    )
    rotate = actions.add_parser(
        "rotate-key", help="re-wrap every identity's key under the first key of "
        "FACEGATE_MASTER_KEY_FILE (then delete the old key; the server may keep running)",
    )
    rotate.add_argument("--gallery", default=None, help="gallery SQLite file or postgresql:// URL")
    actions.add_parser("new-key", help="print a fresh base64 master key (keep it off the gallery's disk)")
    tree = actions.add_parser(
        "new-key-tree", help="write a fresh key tree (FACEGATE_KEY_TREE_FILE) for deletes "
        "that shred at once; copy it to every replica before the first start",
    )
    tree.add_argument("path", type=Path, help="where to write it (must not exist)")


def run(args: argparse.Namespace) -> int:
    if args.action != "reembed":
        from facegate.gallery.key_cli import run_key_action
        from facegate.server.settings import Settings

        if args.action == "new-key-tree":
            return run_key_action(args.action, None, args.path)
        gallery = getattr(args, "gallery", None)
        return run_key_action(args.action, Settings() if gallery is None else Settings(gallery=gallery))
    from facegate.core.bundle import load_bundle
    from facegate.core.errors import FacegateError
    from facegate.gallery.crypto import gallery_sealer
    from facegate.gallery.protocol import is_postgres_url, open_gallery
    from facegate.server.settings import Settings

    settings = Settings()  # the server's FACEGATE_* defaults: bundle, gallery, flip, runtime
    bundle_path = args.bundle or settings.bundle
    gallery_path = settings.gallery if args.gallery is None else Settings(gallery=args.gallery).gallery
    flip = settings.flip if args.flip is None else args.flip
    runtime = args.runtime or settings.runtime
    shown = re.sub(r"//[^/@]*@", "//", str(gallery_path))  # no credentials in the output
    if not is_postgres_url(gallery_path) and not Path(gallery_path).is_file():
        print(f"{PROG}: no gallery file at {gallery_path}", file=sys.stderr)
        return 1
    try:
        bundle = load_bundle(bundle_path)
        gallery = open_gallery(
            gallery_path,
            model_id=bundle.model_id,
            embedding_size=bundle.embedding_size,
            geometry=bundle.geometry,
            sealer=gallery_sealer(settings),
        )
    except (FacegateError, OSError, ValueError, RuntimeError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    with gallery:
        status = gallery.reembed_status()
        print(
            f"gallery {shown}: {status.stale} templates of {status.stale_identities} "
            f"identities are of another model than {bundle.model_id} ({bundle.geometry} crops)"
        )
        if not status.stale:
            print("nothing to do: every template is of this model")
            return 0
        if args.dry_run or not status.reembeddable:
            print(status.describe())
            if not status.reembeddable:
                print(f"{PROG}: nothing can be re-embedded", file=sys.stderr)
                return 1
            return 0 if not status.blocked else 1
        try:
            from facegate.core.embed import create_embedder

            embedder = create_embedder(bundle, runtime=runtime, flip=flip)
            report = gallery.reembed(embedder.embed)
        except (FacegateError, OSError, ValueError, RuntimeError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        print(report.describe())
        return 0 if not report.stale else 1
