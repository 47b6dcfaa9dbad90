"""insightface RecordIO packs (``train.rec`` + ``train.idx``) read and written without mxnet.

The public face-recognition training sets (MS1MV2/V3, Glint360K, WebFace, ...) are
distributed as mxnet ``MXIndexedRecordIO`` packs. mxnet is unmaintained and heavy,
and the format is small, so it is implemented here. ``facegate train`` reads a pack with
``data.format: recordio`` (``train.split``).

File layout (dmlc recordio): each record is ``uint32 magic 0xced7230a``,
``uint32 lrec`` (upper 3 bits a continuation flag, lower 29 bits the length), the
payload, zero-padded to 4 bytes. The writer splits a payload wherever the magic
word appears at a 4-byte boundary (flags 1 = first part, 2 = middle, 3 = last; the
magic itself is dropped and reinserted by the reader). The ``.idx`` file has one
``key<TAB>byte offset`` line per record.

Payload (``mx.recordio.pack``): the ``IRHeader`` struct ``<IfQQ`` (flag, label,
id, id2); when ``flag > 0``, ``flag`` float32 labels follow it and ``label`` is 0.
Then the encoded image. In insightface packs record 0 is a header whose labels
``(a, b)`` say images are keys ``1 .. a-1`` and identity records are ``a .. b-1``
(each labelled with its ``(first, end)`` image key range).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from facegate.core.errors import FacegateError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(FacegateError):
    """A RecordIO pack is malformed or truncated."""

    code = "recordio_invalid"
    status = 500


@dataclass(frozen=True)
class IRHeader:
    """mxnet's image-record header; ``labels`` holds the float labels when ``flag > 0``."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...] = ()


def _encode_lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def encode_record(payload: bytes) -> bytes:
    """One record as dmlc's RecordIOWriter writes it (magic-word splitting and padding)."""
    if len(payload) > _LENGTH_MASK:
        raise RecordIOError(f"record of {len(payload)} bytes exceeds the 2^29 limit")
    parts = []
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            parts.append(_encode_lrec(1 if start == 0 else 2, i - start) + payload[start:i])
            start = i + 4
    parts.append(_encode_lrec(3 if start else 0, len(payload) - start) + payload[start:])
    padding = -len(payload) % 4
    return b"".join(parts) + b"\0" * padding


def decode_record(read) -> bytes | None:
    """Read one record with ``read(n) -> bytes``; None at a clean end of file."""
    chunks: list[bytes] = []
    while True:
        head = read(8)
        if not head and not chunks:
            return None
        if len(head) != 8:
            raise RecordIOError("truncated record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"bad magic {magic:#x}")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        padded = (length + 3) & ~3
        body = read(padded)
        if len(body) != padded:
            raise RecordIOError("truncated record payload")
        chunks.append(body[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(chunks)


def pack(header: IRHeader, image: bytes) -> bytes:
    """``mx.recordio.pack``: header struct, optional float labels, then the image bytes."""
    if header.labels:
        head = IR_HEADER.pack(len(header.labels), 0.0, header.id, header.id2)
        return head + np.asarray(header.labels, dtype="<f4").tobytes() + image
    return IR_HEADER.pack(0, header.label, header.id, header.id2) + image


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: the header and the remaining (image) bytes."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOError("record shorter than its IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    rest = payload[IR_HEADER.size :]
    labels: tuple[float, ...] = ()
    if flag > 0:
        labels = tuple(float(v) for v in np.frombuffer(rest[: 4 * flag], dtype="<f4"))
        rest = rest[4 * flag :]
    return IRHeader(flag, label, id_, id2, labels), rest


def read_index(path: Path) -> dict[int, int]:
    """key -> byte offset from a ``.idx`` file."""
    index = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                key, offset = line.split("\t")
                index[int(key)] = int(offset)
    return index


class IndexedRecordReader:
    """Random access to records by key; reopens its file after a fork (DataLoader workers)."""

    def __init__(self, prefix: str | Path) -> None:
        self.rec_path = Path(f"{prefix}.rec")
        self.index = read_index(Path(f"{prefix}.idx"))
        self._fd: int | None = None
        self._pid = -1

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, key: int) -> bytes:
        fd = self._file()
        position = self.index[key]

        def read_at(n: int) -> bytes:
            nonlocal position
            data = os.pread(fd, n, position)
            position += len(data)
            return data

        record = decode_record(read_at)
        if record is None:
            raise RecordIOError(f"no record at key {key}")
        return record

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}


class IndexedRecordWriter:
    """Writes ``prefix.rec`` and ``prefix.idx`` like ``mx.recordio.MXIndexedRecordIO(..., 'w')``."""

    def __init__(self, prefix: str | Path) -> None:
        self._rec = open(f"{prefix}.rec", "wb")
        self._idx = open(f"{prefix}.idx", "w")

    def write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(encode_record(payload))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> IndexedRecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RecordIOError("undecodable image in record")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 RGB -> encoded bytes (``.png`` is lossless)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RecordIOError(f"could not encode image as {ext}")
    return data.tobytes()


def write_insightface_pack(
    prefix: str | Path, images: Sequence[np.ndarray], labels: Sequence[int], ext: str = ".jpg"
) -> None:
    """An insightface-style pack: header record 0, images 1..N, one record per identity.

    Images must be grouped by label (as insightface writes them).
    """
    labels = [int(v) for v in labels]
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    if any(a > b for a, b in zip(labels, labels[1:], strict=False)):
        raise ValueError("labels must be sorted (images grouped by identity)")
    classes = sorted(set(labels))
    first_identity_key = len(images) + 1
    with IndexedRecordWriter(prefix) as writer:
        end = first_identity_key + len(classes)
        writer.write(0, pack(IRHeader(2, 0.0, 0, 0, (first_identity_key, end)), b""))
        for key, (image, label) in enumerate(zip(images, labels, strict=True), start=1):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), encode_image(image, ext)))
        for offset, label in enumerate(classes):
            keys = [k for k, v in enumerate(labels, start=1) if v == label]
            header = IRHeader(2, 0.0, first_identity_key + offset, 0, (keys[0], keys[-1] + 1))
            writer.write(first_identity_key + offset, pack(header, b""))


class RecordIODataset:
    """(image RGB uint8, integer label) per image record of an insightface pack.

    Map-style (``len``, ``[i]``) so a torch DataLoader can use it directly; works
    on packs without the insightface header record too (then every key is an image).
    """

    def __init__(self, prefix: str | Path) -> None:
        self.reader = IndexedRecordReader(prefix)
        first, _ = unpack(self.reader.read(min(self.reader.index)))
        self.identity_range: tuple[int, int] | None
        if first.flag > 0 and min(self.reader.index) == 0:
            self.keys = list(range(1, int(first.labels[0])))
            self.identity_range = (int(first.labels[0]), int(first.labels[1]))
        else:
            self.keys = sorted(self.reader.index)
            self.identity_range = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        header, image = unpack(self.reader.read(self.keys[i]))
        label = header.labels[0] if header.flag > 0 else header.label
        return decode_image(image), int(label)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]

    def labels(self) -> np.ndarray:
        """All labels without decoding images (reads headers only)."""
        out = np.empty(len(self.keys), dtype=np.int64)
        for i, key in enumerate(self.keys):
            header, _ = unpack(self.reader.read(key))
            out[i] = int(header.labels[0] if header.flag > 0 else header.label)
        return out
