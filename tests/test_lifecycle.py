"""Start-up states and shutdown of the real `facegate serve` process: a gallery that is
empty, foreign, damaged, newer or unreachable is refused with one plain line and its own
exit status (no traceback, the file untouched); an oversized header gets the 400
envelope, not a TCP reset; on SIGTERM a request still running at the graceful timeout
gets the 503 envelope and the process is gone within the timeout plus a small margin."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from facegate.gallery import Gallery
from facegate.gallery.opening import DamagedGallery, ForeignGallery, NewerGallerySchema
from facegate.gallery.postgres import PostgresGallery
from facegate.server.http import SHUTDOWN_MARGIN_S
from postgres_support import cluster
from server_support import REPO, default_bundle, free_port, people, start_server

SHUTDOWN_TIMEOUT_S = 2.0


def serve(gallery: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "facegate", "serve", "--bundle", str(default_bundle()),
         "--gallery", str(gallery), "--port", str(free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def real_gallery(path: Path) -> Path:
    with Gallery(path, model_id="m", embedding_size=4) as g:
        g.create_identity("a", embeddings=np.array([[1, 0, 0, 0]], np.float32))
    return path


def galleries(root: Path) -> dict[str, tuple[str | Path, int, str]]:
    """name -> (gallery, exit status, words of the message)."""
    empty = root / "empty.sqlite"
    empty.touch()
    text = root / "notes.sqlite"
    text.write_text("not a database\n" * 10)
    foreign = root / "other-app.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    dropped = real_gallery(root / "dropped.sqlite")
    with sqlite3.connect(dropped) as db:
        db.execute("DROP TABLE templates")
    newer = real_gallery(root / "newer.sqlite")
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    return {
        "empty": (empty, 4, "empty (0 bytes)"),
        "not sqlite": (text, 5, "not a SQLite file"),
        "another application": (foreign, 5, "another application (tables: users)"),
        "missing table": (dropped, 6, "lacks its table(s) templates"),
        "newer schema": (newer, 7, "schema 99 is newer than this facegate's"),
        "unreachable": (f"postgresql://postgres@127.0.0.1:{free_port()}/gallery", 8,
                        "cannot be reached"),
    }


def test_each_refused_gallery_has_its_message_and_exit_status(tmp_path):
    cases = galleries(tmp_path)
    before = {n: Path(g).read_bytes() for n, (g, *_) in cases.items() if Path(g).is_file()}
    running = {name: serve(gallery) for name, (gallery, *_) in cases.items()}  # all at once
    for name, proc in running.items():
        _, err = proc.communicate(timeout=120)
        _, status, words = cases[name]
        assert proc.returncode == status, (name, err)
        assert words in err and "refusing to start" in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
    after = {n: Path(g).read_bytes() for n, (g, *_) in cases.items() if Path(g).is_file()}
    assert after == before  # nothing was created in any of them


def test_the_stores_refuse_the_same_states(tmp_path):
    cases = galleries(tmp_path)
    with pytest.raises(DamagedGallery, match="lacks its table"):
        Gallery(cases["missing table"][0], model_id="m", embedding_size=4)
    with pytest.raises(ForeignGallery):
        Gallery(cases["another application"][0], model_id="m", embedding_size=4)
    url = cluster().create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE identities (id serial PRIMARY KEY)")
    with pytest.raises(ForeignGallery, match="no facegate migration record"):
        PostgresGallery(url, model_id="m", embedding_size=4)
    url = cluster().create_database()
    PostgresGallery(url, model_id="m", embedding_size=4).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE templates CASCADE")
    with pytest.raises(DamagedGallery, match="templates"):
        PostgresGallery(url, model_id="m", embedding_size=4)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO facegate_migrations (version, name) VALUES (99, 'future')")
    with pytest.raises(NewerGallerySchema):
        PostgresGallery(url, model_id="m", embedding_size=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    port = free_port()
    proc = start_server(default_bundle(), root / "gallery.sqlite", port, env={
        "FACEGATE_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S), "FACEGATE_BODY_TIMEOUT_S": "60",
    })
    yield proc, port, root / "server.log"
    if proc.poll() is None:
        proc.kill()


def read_all(sock: socket.socket, limit_s: float = 10) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_an_oversized_header_gets_the_400_envelope(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:200]
    assert b'"code": "bad_request"' in body or b'"code":"bad_request"' in body, body


def test_sigterm_finishes_or_envelopes_requests_and_exits_in_time(server, celeba_index):
    proc, port, log = server
    photos = [p.read_bytes() for p in next(iter(people(celeba_index).values()))[:2]]
    stalled = socket.create_connection(("127.0.0.1", port))  # a body that never completes
    stalled.sendall(b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
                    b" boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
    answers: list[httpx.Response] = []
    verify = threading.Thread(target=lambda: answers.append(httpx.post(
        f"http://127.0.0.1:{port}/v1/verify", timeout=30,
        files={"image1": ("1.jpg", photos[0]), "image2": ("2.jpg", photos[1])})))
    verify.start()
    time.sleep(0.3)  # both in flight
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    cut = read_all(stalled, limit_s=SHUTDOWN_TIMEOUT_S + 10)
    stalled.close()
    proc.wait(timeout=SHUTDOWN_TIMEOUT_S + SHUTDOWN_MARGIN_S + 10)
    exited_s = time.monotonic() - start
    verify.join(timeout=30)
    assert cut.startswith(b"HTTP/1.1 503") and b"shutting_down" in cut, cut[:300]
    (answer,) = answers
    assert answer.status_code == 200 or answer.json()["error"]["code"] == "shutting_down"
    print(f"SIGTERM to exit {exited_s:.2f} s (graceful timeout {SHUTDOWN_TIMEOUT_S:g} s), "
          f"exit status {proc.returncode}")
    assert exited_s <= SHUTDOWN_TIMEOUT_S + SHUTDOWN_MARGIN_S, exited_s
    # uvicorn re-raises the signal it handled once it has shut down: killed by SIGTERM
    assert proc.returncode == -signal.SIGTERM, proc.returncode
    assert "Traceback" not in log.read_text(errors="replace")
