"""Does detection use more than one core from threads? ``python -m bench.gil``

Runs the server's detector (``core.face.make_detector`` for the default bundle) over the
same 40 shared photos from one thread, then split across two threads, and prints both
times. dlib's detectors hold Python's GIL, so two threads take longer than one; the
server's ``FACEGATE_DETECT_PROCESSES`` exists for this (docs/server.md).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.assets import photo_pairs, resolve_bundle


def main() -> None:
    from facegate.core.bundle import load_bundle
    from facegate.core.face import make_detector
    from facegate.core.image import decode

    bundle = load_bundle(resolve_bundle(Path("runs/bench"))[0])
    images = [decode(p.read_bytes()) for pair in photo_pairs(20) for p in pair]
    detectors = [make_detector(bundle.geometry) for _ in range(2)]
    for image in images[:2]:  # load the models before timing
        detectors[0].detect(image), detectors[1].detect(image)

    def run(detector, chunk) -> None:
        for image in chunk:
            detector.detect(image)

    start = time.perf_counter()
    run(detectors[0], images)
    one = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, detectors, [images[::2], images[1::2]]))
    two = time.perf_counter() - start
    print(f"{len(images)} photos: 1 thread {one:.2f} s, 2 threads {two:.2f} s "
          f"({one / two:.2f}x the speed of one thread)")


if __name__ == "__main__":
    main()
