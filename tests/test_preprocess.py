"""facegate.core.preprocess: the one crop -> model input and raw -> unit path of every runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.preprocess import (
    check_crops,
    embed_with_flip,
    l2_normalise,
    mirrored,
    model_input,
)


def test_model_input_follows_the_input_spec():
    crops = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    x = model_input(crops, dict(DEFAULT_INPUT, size=[4, 4]))
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 4) and x.flags.c_contiguous
    np.testing.assert_allclose(x, (crops.transpose(0, 3, 1, 2) - 127.5) / 127.5, atol=1e-6)
    # dlib's ResNet: per-channel means, / 256, and a BGR NHWC variant for completeness.
    dlib = {"size": [4, 4], "color": "RGB", "layout": "NCHW", "mean": [122.782, 117.001, 104.298],
            "std": 256.0}
    expected = (crops - np.array(dlib["mean"])) / 256.0
    np.testing.assert_allclose(model_input(crops, dlib), expected.transpose(0, 3, 1, 2), atol=1e-6)
    bgr = dict(dlib, color="BGR", layout="NHWC", mean=127.5)
    np.testing.assert_allclose(
        model_input(crops, bgr), (crops[..., ::-1] - 127.5) / 256.0, atol=1e-6
    )


def test_check_crops_names_what_is_wrong():
    ok = np.zeros((1, 150, 150, 3), dtype=np.uint8)
    assert check_crops(ok, (150, 150)) is ok
    with pytest.raises(ValueError, match="numpy array"):
        check_crops([[0]], (150, 150))
    with pytest.raises(ValueError, match=r"shape \(N, 112, 112, 3\), got \(1, 150, 150, 3\)"):
        check_crops(ok)


def test_l2_normalise_keeps_precision_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    unit = l2_normalise(x)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
    assert l2_normalise(x.astype(np.float64)).dtype == np.float64
    assert l2_normalise(np.array([[1, 1]])).dtype == np.float64


def test_embed_with_flip_sums_crop_and_mirror_in_one_call():
    crops = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    weights = np.random.default_rng(2).normal(size=(48, 5))
    calls = []

    def raw(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch.reshape(len(batch), -1).astype(np.float64) @ weights

    out = embed_with_flip(raw, crops, flip=True)
    assert calls == [6] and out.dtype == np.float32
    np.testing.assert_allclose(out, l2_normalise(raw(crops) + raw(mirrored(crops))), atol=1e-6)
    np.testing.assert_allclose(embed_with_flip(raw, crops, flip=False), l2_normalise(raw(crops)),
                               atol=1e-6)
    np.testing.assert_array_equal(mirrored(crops)[:, :, 0], crops[:, :, -1])


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("facegate.core.embed_tensorrt", "facegate.core.embed"),  # no cycle with core.embed
        ("facegate.train.trainer", "facegate.train.evaluate"),  # no helpers from the CLI module
    ],
)
def test_module_does_not_import(module, absent):
    code = f"import sys, {module}; assert {absent!r} not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
