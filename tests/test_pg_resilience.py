"""A PostgreSQL gallery that stops answering costs seconds, never the server: with the real
database paused (SIGSTOP of all its processes: connections accepted, nothing answered)
or stopped, writes fail with 503 within the gallery's deadline, /readyz answers 503 in
under a second throughout, the server is ready again soon after the database returns,
and nothing acknowledged is lost. Real PostgreSQL, real server, real photos."""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest
from facegate.gallery.pg_follow import GalleryUnavailable
from facegate.gallery.postgres import PostgresGallery
from facegate.server.http import SHUTDOWN_MARGIN_S
from postgres_support import cluster, paused
from server_support import people
from test_scaleout import Replica, enrol

DIM = 32
# The outage lasts as long as the checks: about 3 s plus this (FACEGATE_TEST_PAUSE_S=17
# for the 20 s pause of issue 27).
PAUSE_TAIL_S = float(os.environ.get("FACEGATE_TEST_PAUSE_S", "2"))
WRITE_BOUND_S = 3.0
READY_PROBE_BOUND_S = 1.0
RECOVERY_BOUND_S = 3.0
pytestmark = pytest.mark.usefixtures("single_threaded_faiss")


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def test_a_paused_database_answers_within_the_deadline(single_threaded_faiss):
    rng = np.random.default_rng(0)
    url = cluster().create_database()
    with PostgresGallery(url, model_id="m", embedding_size=DIM, timeout_s=1.0, poll_s=0.5) as g:
        kept = g.create_identity("kept", embeddings=unit(rng, 1))
        with paused():
            for call in (lambda: g.create_identity("lost", embeddings=unit(rng, 1)),
                         lambda: g.list_identities(), lambda: g.delete_identity("kept")):
                start = time.monotonic()
                with pytest.raises(GalleryUnavailable, match="unavailable"):
                    call()
                assert time.monotonic() - start < 1.0 + 0.5
        g.create_identity("after", embeddings=unit(rng, 1))
        page, total = g.list_identities()
        assert total == 2 and {i.identity_id for i in page} == {"kept", "after"}
        assert g.get_identity("kept").templates == kept.templates


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:2])
    return {who: [p.read_bytes() for p in paths[:1]] for who, paths in chosen.items()}


@pytest.fixture
def replica(tmp_path):
    r = Replica(cluster().create_database(), tmp_path / "replica.log")
    r.start()
    yield r
    r.stop()


def readyz(c: httpx.Client) -> tuple[httpx.Response, float]:
    return timed(lambda: c.get("/readyz", timeout=5))


def until_ready(c: httpx.Client, bound_s: float) -> float:
    start = time.monotonic()
    while readyz(c)[0].status_code != 200:
        assert time.monotonic() - start < bound_s, f"not ready {bound_s} s after the database"
        time.sleep(0.05)
    return time.monotonic() - start


def assert_outage(c: httpx.Client, photos: dict[str, list[bytes]]) -> None:
    """During an outage (as long as these checks, PAUSE_TAIL_S + about 5 s): writes 503 within
    WRITE_BOUND_S (an enrolment before any of its photos is processed), /readyz 503 within
    a second, with the model fields filled, every time it is asked."""
    (kept, _), (lost, lost_photos) = photos.items()
    seconds: dict[str, list[float]] = {"readyz": []}

    def probe_readiness(for_s: float) -> None:
        start = time.monotonic()
        while time.monotonic() - start < for_s:
            answer, took = readyz(c)
            assert answer.status_code == 503 and took <= READY_PROBE_BOUND_S, (answer.text, took)
            assert answer.json()["model_id"] and not answer.json()["ready"]
            seconds["readyz"].append(took)

    probe_readiness(1.0)
    deleted, seconds["delete"] = timed(lambda: c.delete(f"/v1/identities/{kept}"))
    assert deleted.status_code == 503, (deleted.text, seconds)
    assert deleted.json()["error"]["code"] == "gallery_unavailable"
    assert seconds["delete"] <= WRITE_BOUND_S, seconds
    enrolled, seconds["enrol"] = timed(lambda: enrol(c, lost, lost_photos))
    assert enrolled.status_code == 503 and seconds["enrol"] <= WRITE_BOUND_S, (enrolled.text,
                                                                            seconds)
    probe_readiness(PAUSE_TAIL_S)
    print("during the outage: " + ", ".join(
        f"{k} {max(v) if isinstance(v, list) else v:.2f} s" for k, v in seconds.items()))
    assert len(seconds["readyz"]) >= 3


def assert_nothing_lost(c: httpx.Client, photos: dict[str, list[bytes]]) -> None:
    (kept, _), (lost, _) = photos.items()
    assert c.get(f"/v1/identities/{kept}").status_code == 200  # the failed delete did nothing
    assert c.get(f"/v1/identities/{lost}").status_code == 404  # nor the failed enrolment
    listed = c.get("/v1/identities")
    assert listed.status_code == 200 and listed.json()["total"] == 1


def test_the_server_survives_a_paused_database(replica, photos):
    (kept, kept_photos), _ = photos.items()
    with replica.client() as c:
        assert enrol(c, kept, kept_photos).status_code == 201
        with paused():
            assert_outage(c, photos)
        print(f"ready {until_ready(c, RECOVERY_BOUND_S):.2f} s after the database resumed")
        assert_nothing_lost(c, photos)


def test_the_server_survives_a_stopped_database(replica, photos):
    (kept, kept_photos), _ = photos.items()
    db = cluster()
    with replica.client() as c:
        assert enrol(c, kept, kept_photos).status_code == 201
        db.stop()
        try:
            assert_outage(c, photos)
        finally:
            db.start()
        print(f"ready {until_ready(c, RECOVERY_BOUND_S):.2f} s after the database restarted")
        assert_nothing_lost(c, photos)


def test_sigterm_with_the_database_paused_exits_in_bounded_time(tmp_path, monkeypatch):
    """Shutdown while the database answers nothing: the follower and the pool cannot close
    cleanly, and the process is still gone SHUTDOWN_MARGIN_S after the graceful timeout."""
    monkeypatch.setenv("FACEGATE_SHUTDOWN_TIMEOUT_S", "1")
    r = Replica(cluster().create_database(), tmp_path / "replica.log")
    r.start()
    try:
        with paused():
            time.sleep(2.5)  # the follower's poll (2 s) now waits on the database (30 s deadline)
            start = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            r.proc.wait(timeout=1 + SHUTDOWN_MARGIN_S + 10)
            exited_s = time.monotonic() - start
        print(f"SIGTERM to exit with the database paused: {exited_s:.2f} s, "
              f"status {r.proc.returncode}")
        assert exited_s <= 1 + SHUTDOWN_MARGIN_S + 0.5, exited_s
    finally:
        r.stop()
