"""Named API keys with scopes, stored hashed (``FACEGATE_KEYS_FILE``, ``facegate keys``).

A key is a random secret given once to its holder; the server keeps only its SHA-256
(the secret has 256 bits of entropy, so a slow hash would add nothing) with a name, its
scopes and an optional request rate. The audit trail records the name, never the secret.

Scopes: ``verify`` (verify, search, embed, read identities and the consistency report),
``enrol`` (create identities, add templates), ``admin`` (delete, the audit trail; admin
grants every scope) and ``metrics`` (``/metrics`` when ``FACEGATE_METRICS_REQUIRE_KEY``).
``FACEGATE_API_KEY`` is a key named ``api-key`` with ``FACEGATE_API_KEY_SCOPES`` (verify
only by default: one shared key no longer enrols and deletes), ``FACEGATE_ADMIN_KEY`` a
key named ``admin-key`` with every scope.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCOPES = ("verify", "enrol", "admin", "metrics")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    name: str
    scopes: tuple[str, ...]
    sha256: str = field(repr=False)
    rate_per_s: float | None = None  # requests per second this key may make (burst: 2 s worth)
    created_at: float = 0.0
    revoked_at: float | None = None

    def grants(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes)}")
    return tuple(dict.fromkeys(scopes))


class KeyFile:
    """The JSON file of named keys; written atomically, readable by its owner only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[KeyRecord]:
        if not self.path.is_file():
            return []
        rows = json.loads(self.path.read_text()).get("keys", [])
        return [KeyRecord(**{**row, "scopes": tuple(row["scopes"])}) for row in rows]

    def create(self, name: str, scopes: list[str], rate_per_s: float | None = None) -> str:
        """A new key's secret (shown once; only its hash is kept)."""
        records = self.records()
        if any(r.name == name and r.revoked_at is None for r in records):
            raise ValueError(f"a key named {name!r} exists; revoke it first")
        secret = f"fg_{secrets.token_urlsafe(32)}"
        records.append(KeyRecord(name, check_scopes(scopes), hash_secret(secret), rate_per_s, time.time()))
        self._write(records)
        return secret

    def revoke(self, name: str) -> None:
        records = self.records()
        live = [r for r in records if r.name == name and r.revoked_at is None]
        if not live:
            raise ValueError(f"no live key named {name!r}")
        now = time.time()
        self._write([
            KeyRecord(**{**asdict(r), "revoked_at": now}) if r in live else r for r in records
        ])

    def _write(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(r) for r in records]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class KeyRing:
    """Every key the server accepts: the key file's live keys plus the two legacy ones."""

    def __init__(
        self,
        keys_file: Path | None,
        api_key: str | None,
        admin_key: str | None,
        api_key_scopes: tuple[str, ...],
    ) -> None:
        self._file = KeyFile(keys_file) if keys_file else None
        self._legacy: dict[str, KeyRecord] = {}
        if api_key:
            self._legacy[hash_secret(api_key)] = KeyRecord("api-key", api_key_scopes, hash_secret(api_key))
        if admin_key:
            self._legacy[hash_secret(admin_key)] = KeyRecord("admin-key", SCOPES, hash_secret(admin_key))
        self.admin_key_set = admin_key is not None
        self.api_key_set = api_key is not None
        self._by_hash: dict[str, KeyRecord] = dict(self._legacy)
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._reload(force=True)

    @property
    def has_file(self) -> bool:
        return self._file is not None

    @property
    def configured(self) -> bool:
        """False on a server with no key at all: then every route is open (as before keys)."""
        self._reload()
        return bool(self._by_hash) or (self._file is not None and self._file.path.is_file())

    @property
    def open_scopes(self) -> tuple[str, ...]:
        """What a request without any key may do: everything without keys; with only
        ``FACEGATE_ADMIN_KEY`` (no client key, no key file), read and verify as before."""
        if not self.configured:
            return SCOPES
        if self.admin_key_set and not self.api_key_set and self._file is None:
            return ("verify", "metrics")
        return ()

    def lookup(self, secret: str) -> KeyRecord | None:
        self._reload()
        return self._by_hash.get(hash_secret(secret))

    def _reload(self, force: bool = False) -> None:
        """Re-read the key file when it changed (one stat per look-up: a created or revoked
        key counts from the next request, without a restart)."""
        if self._file is None:
            return
        try:
            st = self._file.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and not force:
            return
        with self._lock:
            live = {r.sha256: r for r in self._file.records() if r.revoked_at is None}
            self._by_hash = {**live, **self._legacy}
            self._stamp = stamp
