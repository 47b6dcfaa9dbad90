"""The server's memory budget: small uploads with huge pixel counts, many at once.

A 6000x6000 RGBA PNG of ~250 KB and a 7500x5000 JPEG of ~1.1 MB (both under the 40 M
pixel refusal limit) take 144 and 150 MB each in PIL at full scale, and several
times that while converted. 15 verifies of the pair plus an enrolment of 8 of them,
all at once, took the server's peak RSS from 0.25 to 4.0 GB; decoding at reduced scale
(max_detect_pixels), bounding heavy decodes (heavy_decode_slots) and handing freed
image buffers back to the OS (server.pipeline.map_large_allocations) keep it under 1 GB.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_support import default_bundle, free_port, start_server

PEAK_LIMIT = 1_000_000_000  # bytes of server RSS (VmHWM: the process's peak)
REQUESTS = 16  # 15 verifies of (PNG, JPEG) and one enrolment of 4 + 4
PNG_SIZE = (6000, 6000)
JPEG_SIZE = (7500, 5000)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def worst_case_images(photo: Path) -> tuple[bytes, bytes]:
    """A flat RGBA 6000x6000 PNG and a 7500x5000 JPEG, each holding ``photo`` upscaled so
    its face is found after the reduction to max_detect_pixels."""
    face = Image.open(photo).convert("RGB")
    canvas = Image.new("RGBA", PNG_SIZE, (200, 200, 200, 255))
    canvas.paste(face.resize((face.width * 4, face.height * 4), Image.Resampling.NEAREST), (2500, 2500))
    png = _encode(canvas, "PNG")
    canvas = Image.new("RGB", JPEG_SIZE, (200, 200, 200))
    height = JPEG_SIZE[1] - 100
    big = face.resize((face.width * height // face.height, height), Image.Resampling.BICUBIC)
    canvas.paste(big, ((JPEG_SIZE[0] - big.width) // 2, 50))
    return png, _encode(canvas, "JPEG", quality=90)


def _memory(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(folder: Path, png: bytes, jpeg: bytes, env: dict[str, str] | None = None) -> dict:
    """Start a server, send it REQUESTS concurrent requests of (png, jpeg), return its
    memory before and after, and the responses (the enrolment's last)."""
    port = free_port()
    proc = start_server(default_bundle(), folder / "gallery.sqlite", port, env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        before = _memory(proc.pid)

        def send(i: int) -> httpx.Response:
            if i < REQUESTS - 1:
                files = [("image1", ("big.png", png, "image/png")), ("image2", ("big.jpg", jpeg, "image/jpeg"))]
                return httpx.post(f"{url}/verify", files=files, timeout=600)
            files = [("images", (f"{n}.png", png, "image/png")) for n in range(4)]
            files += [("images", (f"{n}.jpg", jpeg, "image/jpeg")) for n in range(4)]
            return httpx.post(f"{url}/identities", data={"name": "big"}, files=files, timeout=600)

        with ThreadPoolExecutor(REQUESTS) as pool:
            responses = list(pool.map(send, range(REQUESTS)))
        return {"before": before, "after": _memory(proc.pid), "responses": responses}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worst_case(celeba_index) -> tuple[bytes, bytes]:
    return worst_case_images(celeba_index[0][0])


def test_concurrent_huge_images_stay_under_budget(tmp_path, worst_case):
    png, jpeg = worst_case
    # The server's defaults, except the workers: 4 (the default) rather than the tests' 2.
    result = measure(tmp_path, png, jpeg, {"FACEGATE_CPU_WORKERS": "4"})
    peak, rss = result["after"]["VmHWM"], result["after"]["VmRSS"]
    print(f"server RSS {result['before']['VmRSS'] / 1e6:.0f} MB at start, peak {peak / 1e6:.0f} MB, "
          f"{rss / 1e6:.0f} MB after {REQUESTS} concurrent requests of {len(png)} B PNG "
          f"{PNG_SIZE} + {len(jpeg)} B JPEG {JPEG_SIZE}")
    *verifies, enrolment = result["responses"]
    assert enrolment.status_code == 201, enrolment.text
    assert len(enrolment.json()["identity"]["templates"]) == 8
    for response in verifies:
        assert response.status_code == 200, response.text
        png_face, jpeg_face = response.json()["faces"]
        # Boxes come back in the uploads' own pixels, not the reduced images'.
        assert 2500 < png_face["box"][0] < png_face["box"][2] < 2500 + 4 * 250
        assert 1750 < jpeg_face["box"][0] < jpeg_face["box"][2] < 1750 + 4000
    assert peak < PEAK_LIMIT
