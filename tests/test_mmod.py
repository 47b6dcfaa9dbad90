"""dlib's MMOD CNN face detector under ONNX Runtime (core.mmod, export.mmod).

Parity is checked live against ``dlib.cnn_face_detection_model_v1`` on real CelebA
photos at upsample 0 (dlib needs about a second a photo here), plus one photo at
upsample 1; the 200-photo figures come from ``python -m facegate.export.mmod``
(docs/mmod.md).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from facegate.core.dlib_dnn import read_dlib_dnn
from facegate.core.mmod import (
    PACKAGED,
    MmodDetector,
    MmodModelError,
    MmodSpec,
    decode_windows,
    mmod_nms,
    mmod_onnx,
    pyramid_up,
    rect_down,
    tiled_pyramid,
    tiled_pyramid_rects,
)

torch = pytest.importorskip("torch")
dlib = pytest.importorskip("dlib")

from facegate.export.mmod import (  # noqa: E402
    box_iou,
    export_mmod_onnx,
    mmod_spec,
    model_file,
    sample_photos,
)

LIVE_PHOTOS = 16
SPEC = MmodSpec(
    windows=((80, 80),), nms_iou=0.3382761351109955, nms_covered=1.0,
    mean_rgb=(122.782, 117.001, 104.298), pyramid_n=6, padding=10, outer_padding=11,
    min_level_rows=5, stride=8, offset=14, min_input=29,
)


@pytest.fixture(scope="module")
def net():
    return read_dlib_dnn(model_file())


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    """A fresh export, named as ``mmod_onnx`` names it."""
    return export_mmod_onnx(tmp_path_factory.mktemp("mmod") / mmod_onnx().name)


@pytest.fixture(scope="module")
def detector(onnx_path) -> MmodDetector:
    return MmodDetector(onnx_path)


@pytest.fixture(scope="module")
def dlib_cnn():
    return dlib.cnn_face_detection_model_v1(str(model_file()))


def _load(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _dlib_boxes(cnn, image: np.ndarray, upsample: int) -> list[tuple]:
    return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
            for d in cnn(image, upsample)]


def test_reader_reads_the_mmod_file(net):
    assert (net.loss, net.input) == ("loss_mmod_", "input_rgb_image_pyramid")
    assert (net.loss_attrs["detector_width"], net.loss_attrs["detector_height"]) == (80, 80)
    assert [layer.kind for layer in net.layers] == ["con", "bn_con", "relu"] * 6 + ["con"]
    filters = [layer.attrs["filters"][0] for layer in net.layers if layer.kind == "con"]
    assert filters == [16, 32, 32, 45, 45, 45, 1]


def test_spec_from_the_file_and_dlibs_source(net, detector):
    spec = mmod_spec(net)
    assert replace(spec, mean_rgb=SPEC.mean_rgb) == SPEC
    assert spec.mean_rgb == pytest.approx(SPEC.mean_rgb)  # float32 in the file
    assert detector.spec == spec  # travels in the ONNX metadata


def test_pyramid_up_is_dlibs_bit_for_bit(celeba_root):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 7), (31, 33), (2, 9)]]
    images.append(_load(sample_photos(celeba_root, 1)[0]))
    for image in images:
        up = pyramid_up(image)
        assert up.shape == (2 * image.shape[0] + 1, 2 * image.shape[1] + 2, 3)
        np.testing.assert_array_equal(up, dlib.resize_image(image, *up.shape[:2]))


def test_tiled_pyramid_layout():
    rects, (rows, cols) = tiled_pyramid_rects(400, 266, SPEC)
    assert rects[0] == (11, 11, 276, 410) and cols == 266 + 22
    sizes = [(b - t + 1, r - lft + 1) for lft, t, r, b in rects]
    for (h, w), (h2, w2) in zip(sizes, sizes[1:], strict=False):
        assert (h2, w2) == (int(h * 5 / 6), int(w * 5 / 6))
    assert sizes[-1][0] >= 5 and int(sizes[-1][0] * 5 / 6) < 5  # down to the 5-row floor
    for i, a in enumerate(rects):  # inside the tile, never touching another level
        assert a[0] >= 11 and a[1] >= 11 and a[2] < cols - 11 and a[3] < rows - 11
        for b in rects[i + 1 :]:
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
    tile, _ = tiled_pyramid(np.full((400, 266, 3), 200, np.uint8), SPEC)
    assert tile.shape == (3, rows, cols) and tile[:, :11].max() == 0
    expected = (200 - np.float32(SPEC.mean_rgb)) / 256
    np.testing.assert_allclose(tile[:, 11, 11], expected, rtol=1e-6)


def test_decode_maps_a_cell_to_an_image_window():
    rects = [(11, 11, 276, 410), (299, 299, 519, 631)]
    scores = np.full((1, 50, 50), -1.0, np.float32)
    scores[0, 3, 5] = 0.5  # input pixel (54, 38): level 0 at (11, 11), centre (43, 27)
    scores[0, 40, 40] = 0.7  # input pixel (334, 334): level 1 at (299, 299), centre (35, 35)
    (big, s1), (small, s0) = decode_windows(scores, rects, SPEC)
    assert (small, s0) == ((4, -13, 83, 67), 0.5)  # C's lround: -12.5 -> -13
    # level 1 scales up once: (35 -+ 39.5) * 6/5 + 0.3 = -5.1, 89.7
    assert big == (-5, -5, 90, 90) and s1 == pytest.approx(0.7)
    assert decode_windows(scores, rects, SPEC, adjust_threshold=0.6) == [(big, s1)]


def test_nms_uses_the_bounding_box_ratio():
    a = ((0, 0, 79, 79), 2.0)
    beside = ((40, 0, 119, 79), 1.5)  # intersection 3200 / hull 9600 = 0.333: kept
    below = ((0, 30, 79, 109), 1.0)  # intersection 4000 / hull 8800 = 0.45: dropped
    assert mmod_nms([a, beside, below], SPEC) == [a, beside]
    inside = ((20, 20, 59, 59), 1.0)  # 1600 / 6400 = 0.25, and covered 1.0 is not > 1.0
    assert mmod_nms([a, inside], SPEC) == [a, inside]
    assert mmod_nms([a, inside], replace(SPEC, nms_covered=0.9)) == [a]


def test_rect_down_undoes_pyramid_up():
    assert rect_down((10, 20, 110, 120), 0) == (10, 20, 110, 120)
    assert rect_down((10, 20, 110, 120), 1) == (4, 9, 54, 59)  # x/2 - 1.25, y/2 - 0.75


def test_onnx_matches_dlib_live(celeba_root, detector, dlib_cnn):
    photos = sample_photos(celeba_root, LIVE_PHOTOS)
    jobs = [(p, 0) for p in photos] + [(p, 1) for p in photos[:1]]
    faces = 0
    for path, upsample in jobs:
        image = _load(path)
        expected = _dlib_boxes(dlib_cnn, image, upsample)
        got = detector.detect(image, upsample)
        assert len(got) == len(expected), path
        for e, g in zip(sorted(expected), sorted(got), strict=True):
            assert box_iou(list(e), list(g)) >= 0.9
            assert g[4] == pytest.approx(e[4], abs=1e-3)
        faces += len(got)
    assert faces >= LIVE_PHOTOS * 0.7  # mostly one face per CelebA photo


def test_the_packaged_export_is_a_fresh_export(onnx_path, detector, tmp_path):
    """The server runs the ONNX file the package ships (it has no torch to export one):
    it must be what exporting face_recognition_models' .dat gives today."""
    packaged = mmod_onnx()
    assert packaged.parent == PACKAGED and packaged.name == onnx_path.name
    assert mmod_onnx(onnx_path.parent) == onnx_path
    with pytest.raises(MmodModelError, match="facegate.export.mmod export"):
        mmod_onnx(tmp_path)
    tile = np.random.default_rng(1).normal(0, 0.3, (3, 120, 96)).astype(np.float32)
    np.testing.assert_allclose(MmodDetector(packaged).scores(tile), detector.scores(tile), atol=1e-5)


def test_small_and_bad_inputs(detector, tmp_path):
    tiny = np.zeros((4, 6, 3), np.uint8)  # dlib raises here: its 5x5 filters do not fit
    assert detector.detect(tiny) == []
    assert detector.detect(np.zeros((7, 7, 3), np.uint8)) == []
    with pytest.raises(MmodModelError):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(MmodModelError):
        detector.detect(tiny, upsample=-1)
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), plain)
    with pytest.raises(MmodModelError, match="metadata"):
        MmodDetector(plain)


def test_the_session_asks_for_the_providers_the_embedder_asks_for(detector):
    from facegate.core.ort_session import default_providers

    assert detector._session.get_providers() == default_providers()


@pytest.mark.gpu
def test_onnxruntime_cuda_finds_the_boxes_cpu_finds(celeba_root, onnx_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    gpu = MmodDetector(onnx_path)
    assert gpu._session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = MmodDetector(onnx_path, providers=["CPUExecutionProvider"])
    for path in sample_photos(celeba_root, 8):
        image = _load(path)
        expected, got = cpu.detect(image, 1), gpu.detect(image, 1)
        assert len(got) == len(expected), path
        for e, g in zip(sorted(expected), sorted(got), strict=True):
            assert box_iou(list(e), list(g)) >= 0.99 and g[4] == pytest.approx(e[4], abs=1e-2)
