"""FACEGATE_DETECT_PROCESSES: decode/detect/align in worker processes (dlib's detectors hold
the GIL, so threads share one core). A real server on 127.0.0.1 with real photos: the
same answers as the threaded server, errors still in the envelope, the workers are
child processes, and a clean shutdown leaves none behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from server_support import blank_png, default_bundle, free_port, people, start_server


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


@pytest.fixture(scope="module")
def photos(celeba_index) -> tuple[bytes, bytes, bytes]:
    same = list(people(celeba_index).values())
    return same[2][0].read_bytes(), same[2][1].read_bytes(), same[3][0].read_bytes()


def verify(url: str, a: bytes, b: bytes) -> httpx.Response:
    files = {"image1": ("a.jpg", a, "image/jpeg"), "image2": ("b.jpg", b, "image/jpeg")}
    return httpx.post(f"{url}/v1/verify", files=files, timeout=60)


def test_worker_processes_answer_as_threads_do(tmp_path, photos):
    a, b, other = photos
    answers = {}
    for processes in ("false", "true"):
        port = free_port()
        folder = tmp_path / processes
        folder.mkdir()
        proc = start_server(default_bundle(), folder / "gallery.sqlite", port,
                            {"FACEGATE_DETECT_PROCESSES": processes})
        url = f"http://127.0.0.1:{port}"
        try:
            workers = children(proc.pid)
            if processes == "true":
                assert len(workers) >= 2  # FACEGATE_CPU_WORKERS=2 (server_support)
            same, different = verify(url, a, b), verify(url, a, other)
            assert same.status_code == different.status_code == 200, same.text
            no_face = verify(url, a, blank_png())
            assert no_face.status_code == 422 and no_face.json()["error"]["code"] == "no_face"
            answers[processes] = (same.json()["similarity"], different.json()["similarity"],
                                  same.json()["faces"])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() for w in workers)  # no orphaned workers
    threaded, in_processes = answers["false"], answers["true"]
    assert in_processes[0] == pytest.approx(threaded[0], abs=1e-6)
    assert in_processes[1] == pytest.approx(threaded[1], abs=1e-6)
    assert in_processes[2] == threaded[2]
