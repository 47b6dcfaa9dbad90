"""Helpers shared by the server, client and e2e tests: a model bundle, photos, a live server."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "models" / "default"


def real_model_available() -> bool:
    return (DEFAULT_BUNDLE / "manifest.json").is_file()


def build_bundle(folder: Path) -> Path:
    """models/default when it exists, else a throwaway bundle: a fixed random projection.

    The throwaway embeds any crop, so the whole serving path runs; only the tests about
    recognition quality need the real model (they skip until it lands).
    """
    if real_model_available():
        return DEFAULT_BUNDLE
    import onnx
    from facegate.core.bundle import write_bundle
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 112 * 112, 128)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["embedding"]),
        ],
        "random_projection",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 128])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx_file = folder / "projection.onnx"
    onnx.save(model, onnx_file)
    bundle_dir = folder / "bundle"
    write_bundle(
        bundle_dir,
        onnx_file=onnx_file,
        name="test-projection",
        version="0",
        embedding_size=128,
        threshold=0.5,
        threshold_source="test",
        threshold_provenance="fixed for tests: a random projection, not a face model",
    )
    return bundle_dir


def people(celeba_index: list[tuple[Path, str]]) -> dict[str, list[Path]]:
    """identity -> photo paths, identities with at least 4 photos, in CSV order."""
    out: dict[str, list[Path]] = defaultdict(list)
    for path, identity in celeba_index:
        out[identity].append(path)
    return {k: v for k, v in out.items() if len(v) >= 4}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def blank_png(size: int = 200) -> bytes:
    """A uniform grey image: decodes fine, holds no face."""
    return png_bytes(np.full((size, size, 3), 128, np.uint8))


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()


def huge_declared_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression-bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    bundle: Path, gallery: Path, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python -m facegate serve` on 127.0.0.1:port; returns once /readyz answers 200.

    Its log goes to ``server.log`` next to the gallery (a pipe could fill and block it).
    """
    log = open(gallery.parent / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "facegate", "serve",
            "--bundle", str(bundle), "--gallery", str(gallery),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        cwd=REPO,
        env={**os.environ, "FACEGATE_CPU_WORKERS": "2", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (gallery.parent / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 60 s")
