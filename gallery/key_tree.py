"""A puncturable key tree: forgetting one identity's key on every copy of the gallery.

With only a master key, a deleted identity's wrapped data key survives wherever its row
does (a PostgreSQL dead tuple or WAL segment, a backup), and the master key still opens
it until the master key itself is rotated out. Here each identity's data key is wrapped
under a key derived from the master key *and* a leaf of this tree, and deleting the
identity *punctures* its leaf: the file no longer holds anything from which that leaf's
key can be derived, while every other leaf still derives as before (so live identities
need no re-wrapping and backups of the gallery keep opening for everyone not deleted).

The tree is a GGM tree (Goldreich, Goldwasser, Micali) of depth ``DEPTH``: a node's two
children are the halves of BLAKE2b-512 keyed with its key (a PRF; one call per level). The file holds the
minimal set of subtree roots that covers every leaf not punctured: puncturing leaf n
replaces the root covering it by the siblings of n's path below it (at most ``DEPTH``
keys), so the file grows by a few hundred bytes per deletion and never shrinks; a key
rotation (``facegate gallery rotate-key``) can start a fresh tree.

Every copy must be punctured for a key to be gone: each replica keeps its own copy of
the file, punctured by the deletes it serves and by those it reads from the gallery's
list of shredded leaves (``gallery.sealed_rows``), at open and while it follows. The
file is rewritten whole (temporary file, fsync, rename), then the replaced file's bytes
are overwritten with zeros. A copy kept elsewhere (a backup of this file) keeps every
identity deleted after it readable to whoever also holds the master key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

DEPTH = 32  # leaves 0 .. 2**32 - 1, allocated in order by the gallery
MAGIC = b"FGKT1\n"
_ENTRY = struct.Struct(">BI32s")  # depth, prefix (the node's path bits), key
_MEMO_DEPTH = DEPTH - 4  # nodes kept while deriving, so neighbouring leaves share work


class Shredded(KeyError):
    """The leaf was punctured: its key can no longer be derived from this tree."""


def _child(key: bytes, bit: int) -> bytes:
    both = hashlib.blake2b(b"facegate-ggm", key=key, digest_size=64).digest()
    return both[32:] if bit else both[:32]


class KeyTree:
    """The covering set of a punctured GGM tree; pure (no file)."""

    def __init__(self, nodes: dict[tuple[int, int], bytes]) -> None:
        self.nodes = nodes
        self._memo: dict[int, bytes] = {}

    @classmethod
    def fresh(cls) -> KeyTree:
        return cls({(0, 0): os.urandom(32)})

    def _cover(self, leaf: int) -> tuple[int, bytes]:
        if not 0 <= leaf < 2**DEPTH:
            raise ValueError(f"leaf {leaf} outside the tree")
        for depth in range(DEPTH + 1):
            key = self.nodes.get((depth, leaf >> (DEPTH - depth)))
            if key is not None:
                return depth, key
        raise Shredded(leaf)

    def covers(self, leaf: int) -> bool:
        """Whether the leaf's key can still be derived (no key work, only look-ups)."""
        if leaf >> (DEPTH - _MEMO_DEPTH) in self._memo:
            return True
        try:
            self._cover(leaf)
        except Shredded:
            return False
        return True

    def leaf_key(self, leaf: int) -> bytes:
        """The leaf's key, or :class:`Shredded`. Derivation memoises the leaf's ancestor at
        ``_MEMO_DEPTH`` (a key the tree derives anyway; cleared by every puncture)."""
        key = self._memo.get(leaf >> (DEPTH - _MEMO_DEPTH))
        start = _MEMO_DEPTH
        if key is None:
            start, key = self._cover(leaf)
            if start <= _MEMO_DEPTH:
                for d in range(start, _MEMO_DEPTH):
                    key = _child(key, (leaf >> (DEPTH - d - 1)) & 1)
                self._memo[leaf >> (DEPTH - _MEMO_DEPTH)] = key
                start = _MEMO_DEPTH
        for d in range(start, DEPTH):
            key = _child(key, (leaf >> (DEPTH - d - 1)) & 1)
        return key

    def puncture(self, leaf: int) -> bool:
        """Forget ``leaf``'s key; False when it already was."""
        try:
            depth, key = self._cover(leaf)
        except Shredded:
            return False
        del self.nodes[(depth, leaf >> (DEPTH - depth))]
        for d in range(depth, DEPTH):
            bit = (leaf >> (DEPTH - d - 1)) & 1
            sibling = (leaf >> (DEPTH - d - 1)) ^ 1
            self.nodes[(d + 1, sibling)] = _child(key, 1 - bit)
            key = _child(key, bit)
        self._memo.clear()
        return True

    def to_bytes(self) -> bytes:
        body = MAGIC + struct.pack(">BI", DEPTH, len(self.nodes)) + b"".join(
            _ENTRY.pack(d, p, k) for (d, p), k in sorted(self.nodes.items())
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyTree:
        body, digest = data[:-32], data[-32:]
        if not body.startswith(MAGIC) or not hmac.compare_digest(hashlib.sha256(body).digest(), digest):
            raise ValueError("not a facegate key tree, or a damaged one")
        depth, count = struct.unpack_from(">BI", body, len(MAGIC))
        start = len(MAGIC) + 5
        if depth != DEPTH or len(body) != start + count * _ENTRY.size:
            raise ValueError("a key tree of another shape")
        nodes = {}
        for i in range(count):
            d, p, k = _ENTRY.unpack_from(body, start + i * _ENTRY.size)
            nodes[(d, p)] = k
        return cls(nodes)


class KeyTreeFile:
    """A :class:`KeyTree` kept in a file that each puncture rewrites; thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.tree = KeyTree.from_bytes(self.path.read_bytes())

    @staticmethod
    def create(path: str | Path) -> None:
        """A fresh tree at ``path`` (which must not exist), readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(KeyTree.fresh().to_bytes())
            f.flush()
            os.fsync(f.fileno())

    def leaf_key(self, leaf: int) -> bytes:
        with self._lock:
            return self.tree.leaf_key(leaf)

    def covers(self, leaf: int) -> bool:
        with self._lock:
            return self.tree.covers(leaf)

    def puncture(self, leaves: Iterable[int]) -> int:
        """Puncture ``leaves`` and, if any was new, persist before returning; how many were."""
        with self._lock:
            done = sum(self.tree.puncture(leaf) for leaf in leaves)
            if done:
                self._save()
            return done

    def _save(self) -> None:
        data = self.tree.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            with open(self.path, "r+b") as old:  # the replaced bytes: zeroed once unlinked
                size = os.fstat(old.fileno()).st_size
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
                old.write(b"\0" * size)
                old.flush()
                os.fsync(old.fileno())
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
