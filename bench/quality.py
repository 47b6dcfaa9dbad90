"""What scoring a face's quality costs: ``python -m bench.quality``

For 40 shared photos (the server's face path and embedder, default bundle), times per
face, p50 over repeats: (1) what quality scoring adds on the request path (the crop's
sharpness and brightness, the landmark geometry, the logistic models: ``Signals.of`` +
``QualityModel.assess``), and (2) the embedder with and without the stability output
(``embed_with_stability`` against ``embed``: with flip on, the same one run).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.assets import photo_pairs, resolve_bundle


def _p50_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def main() -> None:
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder, embed_with_stability
    from facegate.core.face import make_detector, prepare_face
    from facegate.core.quality import Signals

    bundle = load_bundle(resolve_bundle(Path("runs/bench"))[0])
    model = bundle.quality_model
    detector = make_detector(bundle.geometry)
    faces = [prepare_face(p.read_bytes(), detector, bundle.geometry)
             for pair in photo_pairs(20) for p in pair]
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    stability = embed_with_stability(embedder, np.stack([f.crop for f in faces]))[1]

    def score_all() -> None:
        for f, s in zip(faces, stability, strict=True):
            model.assess(Signals.of(f.crop, f.face.landmarks, float(s), f.face.stage))

    score_ms = _p50_ms(score_all, 20) / len(faces)
    one = faces[0].crop[None]
    embed_ms = _p50_ms(lambda: embedder.embed(one), 30)
    stable_ms = _p50_ms(lambda: embed_with_stability(embedder, one), 30)
    result = {"faces": len(faces), "score_ms_per_face_p50": round(score_ms, 4),
              "embed_ms_p50": round(embed_ms, 3), "embed_with_stability_ms_p50": round(stable_ms, 3)}
    print(json.dumps(result, indent=1))
    out = Path("bench/results/quality.json")
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
