"""``facegate gallery rotate-key``, ``new-key`` and ``new-key-tree`` (see gallery/crypto.py, key_tree.py).

Rotation: put a new key on the first line of ``FACEGATE_MASTER_KEY_FILE``, keep the old
one below it, run ``rotate-key`` (every identity's data key is re-wrapped under the new
key in one transaction; the sealed data is not rewritten), then delete the old line and
every copy of the old key. From then on, whatever a deleted identity left behind (a
SQLite WAL frame, a PostgreSQL dead tuple or WAL segment, a backup) is sealed under a
key that no longer exists. With a key tree (``new-key-tree``, FACEGATE_KEY_TREE_FILE)
that holds from each delete on, without waiting for a rotation (gallery/key_tree.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any


def run_key_action(action: str, settings: Any, path: Path | None = None) -> int:
    """``settings``: the server's (gallery, master key), read by gallery/cli.py; ``path``:
    where ``new-key-tree`` writes."""
    from facegate.gallery.crypto import SealError, gallery_sealer, new_master_key
    from facegate.gallery.key_tree import KeyTreeFile
    from facegate.gallery.protocol import is_postgres_url
    from facegate.gallery.sealed_rows import rotate

    if action == "new-key":
        print(new_master_key())
        return 0
    if action == "new-key-tree":
        try:
            KeyTreeFile.create(path)
        except OSError as e:
            print(f"facegate gallery new-key-tree: {e}", file=sys.stderr)
            return 1
        print(f"wrote a fresh key tree to {path}; set FACEGATE_KEY_TREE_FILE to it (each "
              "replica its own copy, made before the first start) beside the master key")
        return 0
    shown = re.sub(r"//[^/@]*@", "//", str(settings.gallery))
    try:
        sealer = gallery_sealer(settings)
        if is_postgres_url(settings.gallery):
            import psycopg

            with psycopg.connect(str(settings.gallery), autocommit=True) as conn, conn.transaction():
                done, current = rotate(conn, "%s", sealer)
        else:
            import sqlite3

            db = sqlite3.connect(settings.gallery, timeout=30.0, isolation_level=None)
            try:
                db.execute("PRAGMA secure_delete=ON")
                db.execute("BEGIN IMMEDIATE")
                done, current = rotate(db, "?", sealer)
                db.execute("COMMIT")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # no old wrapping left in the -wal
            finally:
                db.close()
    except (SealError, OSError, ValueError) as e:
        print(f"facegate gallery rotate-key: {e}", file=sys.stderr)
        return 1
    print(f"gallery {shown}: re-wrapped {done} identity keys under the first master key "
          f"({current} already were); now remove the old key from the key file")
    return 0
