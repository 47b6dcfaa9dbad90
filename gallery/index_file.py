"""Trained IVF centroids kept beside the gallery, so a restart adds vectors without k-means.

At 1M templates k-means is most of an IVF build (docs/benchmarks.md), while its result,
the coarse centroids, is small (4096 x 128 floats, 2 MB, with 12 bytes a row for the lists
below) and serves any gallery of the
same model within a factor of 2 of the size it was trained at (`gallery.index.reusable`).
The file is a cache like the index: the database stays the truth, every vector is re-read
from it and re-added at open, so a file lost or refused costs one k-means, never a wrong
answer. It is rewritten (atomically, mode 0600) after every k-means.

Refused, with a warning, and then retrained and rewritten: another format, another
``model_id``, dimension or k-means (``IVF_TRAINING``), a damaged file (SHA-256 of header and centroids; sealed: the
AES-GCM tag), a sealed file whose master key is not configured, a plaintext file beside a
sealed gallery, centroids that are not finite.

Sealing: each centroid is the mean of some 250 people's templates, derived from biometric
data, so a sealed gallery (``FACEGATE_MASTER_KEY_FILE``) seals the file too, the way it
seals an identity's values: a fresh data key wrapped by the master key, the centroids
sealed with it under the header as associated data (a header edited or moved to another
model fails to open). Only public ``Sealer`` calls are used, under a pseudo identity id no
real id can take (ids are printable).

Format: ``FGIVF1\\n`` | header (one JSON line) | plaintext: SHA-256(header | payload) |
payload; sealed: wrapped-key length (2 bytes, big-endian) | wrapped key | sealed payload.
The payload, little-endian: the centroids (float32, row-major), then the row ids of the
last build (int64, ascending) and each one's list (int32): a restart adds those rows to
their lists without assigning them (as long as k-means' share at 1M). Row ids are never
reused (SQLite AUTOINCREMENT) and a re-embedding changes ``model_id``, so a row's list
stays its own; rows added since are assigned at open (the file is rewritten once a tenth
of them were).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from facegate.gallery.index import IVF_TRAINING, TrainedLists

log = logging.getLogger(__name__)

MAGIC = b"FGIVF1\n"
FORMAT = 1
FILE_ID = "\x00facegate-index-file"  # the pseudo identity the file's data key belongs to


class RefusedFile(ValueError):
    """A persisted index that must not be used (the reason is the message)."""


class IndexFile:
    """The trained centroids of one gallery's index at `path` (``<gallery>.ivf``)."""

    def __init__(self, path: str | Path, *, model_id: str, dim: int, sealer: object = None) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.dim = dim
        self.sealer = sealer if getattr(sealer, "sealing", False) else None

    def load(self) -> TrainedLists | None:
        """The persisted centroids, or None when there is no file or it is refused."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("index file %s unreadable (%s): retraining", self.path, e)
            return None
        try:
            return self.decode(data)
        except RefusedFile as e:
            log.warning("index file %s refused (%s): retraining", self.path, e)
            return None

    def save(self, lists: TrainedLists) -> None:
        """Write `lists` atomically; a failure is logged (the file is only a cache)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.encode(lists))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("index file %s not written (%s): the next open retrains", self.path, e)
            tmp.unlink(missing_ok=True)

    def encode(self, lists: TrainedLists) -> bytes:
        centroids = np.ascontiguousarray(lists.centroids, dtype="<f4")
        ids = np.empty(0, "<i8") if lists.ids is None else lists.ids.astype("<i8")
        rows = np.empty(0, "<i4") if lists.lists is None else lists.lists.astype("<i4")
        header = self._header(len(centroids), lists.size, len(ids))
        payload = centroids.tobytes() + ids.tobytes() + rows.tobytes()
        if self.sealer is None:
            return MAGIC + header + hashlib.sha256(header + payload).digest() + payload
        wrapped, key = self.sealer.new_key(FILE_ID)
        sealed = self.sealer.seal(FILE_ID, header.decode(), payload, key)
        return MAGIC + header + len(wrapped).to_bytes(2, "big") + wrapped + sealed

    def decode(self, data: bytes) -> TrainedLists:
        """The centroids in `data`; raises `RefusedFile` for anything not this gallery's."""
        if not data.startswith(MAGIC):
            raise RefusedFile("not a facegate index file")
        end = data.find(b"\n", len(MAGIC))
        if end < 0:
            raise RefusedFile("damaged header")
        header, body = data[len(MAGIC):end + 1], data[end + 1:]
        try:
            meta = json.loads(header)
            nlist, size, rows = int(meta["nlist"]), int(meta["size"]), int(meta["rows"])
        except (ValueError, KeyError, TypeError):
            raise RefusedFile("damaged header") from None
        if meta.get("format") != FORMAT:
            raise RefusedFile(f"format {meta.get('format')!r}, expected {FORMAT}")
        if meta.get("model_id") != self.model_id:
            raise RefusedFile(f"model_id {meta.get('model_id')!r}, expected {self.model_id!r}")
        if meta.get("training") != IVF_TRAINING:
            raise RefusedFile(f"centroids of {meta.get('training')!r}, expected {IVF_TRAINING!r}")
        if meta.get("dim") != self.dim:
            raise RefusedFile(f"dimension {meta.get('dim')!r}, expected {self.dim}")
        if bool(meta.get("sealed")) != (self.sealer is not None):
            raise RefusedFile("sealed file, plaintext gallery" if meta.get("sealed")
                              else "plaintext file beside a sealed gallery")
        payload = self._open(header, body)
        cut = nlist * self.dim * 4
        if len(payload) != cut + rows * 12:
            raise RefusedFile("centroids or lists of the wrong size")
        centroids = np.frombuffer(payload[:cut], "<f4").reshape(nlist, self.dim).astype(np.float32)
        ids = np.frombuffer(payload[cut:cut + rows * 8], "<i8").astype(np.int64)
        lists = np.frombuffer(payload[cut + rows * 8:], "<i4").astype(np.int64)
        if not np.isfinite(centroids).all():
            raise RefusedFile("centroids not finite")
        if rows and (np.any(np.diff(ids) <= 0) or lists.min() < 0 or lists.max() >= nlist):
            raise RefusedFile("row lists out of order or range")
        return TrainedLists(centroids, size, ids, lists)

    def _open(self, header: bytes, body: bytes) -> bytes:
        if self.sealer is None:
            digest, payload = body[:32], body[32:]
            if hashlib.sha256(header + payload).digest() != digest:
                raise RefusedFile("checksum mismatch (damaged)")
            return payload
        n = int.from_bytes(body[:2], "big")
        wrapped, sealed = body[2:2 + n], body[2 + n:]
        try:
            self.sealer.remember(FILE_ID, wrapped)
            return self.sealer.open(FILE_ID, header.decode(), sealed)
        except (ValueError, UnicodeDecodeError) as e:  # SealError is a ValueError
            raise RefusedFile(f"does not open with the configured master keys ({e})") from None
        finally:
            self.sealer.forget(FILE_ID)

    def _header(self, nlist: int, size: int, rows: int) -> bytes:
        meta = {"format": FORMAT, "model_id": self.model_id, "dim": self.dim, "nlist": nlist,
                "size": size, "rows": rows, "sealed": self.sealer is not None,
                "training": IVF_TRAINING}
        return json.dumps(meta, sort_keys=True).encode() + b"\n"
