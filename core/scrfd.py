"""SCRFD face detector (insightface det_500m / det_10g ONNX files).

The GPU-side alternative to dlib: one forward pass gives boxes and the five
ArcFace landmarks directly. The decoding (anchor centres, distance offsets,
NMS) is pure NumPy so it can be tested without weights; the network itself runs
behind `_run`, which a TensorRT-backed subclass can replace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from facegate.core.detect import Face
from facegate.core.ort_session import default_providers, session_options

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
INPUT_MEAN = 127.5
INPUT_STD = 128.0


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = NUM_ANCHORS) -> np.ndarray:
    """(height*width*num_anchors, 2) xy centres of a stride's feature map, row-major, anchors innermost."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Boxes (N, 4) from centres (N, 2) and (left, top, right, bottom) distances (N, 4)."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints (N, K, 2) from centres (N, 2) and (dx, dy) offsets (N, 2K)."""
    offsets = distance.reshape(len(distance), distance.shape[1] // 2, 2)
    return points[:, None, :] + offsets


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, highest score first."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(0, x2 - x1) * np.maximum(0, y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= thr]
    return keep


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping aspect into the top-left of a black (h, w) canvas; returns (canvas, scale)."""
    width, height = size
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, new_h / h


def decode_outputs(
    outputs: Sequence[np.ndarray],
    input_hw: tuple[int, int],
    score_threshold: float,
    strides: Sequence[int] = STRIDES,
    num_anchors: int = NUM_ANCHORS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (N,), boxes (N, 4), kps (N, 5, 2)) in network-input pixels, above threshold.

    `outputs` is the SCRFD order: scores per stride, then box distances per
    stride, then keypoint offsets per stride (distances in units of stride).
    """
    n = len(strides)
    if len(outputs) != 3 * n:
        raise ValueError(f"expected {3 * n} SCRFD outputs (with keypoints), got {len(outputs)}")
    all_scores, all_boxes, all_kps = [], [], []
    for i, stride in enumerate(strides):
        scores = _squeeze_batch(outputs[i]).reshape(-1)
        boxes = _squeeze_batch(outputs[i + n]).reshape(-1, 4) * stride
        kps = _squeeze_batch(outputs[i + 2 * n]).reshape(len(scores), -1) * stride
        centers = anchor_centers(input_hw[0] // stride, input_hw[1] // stride, stride, num_anchors)
        if len(centers) != len(scores):
            raise ValueError(f"stride {stride}: {len(scores)} scores for {len(centers)} anchors")
        keep = scores >= score_threshold
        all_scores.append(scores[keep])
        all_boxes.append(distance2bbox(centers[keep], boxes[keep]))
        all_kps.append(distance2kps(centers[keep], kps[keep]))
    return np.concatenate(all_scores), np.concatenate(all_boxes), np.concatenate(all_kps)


def _squeeze_batch(x: np.ndarray) -> np.ndarray:
    """Batched exports give (1, N, C); others (N, C)."""
    return x[0] if x.ndim == 3 else x


class ScrfdDetector:
    """insightface SCRFD ONNX detector run with ONNX Runtime; faces sorted by score."""

    def __init__(
        self,
        model_path: str | Path,
        providers: list[str] | None = None,
        input_size: tuple[int, int] = (640, 640),
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SCRFD model not found: {self.model_path}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_size = tuple(input_size)  # (width, height)
        self._session = self._open_session(providers)

    def _open_session(self, providers: list[str] | None):
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.model_path), sess_options=session_options(),
                                       providers=providers or default_providers())
        inp = session.get_inputs()[0]
        self._input_name = inp.name
        self._output_names = [o.name for o in session.get_outputs()]
        if len(self._output_names) != 9:
            raise ValueError(
                f"{self.model_path.name}: {len(self._output_names)} outputs; expected 9 "
                "(SCRFD with keypoints, strides 8/16/32)"
            )
        h, w = inp.shape[2], inp.shape[3]
        if isinstance(h, int) and isinstance(w, int):
            self.input_size = (w, h)  # a fixed-shape export dictates its size
        return session

    def _run(self, blob: np.ndarray) -> list[np.ndarray]:
        """The network: (1, 3, H, W) float32 -> the 9 raw outputs. Override for TensorRT."""
        return self._session.run(self._output_names, {self._input_name: blob})

    def detect(self, image: np.ndarray) -> list[Face]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("image must be an (H, W, 3) uint8 RGB array")
        canvas, scale = letterbox(image, self.input_size)
        # insightface feeds RGB normalised (x - 127.5) / 128, NCHW.
        blob = ((canvas.astype(np.float32) - INPUT_MEAN) / INPUT_STD).transpose(2, 0, 1)[None]
        outputs = self._run(np.ascontiguousarray(blob))
        scores, boxes, kps = decode_outputs(
            outputs, (canvas.shape[0], canvas.shape[1]), self.score_threshold
        )
        boxes, kps = boxes / scale, kps / scale
        return [
            Face(
                box=tuple(float(v) for v in boxes[i]),
                score=float(scores[i]),
                landmarks=kps[i].astype(np.float32),
            )
            for i in nms(boxes, scores, self.nms_threshold)
        ]
