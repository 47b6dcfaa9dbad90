"""RecordIO packs without mxnet: byte layout, header packing, and a real-photo round trip."""

from __future__ import annotations

import io
import pickle
import struct

import cv2
import numpy as np
import pytest
from facegate.train.recordio import (
    MAGIC,
    IRHeader,
    RecordIODataset,
    RecordIOError,
    decode_record,
    encode_record,
    pack,
    unpack,
    write_insightface_pack,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def real_faces(celeba_index, identities: int, per_identity: int) -> tuple[list[np.ndarray], list[int]]:
    """Centre crops of real CelebA photos resized to 112x112 RGB, grouped by identity."""
    images, labels, seen = [], [], {}
    for path, identity in celeba_index:
        label = seen.setdefault(identity, len(seen))
        if label >= identities or labels.count(label) >= per_identity:
            continue
        bgr = cv2.imread(str(path))
        h, w = bgr.shape[:2]
        side = min(h, w)
        square = bgr[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        images.append(cv2.cvtColor(cv2.resize(square, (112, 112)), cv2.COLOR_BGR2RGB))
        labels.append(label)
        if len(images) == identities * per_identity:
            break
    return images, labels


def test_record_layout_matches_dmlc():
    record = encode_record(b"abc")
    assert record == MAGIC_BYTES + struct.pack("<I", 3) + b"abc\0"
    # The magic word at a 4-byte boundary splits the record: first part (flag 1), last (flag 3).
    split = encode_record(b"abcd" + MAGIC_BYTES + b"ef")
    assert split == (
        MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
        + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 2) + b"ef\0\0"
    )


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", b"abcd", MAGIC_BYTES, MAGIC_BYTES * 3 + b"tail", b"12" + MAGIC_BYTES + b"34" + MAGIC_BYTES],
)
def test_records_round_trip(payload):
    stream = io.BytesIO(encode_record(payload) + encode_record(b"next"))
    assert decode_record(stream.read) == payload
    assert decode_record(stream.read) == b"next"
    assert decode_record(stream.read) is None


def test_truncated_record_is_an_error():
    stream = io.BytesIO(encode_record(b"abcdefgh")[:-3])
    with pytest.raises(RecordIOError):
        decode_record(stream.read)


def test_header_packing_round_trips():
    header, rest = unpack(pack(IRHeader(0, 7.0, 3, 0), b"img"))
    assert (header.flag, header.label, header.id, rest) == (0, 7.0, 3, b"img")
    header, rest = unpack(pack(IRHeader(2, 0.0, 0, 0, (11.0, 14.0)), b""))
    assert header.flag == 2 and header.labels == (11.0, 14.0) and rest == b""


def test_insightface_pack_round_trips_real_photos(tmp_path, celeba_index):
    images, labels = real_faces(celeba_index, identities=3, per_identity=3)
    prefix = tmp_path / "train"
    write_insightface_pack(prefix, images, labels, ext=".png")

    dataset = RecordIODataset(prefix)
    assert len(dataset) == len(images)
    assert dataset.identity_range == (len(images) + 1, len(images) + 1 + 3)
    assert dataset.labels().tolist() == labels
    for (image, label), original, expected in zip(dataset, images, labels, strict=True):
        assert label == expected
        np.testing.assert_array_equal(image, original)

    # Survives pickling (DataLoader workers) and reads the same record afterwards.
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[4][0], images[4])

    # Identity records give each class's image key range.
    first, end = dataset.identity_range
    for offset, label in enumerate(range(3)):
        header, _ = unpack(dataset.reader.read(first + offset))
        keys = [k for k, v in enumerate(labels, start=1) if v == label]
        assert header.labels == (keys[0], keys[-1] + 1)


def test_jpeg_pack_is_close_to_the_original(tmp_path, celeba_index):
    images, labels = real_faces(celeba_index, identities=2, per_identity=2)
    write_insightface_pack(tmp_path / "jpg", images, labels, ext=".jpg")
    dataset = RecordIODataset(tmp_path / "jpg")
    for (image, _), original in zip(dataset, images, strict=True):
        assert image.shape == (112, 112, 3)
        assert np.abs(image.astype(int) - original).mean() < 4
