"""Two real `facegate serve` replicas on one real PostgreSQL gallery, real photos.

Enrol on A is found by search on B within a bounded delay; deletes propagate; the
consistency report and /metrics see the shared gallery; a replica killed with -9 and
restarted answers as before; while PostgreSQL restarts, writes answer 503 with the
JSON envelope and afterwards every acknowledged template is there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from postgres_support import cluster
from server_support import REPO, default_bundle, free_port, people

PEOPLE = 3
PROPAGATION_BOUND_S = 5.0  # follower poll (2 s) + a catch-up, with slack for a loaded box


class Replica:
    """One `python -m facegate serve` process against the shared database."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "facegate", "serve", "--bundle", str(default_bundle()),
                 "--gallery", self.url, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env={**os.environ, "FACEGATE_CPU_WORKERS": "2"},
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log.read_text(errors='replace')[-2000:]}")
            if self.ready():
                return
            time.sleep(0.2)
        raise RuntimeError("replica did not become ready in 90 s")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120)


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:PEOPLE])
    return {who: [p.read_bytes() for p in paths[:3]] for who, paths in chosen.items()}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    url = cluster().create_database()
    root = tmp_path_factory.mktemp("scaleout")
    pair = [Replica(url, root / "a.log"), Replica(url, root / "b.log")]
    try:
        for r in pair:
            r.start()
        yield pair
    finally:
        for r in pair:
            r.stop()


@pytest.fixture(scope="module")
def probes(replicas, photos) -> dict[str, dict]:
    """Each person's third photo as an embedding body (searches then cost no detection)."""
    out = {}
    with replicas[0].client() as c:
        for who, images in photos.items():
            answer = c.post("/v1/embed", files={"image": ("p.jpg", images[2], "image/jpeg")})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            out[who] = {"model_id": body["model_id"], "vector": body["faces"][0]["embedding"]}
    return out


def enrol(c: httpx.Client, who: str, images: list[bytes]) -> httpx.Response:
    files = [("images", (f"{who}-{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return c.post("/v1/identities", data={"identity_id": who, "name": f"Person {who}"}, files=files)


def best(c: httpx.Client, probe: dict) -> str | None:
    answer = c.post("/v1/search", json={"embedding": probe, "k": 1})
    assert answer.status_code == 200, answer.text
    match = answer.json()["match"]
    return None if match is None else match["identity_id"]


def until(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not reached within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_enrol_on_a_is_found_on_b_and_deletes_propagate(replicas, photos, probes):
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        for who, images in photos.items():
            answer = enrol(ca, who, images[:2])
            assert answer.status_code == 201, answer.text
            delay = until(lambda who=who: best(cb, probes[who]) == who, PROPAGATION_BOUND_S)
            assert delay < PROPAGATION_BOUND_S
        # the shared gallery, whichever replica answers
        for c in (ca, cb):
            ready = c.get("/readyz").json()
            assert (ready["identities"], ready["templates"]) == (PEOPLE, 2 * PEOPLE)
            assert c.get("/v1/identities").json()["total"] == PEOPLE
        # Search's open-set threshold follows the shared gallery's size on every replica.
        probe = {"embedding": next(iter(probes.values())), "k": 1}
        decided = [c.post("/v1/search", json=probe).json() for c in (ca, cb)]
        assert [d["gallery"] for d in decided] == [{"identities": PEOPLE,
                                                    "templates": 2 * PEOPLE}] * 2
        assert decided[0]["threshold"] == decided[1]["threshold"]
        report = cb.get("/v1/consistency").json()
        assert report["identities"] == PEOPLE and set(report["per_identity"]) == set(photos)
        assert report["operating_points"]["search"]["threshold"] == decided[0]["threshold"]
        metrics = cb.get("/metrics").text
        assert f"facegate_gallery_identities {PEOPLE}.0" in metrics
        # delete on B, gone from A's search
        gone = next(iter(photos))
        assert cb.delete(f"/v1/identities/{gone}").status_code == 200
        until(lambda: best(ca, probes[gone]) != gone, PROPAGATION_BOUND_S)
        assert enrol(cb, gone, photos[gone][:2]).status_code == 201  # back, via B this time
        until(lambda: best(ca, probes[gone]) == gone, PROPAGATION_BOUND_S)


def test_replica_killed_with_sigkill_rebuilds_and_answers_the_same(replicas, photos, probes):
    a, b = replicas
    with b.client() as cb:
        before = {who: cb.post("/v1/search", json={"embedding": p, "k": 3}).json()["candidates"]
                  for who, p in probes.items()}
    b.kill9()
    b.start()
    with b.client() as cb:
        after = {who: cb.post("/v1/search", json={"embedding": p, "k": 3}).json()["candidates"]
                 for who, p in probes.items()}
    assert after == before
    assert all(before[who][0]["identity_id"] == who for who in photos)


def test_database_restart_writes_503_then_recover_nothing_lost(replicas, photos, probes):
    a, b = replicas
    db = cluster()
    with a.client() as ca, b.client() as cb:
        acknowledged = {
            who: {t["template_id"] for t in ca.get(f"/v1/identities/{who}").json()["templates"]}
            for who in photos
        }
        who = next(iter(photos))
        db.stop()
        try:
            answer = ca.post(f"/v1/identities/{who}/templates",
                             files=[("images", ("x.jpg", photos[who][2], "image/jpeg"))])
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "gallery_unavailable"
            assert "retry" in answer.json()["error"]["message"]
            deleted = cb.delete(f"/v1/identities/{who}")
            assert deleted.status_code == 503 and deleted.json()["error"]["code"] == "gallery_unavailable"
            until(lambda: not a.ready() and not b.ready(), 15)
        finally:
            db.start()
        until(lambda: a.ready() and b.ready(), 30)
        added = cb.post(f"/v1/identities/{who}/templates",
                        files=[("images", ("x.jpg", photos[who][2], "image/jpeg"))])
        assert added.status_code in (200, 201), added.text
        new_ids = {i["template_id"] for i in added.json()["images"] if i.get("template_id")}
        acknowledged[who] |= new_ids
        for who_, ids in acknowledged.items():
            for c in (ca, cb):
                stored = {t["template_id"] for t in c.get(f"/v1/identities/{who_}").json()["templates"]}
                assert stored == ids
            until(lambda who_=who_: best(ca, probes[who_]) == who_, PROPAGATION_BOUND_S)


def test_compose_file_parses_and_configures_real_settings():
    """deploy/compose.yaml is not run here (no Docker engine): check what can be checked."""
    import yaml
    from facegate.server.settings import Settings

    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    assert {"postgres", "facegate", "nginx"} <= set(compose["services"])
    env = compose["services"]["facegate"]["environment"]
    names = {f"FACEGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= names, set(env) - names
    assert env["FACEGATE_GALLERY"].startswith("postgresql://")
    assert "proxy_pass http://facegate" in compose["configs"]["nginx-conf"]["content"]


def test_bench_scaleout_part_smoke(tmp_path):
    """`python -m bench --part scaleout` at tiny sizes: real PostgreSQL, 1 and 2 replicas."""
    sys.path.insert(0, str(REPO))
    from bench import scaleout

    result = scaleout.run(scaleout.SIZES["smoke"], tmp_path)
    assert [r["replicas"] for r in result["rows"]] == [1, 2]
    assert all(r["search"]["failures"] == 0 and r["search"]["per_s"] > 0 for r in result["rows"])
    assert all(r["store_enrol"]["failures"] == 0 for r in result["rows"])
    prop = result["propagation"]
    assert prop["store_to_b"]["n"] == scaleout.SIZES["smoke"]["propagation_samples"]
    assert prop["store_to_b"]["p99_ms"] < PROPAGATION_BOUND_S * 1000
    text = scaleout.markdown(result)
    assert "| 10,000,000 |" in text and "Propagation with 2 replicas" in text
