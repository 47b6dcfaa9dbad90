"""Verification .bin sets: real-photo round trip and refusal of foreign pickles."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
from facegate.train.binset import BinSetError, load_bin, write_bin


def real_pairs(celeba_index, pairs: int) -> tuple[list[np.ndarray], list[bool]]:
    """Alternating same / different pairs of real CelebA photos, resized to 112x112 RGB."""
    by_identity: dict[str, list] = {}
    for path, identity in celeba_index:
        by_identity.setdefault(identity, []).append(path)
    names = sorted(by_identity)

    def face(path) -> np.ndarray:
        return cv2.cvtColor(cv2.resize(cv2.imread(str(path)), (112, 112)), cv2.COLOR_BGR2RGB)

    images, issame = [], []
    for i in range(pairs):
        same = i % 2 == 0
        a = by_identity[names[i]]
        b = a if same else by_identity[names[i + 1]]
        images += [face(a[0]), face(b[1])]
        issame.append(same)
    return images, issame


def test_bin_round_trips_real_photos(tmp_path, celeba_index):
    images, issame = real_pairs(celeba_index, pairs=4)
    write_bin(tmp_path / "pairs.bin", images, issame, ext=".png")
    loaded, flags = load_bin(tmp_path / "pairs.bin")
    assert loaded.shape == (8, 112, 112, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, np.stack(images))
    assert flags.dtype == bool and flags.tolist() == issame


def test_bin_with_array_images_and_other_size_is_resized(tmp_path, celeba_index):
    """Some published dumps hold uint8 arrays of encoded bytes, at another resolution."""
    images, issame = real_pairs(celeba_index, pairs=2)
    big = [cv2.resize(im, (150, 150)) for im in images]
    bins = [np.frombuffer(cv2.imencode(".png", im)[1].tobytes(), np.uint8) for im in big]
    with open(tmp_path / "arrays.bin", "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    loaded, flags = load_bin(tmp_path / "arrays.bin")
    assert loaded.shape == (4, 112, 112, 3) and flags.tolist() == issame
    expected = [cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), (112, 112), interpolation=cv2.INTER_AREA) for im in big]
    assert np.abs(loaded.astype(int) - np.stack(expected)).max() <= 1


class Exploit:
    """Unpickling calls `marker.touch()`: the kind of side effect a hostile .bin could have."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_foreign_objects_and_mismatched_counts_are_refused(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Exploit(marker), b"x"], [True]), f)
    with pytest.raises(BinSetError):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    with open(tmp_path / "short.bin", "wb") as f:
        pickle.dump(([b"x", b"y", b"z"], [True]), f)
    with pytest.raises(BinSetError):
        load_bin(tmp_path / "short.bin")
