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


def default_bundle() -> Path:
    """The committed default model bundle (read-only: tests never write into it)."""
    assert (DEFAULT_BUNDLE / "manifest.json").is_file(), f"no model bundle at {DEFAULT_BUNDLE}"
    return DEFAULT_BUNDLE


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
