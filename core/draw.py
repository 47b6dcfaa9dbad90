"""Draw detections on an image, for eyeballing what the detector saw."""

from __future__ import annotations

import cv2
import numpy as np
from facegate.core.detect import Face

BOX_COLOUR = (0, 255, 0)
# One colour per ArcFace landmark: left eye, right eye, nose, left mouth, right mouth (RGB).
LANDMARK_COLOURS = ((255, 0, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255))


def draw_faces(image: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of the RGB image with each face's box, score and five landmarks drawn."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (round(v) for v in face.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
        cv2.putText(
            out,
            f"{face.score:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            BOX_COLOUR,
            thickness,
            cv2.LINE_AA,
        )
        for (x, y), colour in zip(face.landmarks, LANDMARK_COLOURS, strict=True):
            cv2.circle(out, (round(float(x)), round(float(y))), thickness + 1, colour, -1)
    return out
