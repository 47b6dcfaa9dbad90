"""The PostgreSQL gallery's schema, as numbered migrations the server applies at start.

Every replica runs :func:`migrate` when it opens the gallery. The whole run holds a
transaction-scoped advisory lock, so when two replicas start at once one migrates and
the other waits, then finds nothing left to do; a migration and its bookkeeping row
commit together (PostgreSQL DDL is transactional), so a crash leaves the previous
version intact. A database migrated by a newer facegate is refused, not downgraded.
"""

from __future__ import annotations

import psycopg
from facegate.gallery.opening import check_postgres

# Advisory lock keys (any two constants; they only need to differ from each other).
MIGRATION_LOCK = 0x46470001
CHANGES_LOCK = 0x46470002
CHANNEL = "facegate_gallery"

# (version, what it does, SQL). Append only: a released migration never changes.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "identities, templates, decisions",
        """
        CREATE TABLE identities (
            identity_id text PRIMARY KEY,
            name text,
            metadata text NOT NULL DEFAULT '{}',
            created_at double precision NOT NULL
        );
        CREATE TABLE templates (
            row_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            template_id text NOT NULL UNIQUE,
            identity_id text NOT NULL REFERENCES identities ON DELETE CASCADE,
            model_id text NOT NULL,
            dim integer NOT NULL,
            embedding bytea NOT NULL,
            created_at double precision NOT NULL,
            source text,
            score double precision,
            crop bytea,
            crop_geometry text
        );
        CREATE INDEX templates_by_identity ON templates (identity_id);
        CREATE INDEX templates_by_model ON templates (model_id);
        CREATE TABLE decisions (
            row_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            identity_id text NOT NULL REFERENCES identities ON DELETE CASCADE,
            similarity double precision NOT NULL,
            accepted boolean NOT NULL,
            route text NOT NULL,
            created_at double precision NOT NULL
        );
        CREATE INDEX decisions_by_identity ON decisions (identity_id, row_id);
        """,
    ),
    (
        2,
        "change sequence the replicas follow",
        """
        CREATE TABLE changes (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            op text NOT NULL CHECK (op IN ('identity', 'unidentity', 'template', 'untemplate')),
            identity_id text NOT NULL,
            row_id bigint,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: psycopg.Connection) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied now."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS facegate_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = check_postgres(conn, SCHEMA_VERSION)  # foreign, damaged, newer: refused
        done = []
        for version, name, sql in MIGRATIONS:
            if version not in applied:
                conn.execute(sql)
                conn.execute(
                    "INSERT INTO facegate_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                done.append(version)
        return done
