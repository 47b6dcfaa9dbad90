"""The SQLite gallery file's schema and its in-place migrations (see gallery/store.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from facegate.core.align import ARCFACE_112
from facegate.gallery.opening import newer_schema
from facegate.gallery.records import geometry_key

SCHEMA_VERSION = 2  # 2: templates.crop_geometry

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    identity_id TEXT PRIMARY KEY,
    name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS templates (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    template_id TEXT NOT NULL UNIQUE,
    identity_id TEXT NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL,
    source TEXT,
    score REAL,
    crop BLOB,
    crop_geometry TEXT
);
CREATE INDEX IF NOT EXISTS templates_by_identity ON templates(identity_id);
CREATE INDEX IF NOT EXISTS templates_by_model ON templates(model_id);
CREATE TABLE IF NOT EXISTS decisions (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id TEXT NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
    similarity REAL NOT NULL,
    accepted INTEGER NOT NULL,
    route TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_identity ON decisions(identity_id, row_id);
"""


# A schema 1 crop's PNG header (IHDR width, height: bytes 16..23) when it is 112x112.
_PNG_112 = (112).to_bytes(4, "big") * 2


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring a file of an older schema up to SCHEMA_VERSION, inside the open transaction.

    1 -> 2: add ``templates.crop_geometry``. Schema 1 galleries predate bundle
    geometries: every crop they kept was an ArcFace-template 112x112 crop, so a kept
    112x112 PNG gets that geometry; any other kept crop stays NULL (unknown, never
    re-embedded). Runs under the write lock of BEGIN IMMEDIATE, so two processes
    opening one old file migrate it once.
    """
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if int(version) > SCHEMA_VERSION:  # checked at open too; here under the write lock
        raise newer_schema(str(path), int(version), SCHEMA_VERSION)
    columns = {row[1] for row in db.execute("PRAGMA table_info(templates)")}
    if "crop_geometry" not in columns:
        db.execute("ALTER TABLE templates ADD COLUMN crop_geometry TEXT")
        db.execute(
            "UPDATE templates SET crop_geometry = ? WHERE crop IS NOT NULL"
            " AND substr(crop, 17, 8) = ?",
            (geometry_key(ARCFACE_112), _PNG_112),
        )
    if int(version) < SCHEMA_VERSION:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )
