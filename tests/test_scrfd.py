"""SCRFD decoding on hand-made tensors, and the full detector on a hand-built ONNX graph.

No SCRFD weights exist offline, so the end-to-end test runs a real ONNX Runtime
session on a graph whose nine outputs are constants describing known faces.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from facegate.core.detect import create_detector
from facegate.core.scrfd import (
    ScrfdDetector,
    anchor_centers,
    decode_outputs,
    distance2bbox,
    distance2kps,
    letterbox,
    nms,
)
from onnx import TensorProto, helper, numpy_helper


def test_anchor_centers_layout():
    c = anchor_centers(2, 3, 8, 2)
    expected = np.array(
        [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0], [0, 8], [0, 8], [8, 8], [8, 8], [16, 8], [16, 8]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(c, expected)


def test_distance2bbox_and_kps():
    points = np.array([[100.0, 50.0], [0.0, 0.0]])
    dist = np.array([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(distance2bbox(points, dist), [[90, 30, 130, 90], [-1, -2, 3, 4]])
    offsets = np.array([[1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 5.0, 5.0]])
    np.testing.assert_array_equal(
        distance2kps(points, offsets), [[[101, 49], [102, 48]], [[0, 0], [5, 5]]]
    )


def test_nms_suppresses_overlaps_only():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=np.float32
    )
    scores = np.array([0.8, 0.9, 0.7, 0.3], dtype=np.float32)
    # box 1 (best) overlaps 0 (IoU 0.68) and 3; box 2 is separate.
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(boxes, scores, 0.99) == [1, 0, 2, 3]  # all kept, by score


def test_letterbox_keeps_aspect_top_left():
    image = np.full((300, 600, 3), 200, np.uint8)
    canvas, scale = letterbox(image, (640, 640))
    assert canvas.shape == (640, 640, 3) and scale == pytest.approx(640 / 600)
    assert canvas[:320, :].min() == 200 and canvas[321:, :].max() == 0


STRIDE_GRID = {8: 80, 16: 40, 32: 20}  # 640x640 input


def _raw_outputs(faces: list[tuple[int, int, int, int, float, list[float], list[float]]]):
    """Nine SCRFD tensors for a 640 input; each face = (stride, gy, gx, anchor, score, dist4, kps10)."""
    scores, boxes, kps = {}, {}, {}
    for stride, g in STRIDE_GRID.items():
        n = g * g * 2
        scores[stride] = np.zeros((n, 1), np.float32)
        boxes[stride] = np.zeros((n, 4), np.float32)
        kps[stride] = np.zeros((n, 10), np.float32)
    for stride, gy, gx, anchor, score, dist, offsets in faces:
        idx = (gy * STRIDE_GRID[stride] + gx) * 2 + anchor
        scores[stride][idx] = score
        boxes[stride][idx] = dist
        kps[stride][idx] = offsets
    strides = list(STRIDE_GRID)
    return [scores[s] for s in strides] + [boxes[s] for s in strides] + [kps[s] for s in strides]


# Offsets are in stride units. At stride 16, cell (gy=10, gx=12) has centre (192, 160).
KPS = [-1.0, -1.0, 1.0, -1.0, 0.0, 0.5, -0.8, 1.5, 0.8, 1.5]
FACES = [
    (16, 10, 12, 1, 0.95, [2.0, 3.0, 2.0, 3.0], KPS),  # box (160, 112, 224, 208)
    (16, 10, 12, 0, 0.80, [2.1, 3.0, 2.0, 3.1], KPS),  # duplicate: removed by NMS
    (32, 15, 5, 0, 0.70, [1.0, 1.0, 1.0, 1.0], KPS),  # box (128, 448, 192, 512)
    (8, 40, 40, 0, 0.30, [1.0, 1.0, 1.0, 1.0], KPS),  # below threshold
]


def test_decode_outputs_positions():
    scores, boxes, kps = decode_outputs(_raw_outputs(FACES), (640, 640), 0.5)
    order = np.argsort(-scores)
    np.testing.assert_allclose(scores[order], [0.95, 0.80, 0.70])
    np.testing.assert_allclose(boxes[order[0]], [160, 112, 224, 208])
    np.testing.assert_allclose(boxes[order[2]], [128, 448, 192, 512])
    np.testing.assert_allclose(kps[order[0], 0], [192 - 16, 160 - 16])
    np.testing.assert_allclose(kps[order[0], 4], [192 + 0.8 * 16, 160 + 1.5 * 16])


@pytest.fixture(scope="module")
def constant_scrfd_onnx(tmp_path_factory):
    """A 9-output ONNX graph with SCRFD's I/O signature whose outputs are the FACES tensors."""
    nodes, outputs = [], []
    for i, tensor in enumerate(_raw_outputs(FACES)):
        name = f"out{i}"
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(tensor)))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(tensor.shape)))
    graph = helper.make_graph(
        nodes,
        "scrfd_constant",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("scrfd") / "scrfd_constant.onnx"
    onnx.save(model, path)
    return path


def test_detector_end_to_end_maps_back_through_letterbox(constant_scrfd_onnx):
    detector = create_detector("scrfd", path=constant_scrfd_onnx, providers=["CPUExecutionProvider"])
    assert isinstance(detector, ScrfdDetector)
    image = np.zeros((960, 1280, 3), np.uint8)  # letterbox scale 0.5: image coords = 2x network coords
    faces = detector.detect(image)
    assert [round(f.score, 2) for f in faces] == [0.95, 0.70]
    np.testing.assert_allclose(faces[0].box, [320, 224, 448, 416])
    np.testing.assert_allclose(faces[1].box, [256, 896, 384, 1024])
    assert faces[0].landmarks.shape == (5, 2) and faces[0].landmarks.dtype == np.float32
    np.testing.assert_allclose(faces[0].landmarks[0], [2 * (192 - 16), 2 * (160 - 16)])
    # ArcFace order: eyes left-to-right, mouth corners left-to-right.
    lm = faces[0].landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]


def test_run_hook_can_be_replaced(constant_scrfd_onnx):
    """The TensorRT hook: a subclass overriding _run gets the normalised NCHW blob."""
    seen = {}

    class Recording(ScrfdDetector):
        def _run(self, blob):
            seen["blob"] = blob
            return _raw_outputs(FACES[:1])

    det = Recording(constant_scrfd_onnx, providers=["CPUExecutionProvider"], score_threshold=0.9)
    faces = det.detect(np.full((640, 640, 3), 255, np.uint8))
    assert len(faces) == 1
    blob = seen["blob"]
    assert blob.shape == (1, 3, 640, 640) and blob.dtype == np.float32
    assert blob.max() == pytest.approx((255 - 127.5) / 128)


def test_rejects_non_scrfd_graph(tmp_path):
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [out],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "identity.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match="expected 9"):
        ScrfdDetector(path, providers=["CPUExecutionProvider"])
