"""Sealing the gallery at rest, and shredding an identity by destroying its key.

Envelope encryption with AES-256-GCM (pyca/cryptography): every identity has its own
random data key (DEK); its name, metadata, template vectors and kept crops are sealed
with it, each under associated data naming the identity, the field and the template,
so a sealed value moved to another row fails to open. The DEK is stored only wrapped
by the master key (``identities.sealed_key``), and the master key lives outside the
gallery: ``FACEGATE_MASTER_KEY`` or ``FACEGATE_MASTER_KEY_FILE`` (one base64 key of 32
bytes per line; the first seals, the others only open: rotation). Deleting an identity
deletes its wrapped DEK with it, so any copy of its ciphertext left anywhere (a WAL, a
dead tuple, a backup) is unreadable once that copy of the wrapped key is gone too. With
a key tree (``FACEGATE_KEY_TREE_FILE``, gallery/key_tree.py) the DEK is wrapped under
the master key combined with the identity's leaf of the tree, and the delete punctures
the leaf: every copy of the wrapped key left anywhere is then unreadable at once.

Formats: a sealed blob is ``FGS1 | nonce(12) | ciphertext+tag``; a sealed text column
is ``fgs1:`` + base64 of that blob; a wrapped DEK is ``key id(8) | nonce(12) | 48``, or
with a tree ``FGT1 | key id(8) | leaf(8) | nonce(12) | 48``.
:class:`PlainSealer` has the same methods and stores plaintext (no master key set).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from facegate.core.errors import UnknownIdentity
from facegate.gallery.key_tree import KeyTreeFile, Shredded

MAGIC = b"FGS1"
TREE_MAGIC = b"FGT1"
TEXT_PREFIX = "fgs1:"
NONCE = 12
Key = tuple[int, str, str]  # (row id, identity id, template id), as gallery.integrity


class SealError(ValueError):
    """A key that cannot be read, or a sealed value that fails to open."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"facegate-master-key-id" + key).digest()[:8]


def parse_master_keys(text: str) -> list[bytes]:
    keys = []
    for line in text.split():
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise SealError("a master key line is not base64") from None
        if len(key) != 32:
            raise SealError(f"a master key must be 32 bytes (AES-256), got {len(key)}")
        keys.append(key)
    if not keys:
        raise SealError("no master key in the key file")
    return keys


def leaf_of(wrapped: bytes) -> int | None:
    """The key tree leaf a wrapped DEK was wrapped with, or None (master key only)."""
    wrapped = bytes(wrapped)
    return struct.unpack(">Q", wrapped[12:20])[0] if wrapped.startswith(TREE_MAGIC) else None


def new_master_key() -> str:
    """A fresh master key, base64 (``facegate gallery new-key``)."""
    return base64.b64encode(os.urandom(32)).decode()


class Sealer:
    """Seals and opens one gallery's values; DEKs are unwrapped once and cached.
    ``tree``: the gallery's key tree, when deletes are to shred at once (module doc)."""

    sealing = True

    def __init__(self, master_keys: Sequence[bytes], tree: KeyTreeFile | None = None) -> None:
        self._current = master_keys[0]
        self._current_id = key_id(self._current)
        self._masters = {key_id(k): (k, AESGCM(k)) for k in master_keys}
        self.tree = tree
        self._deks: dict[str, AESGCM] = {}
        self._lock = threading.Lock()
        self.loader: Callable[[str], bytes | None] = lambda identity_id: None

    @property
    def current_key_id(self) -> bytes:
        return self._current_id

    # -- data keys ----------------------------------------------------------------------

    def new_key(self, identity_id: str, leaf: int | None = None) -> tuple[bytes, AESGCM]:
        """A new DEK for a new identity: (wrapped, to store; the key, to pass to ``seal``).
        ``leaf``: its leaf of the key tree (handed out by ``sealed_rows.new_key``), if any.
        Cached only by :meth:`adopt` once its row has committed, so a refused duplicate
        never shadows the existing identity's key."""
        dek = AESGCM.generate_key(bit_length=256)
        return self._wrap(identity_id, dek, leaf), AESGCM(dek)

    def adopt(self, identity_id: str, key: AESGCM) -> None:
        with self._lock:
            self._deks[identity_id] = key

    def remember(self, identity_id: str, wrapped: bytes) -> None:
        with self._lock:
            self._deks[identity_id] = AESGCM(self._unwrap(identity_id, wrapped))

    def forget(self, identity_id: str) -> None:
        with self._lock:
            self._deks.pop(identity_id, None)

    def shred(self, leaves: Sequence[int]) -> int:
        """Puncture these leaves of the key tree (persisted before it returns)."""
        return self.tree.puncture(leaves) if self.tree is not None and leaves else 0

    def rewrap(self, identity_id: str, wrapped: bytes, leaf: Callable[[], int] | None = None,
               convert_only: bool = False) -> bytes | None:
        """``wrapped`` under the current master key, with a leaf of the tree (from
        ``leaf()``) if it has none yet; None when nothing changes. ``convert_only`` (at
        open): only give a leaf to a key that has none."""
        wrapped = bytes(wrapped)
        has = leaf_of(wrapped)
        give_leaf = self.tree is not None and has is None and leaf is not None
        if not give_leaf and (convert_only or self._key_id(wrapped) == self.current_key_id):
            return None
        dek = self._unwrap(identity_id, wrapped)
        return self._wrap(identity_id, dek, leaf() if give_leaf else has)

    @staticmethod
    def _key_id(wrapped: bytes) -> bytes:
        return wrapped[4:12] if wrapped.startswith(TREE_MAGIC) else wrapped[:8]

    def _wrapping(self, master: tuple[bytes, AESGCM], identity_id: str, leaf: int | None
                  ) -> tuple[AESGCM, bytes]:
        aad = b"facegate-dek|" + identity_id.encode()
        if leaf is None:
            return master[1], aad
        if self.tree is None:
            raise SealError(f"identity {identity_id!r}: its key is wrapped with a leaf of a key "
                            "tree, and no FACEGATE_KEY_TREE_FILE is configured")
        try:
            leaf_key = self.tree.leaf_key(leaf)
        except Shredded:
            raise SealError(f"identity {identity_id!r}: its key was shredded (leaf {leaf} of the "
                            "key tree is punctured)") from None
        wrapping = hashlib.blake2b(b"facegate-leaf-wrap|" + leaf_key, key=master[0],
                                   digest_size=32).digest()
        return AESGCM(wrapping), aad + b"|" + struct.pack(">Q", leaf)

    def _wrap(self, identity_id: str, dek: bytes, leaf: int | None = None) -> bytes:
        nonce = os.urandom(NONCE)
        cipher, aad = self._wrapping(self._masters[self.current_key_id], identity_id, leaf)
        head = self.current_key_id if leaf is None else (
            TREE_MAGIC + self.current_key_id + struct.pack(">Q", leaf))
        return head + nonce + cipher.encrypt(nonce, dek, aad)

    def _unwrap(self, identity_id: str, wrapped: bytes) -> bytes:
        wrapped = bytes(wrapped)
        leaf = leaf_of(wrapped)
        body = wrapped if leaf is None else wrapped[4:12] + wrapped[20:]  # key id|nonce|48
        master = self._masters.get(body[:8])
        if master is None:
            raise SealError(f"identity {identity_id!r}: its key is wrapped by a master key that "
                            "is not configured (FACEGATE_MASTER_KEY_FILE)")
        cipher, aad = self._wrapping(master, identity_id, leaf)
        try:
            return cipher.decrypt(body[8:20], body[20:], aad)
        except InvalidTag:
            raise SealError(f"identity {identity_id!r}: its wrapped key fails to open") from None

    def _dek(self, identity_id: str) -> AESGCM:
        dek = self._deks.get(identity_id)
        if dek is None:
            wrapped = self.loader(identity_id)
            if wrapped is None:
                raise UnknownIdentity(f"unknown identity {identity_id!r}")
            self.remember(identity_id, wrapped)
            dek = self._deks[identity_id]
        return dek

    # -- values -------------------------------------------------------------------------

    def seal(self, identity_id: str, field: str, data: bytes | None,
             key: AESGCM | None = None) -> bytes | None:
        if data is None:
            return None
        nonce = os.urandom(NONCE)
        aad = f"{identity_id}|{field}".encode()
        return MAGIC + nonce + (key or self._dek(identity_id)).encrypt(nonce, bytes(data), aad)

    def open(self, identity_id: str, field: str, blob: bytes | None) -> bytes | None:
        if blob is None:
            return None
        blob = bytes(blob)
        if not blob.startswith(MAGIC):
            raise SealError(f"identity {identity_id!r}: {field} is not sealed")
        try:
            return self._dek(identity_id).decrypt(
                blob[4 : 4 + NONCE], blob[4 + NONCE :], f"{identity_id}|{field}".encode()
            )
        except InvalidTag:
            raise SealError(f"identity {identity_id!r}: sealed {field} fails to open") from None

    def seal_text(self, identity_id: str, field: str, text: str | None,
                  key: AESGCM | None = None) -> str | None:
        blob = self.seal(identity_id, field, None if text is None else text.encode(), key)
        return None if blob is None else TEXT_PREFIX + base64.b64encode(blob).decode()

    def open_text(self, identity_id: str, field: str, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(TEXT_PREFIX):
            raise SealError(f"identity {identity_id!r}: {field} is not sealed")
        return self.open(identity_id, field, base64.b64decode(value[len(TEXT_PREFIX):])).decode()

    def open_vectors(self, keys: Sequence[Key], blobs: Sequence[bytes]) -> list[bytes]:
        """Plain vector bytes per row; b"" for a row that fails to open, which the
        quarantine then refuses (a tampered or foreign row is never matched)."""
        out = []
        for (_, identity_id, template_id), blob in zip(keys, blobs, strict=True):
            try:
                out.append(self.open(identity_id, f"embedding:{template_id}", blob) or b"")
            except (SealError, UnknownIdentity):
                out.append(b"")
        return out


class PlainSealer:
    """No master key configured: values are stored as they are (galleries of before)."""

    sealing = False
    tree = None
    loader: Callable[[str], bytes | None] = staticmethod(lambda identity_id: None)

    def new_key(self, identity_id: str, leaf: int | None = None) -> tuple[None, None]:
        return None, None

    def adopt(self, identity_id: str, key: object) -> None:
        return None

    def remember(self, identity_id: str, wrapped: bytes) -> None:
        raise SealError(f"identity {identity_id!r} is sealed and no master key is configured")

    def forget(self, identity_id: str) -> None:
        return None

    def shred(self, leaves: Sequence[int]) -> int:
        return 0

    def seal(self, identity_id: str, field: str, data: bytes | None,
             key: object = None) -> bytes | None:
        return None if data is None else bytes(data)

    open = seal

    def seal_text(self, identity_id: str, field: str, text: str | None,
                  key: object = None) -> str | None:
        return text

    open_text = seal_text

    def open_vectors(self, keys: Sequence[Key], blobs: Sequence[bytes]) -> list[bytes]:
        return [bytes(b) for b in blobs]


def load_sealer(master_key: str | None = None, master_key_file: Path | None = None,
                data_dir: Path | None = None, key_tree_file: Path | None = None
                ) -> Sealer | PlainSealer:
    """The sealer for a master key (base64) or key file, else :class:`PlainSealer`.
    A key file inside ``data_dir`` (the SQLite gallery's folder) is refused: a key kept
    beside the data protects nothing. ``key_tree_file``: the key tree (key_tree.py),
    which needs a master key too (it may live beside the data: alone it opens nothing)."""
    tree = None
    if key_tree_file is not None:
        if master_key_file is None and not master_key:
            raise SealError("FACEGATE_KEY_TREE_FILE needs a master key too "
                            "(FACEGATE_MASTER_KEY_FILE)")
        try:
            tree = KeyTreeFile(key_tree_file)
        except ValueError as e:
            raise SealError(f"{key_tree_file}: {e}") from None
    if master_key_file is not None:
        path = Path(master_key_file).resolve()
        if data_dir is not None and path.parent == Path(data_dir).resolve():
            raise SealError(f"{master_key_file}: the master key must not be kept beside the "
                            "gallery it seals; move it to another folder or a secret mount")
        return Sealer(parse_master_keys(path.read_text()), tree)
    if master_key:
        return Sealer(parse_master_keys(master_key), tree)
    return PlainSealer()


def open_identity_rows(sealer: Sealer | PlainSealer, rows: Sequence[tuple]) -> list[tuple]:
    """(identity_id, name, metadata, created_at) rows with name and metadata opened."""
    return [(i, sealer.open_text(i, "name", name), sealer.open_text(i, "metadata", meta), at)
            for i, name, meta, at in rows]


def gallery_sealer(settings: Any) -> Sealer | PlainSealer:
    """The sealer the server's settings ask for (``FACEGATE_MASTER_KEY[_FILE]``)."""
    location = settings.gallery
    data_dir = None if isinstance(location, str) else Path(location).parent
    secret = settings.master_key.get_secret_value() if settings.master_key else None
    return load_sealer(secret, settings.master_key_file, data_dir, settings.key_tree_file)
