"""Least privilege and abuse controls on the real app (TestClient runs the real lifespan):
named keys with scopes from a key file, the legacy keys, the lockout after repeated wrong
keys, per-key rates, and /metrics without identity ids."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from facegate.server.abuse import AuthFailures, RateLimiter
from facegate.server.app import create_app
from facegate.server.keys import KeyFile
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import REPO, default_bundle, people


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:2])
    return {who: [p.read_bytes() for p in paths[:3]] for who, paths in chosen.items()}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with a key file: a verify key, an enrol key, an admin key, a slow key."""
    root = tmp_path_factory.mktemp("keys")
    keys = KeyFile(root / "keys.json")
    secrets = {
        "verify": keys.create("kiosk", ["verify"]),
        "enrol": keys.create("desk", ["enrol"]),
        "admin": keys.create("ops", ["admin"]),
        "slow": keys.create("slow", ["verify"], rate_per_s=1.0),
    }
    settings = Settings(
        bundle=default_bundle(), gallery=root / "g.sqlite", keys_file=root / "keys.json",
        cpu_workers=2, auth_failure_limit=20,
    )
    with TestClient(create_app(settings)) as c:
        yield c, {k: {"X-API-Key": v} for k, v in secrets.items()}, keys


def _enrol(c, who, images, headers):
    files = [("images", (f"{i}.jpg", img)) for i, img in enumerate(images)]
    return c.post("/v1/identities", data={"identity_id": who, "name": who}, files=files, headers=headers)


def test_a_verify_key_never_writes_and_each_scope_does_its_part(keyed, photos):
    c, h, _ = keyed
    (who, images), (other, more) = list(photos.items())
    assert c.get("/v1/identities").status_code == 401  # a key file: nothing is open
    refused = _enrol(c, who, images[:2], h["verify"])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
    assert _enrol(c, who, images[:2], h["enrol"]).status_code == 201
    assert _enrol(c, other, more[:1], h["admin"]).status_code == 201
    files = {"images": ("x.jpg", images[2])}
    assert c.post(f"/v1/identities/{who}/templates", files=files, headers=h["verify"]).status_code == 403
    for path in (f"/v1/identities/{who}", f"/v1/identities/{who}/templates/any"):
        assert c.delete(path, headers=h["verify"]).status_code == 403
        assert c.delete(path, headers=h["enrol"]).status_code == 403  # enrol never deletes
    assert c.get("/v1/identities", headers=h["enrol"]).status_code == 403  # nor reads
    probe = {"image": ("p.jpg", images[2])}
    assert c.post("/v1/search", files=probe, headers=h["verify"]).json()["match"]["identity_id"] == who
    assert c.delete(f"/v1/identities/{other}", headers=h["admin"]).status_code == 200


def test_a_revoked_key_stops_working_without_a_restart(keyed):
    c, _, keys = keyed
    secret = keys.create("temp", ["verify"])
    assert c.get("/v1/identities", headers={"X-API-Key": secret}).status_code == 200
    keys.revoke("temp")
    assert c.get("/v1/identities", headers={"X-API-Key": secret}).status_code == 403


def test_a_key_over_its_rate_gets_429(keyed):
    c, h, _ = keyed
    codes = [c.get("/v1/identities", headers=h["slow"]).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[-1] == 429  # burst of 2 s at 1/s, then refused
    refused = c.get("/v1/identities", headers=h["slow"])
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1


def test_fifty_wrong_keys_get_429_with_retry_after_and_a_metric(tmp_path):
    settings = Settings(bundle=default_bundle(), gallery=tmp_path / "g.sqlite", api_key="right",
                        cpu_workers=1, auth_lockout_s=30)
    with TestClient(create_app(settings)) as c:
        codes = [c.get("/v1/identities", headers={"X-API-Key": f"guess-{i}"}).status_code
                 for i in range(50)]
        assert codes[:20] == [403] * 20 and codes[-1] == 429
        locked = c.get("/v1/identities", headers={"X-API-Key": "right"})  # even the right key
        assert locked.status_code == 429 and locked.json()["error"]["code"] == "auth_locked_out"
        assert 1 <= int(locked.headers["retry-after"]) <= 30
        metrics = c.get("/metrics").text
        assert 'facegate_auth_refused_total{reason="wrong_key"} 20.0' in metrics
        assert "facegate_auth_lockouts_total 1.0" in metrics


def test_the_api_key_alone_verifies_but_does_not_enrol(tmp_path, photos):
    who, images = next(iter(photos.items()))
    settings = Settings(bundle=default_bundle(), gallery=tmp_path / "g.sqlite", api_key="k", cpu_workers=1)
    with TestClient(create_app(settings)) as c:
        refused = _enrol(c, who, images[:1], {"X-API-Key": "k"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
        assert c.get("/v1/identities", headers={"X-API-Key": "k"}).status_code == 200
    opted = settings.model_copy(update={"api_key_scopes": ["verify", "enrol"]})
    with TestClient(create_app(opted)) as c:
        assert _enrol(c, who, images[:1], {"X-API-Key": "k"}).status_code == 201


def test_metrics_can_require_a_metrics_key(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    scraper, kiosk = keys.create("prom", ["metrics"]), keys.create("kiosk", ["verify"])
    settings = Settings(bundle=default_bundle(), gallery=tmp_path / "g.sqlite", cpu_workers=1,
                        keys_file=tmp_path / "keys.json", metrics_require_key=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": kiosk}).status_code == 403
        assert c.get("/metrics", headers={"X-API-Key": scraper}).status_code == 200
        assert c.get("/v1/identities", headers={"X-API-Key": scraper}).status_code == 403


def test_lockout_and_rate_rules():
    failures = AuthFailures(limit=3, window_s=10, lockout_s=5)
    assert not failures.fail("a", 0) and not failures.fail("a", 11)  # the first fell out
    assert not failures.fail("a", 12) and failures.fail("a", 13)
    assert failures.retry_after("a", 14) == 4 and failures.retry_after("b", 14) is None
    assert failures.retry_after("a", 18.5) is None
    rates = RateLimiter()
    assert [rates.take("k", 2.0, 0) for _ in range(5)] == [None] * 4 + [1]
    assert rates.take("k", 2.0, 0.5) is None  # a token back after 1/rate


def test_keys_cli_prints_a_secret_once_and_stores_only_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    run = [sys.executable, "-m", "facegate", "keys", "--keys-file", str(path)]
    made = subprocess.run([*run, "create", "kiosk", "--scope", "verify"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    secret = made.stdout.strip()
    assert secret.startswith("fg_") and secret not in path.read_text()
    assert (path.stat().st_mode & 0o077) == 0
    subprocess.run([*run, "revoke", "kiosk"], cwd=REPO, check=True, capture_output=True)
    listed = subprocess.run([*run, "list"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "kiosk\tverify\trevoked" in listed.stdout


def test_one_caller_cannot_fill_an_identitys_live_decisions(tmp_path):
    """A key flooding verify/identity for one person keeps only its last 20 decisions
    there, so the consistency monitor's observed figures stay other callers' too."""
    import numpy as np
    from facegate.gallery.audit import CALLER, DECISIONS_PER_CALLER
    from facegate.gallery.store import Gallery

    with Gallery(tmp_path / "g.sqlite", model_id="m", embedding_size=4) as g:
        g.create_identity("p", embeddings=np.array([[1.0, 0, 0, 0]], np.float32))
        for caller, similarity, accepted, times in (("flood", 0.1, False, 60), ("door", 0.9, True, 5)):
            token = CALLER.set(caller)
            try:
                for _ in range(times):
                    g.record_decision("p", similarity, accepted, "verify_identity")
            finally:
                CALLER.reset(token)
        kept = g.decisions()["p"]
    assert len(kept) == DECISIONS_PER_CALLER + 5 and sum(a for _, a in kept) == 5


def test_open_connections_are_capped(tmp_path):
    """FACEGATE_MAX_CONNECTIONS on a real `facegate serve`: past the cap, 503 at once."""
    import socket

    import httpx
    from server_support import free_port, start_server

    port = free_port()
    proc = start_server(default_bundle(), tmp_path / "g.sqlite", port,
                        env={"FACEGATE_MAX_CONNECTIONS": "3"})
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.3)
        with httpx.Client() as c:  # a third connection: over the cap, the envelope
            refused = c.get(f"http://127.0.0.1:{port}/healthz")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert refused.headers["connection"] == "close"
            for _ in range(20):
                assert c.get(f"http://127.0.0.1:{port}/healthz").status_code == 503
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log = (tmp_path / "server.log").read_text()
    assert log.count("over FACEGATE_MAX_CONNECTIONS") == 1  # 21 refusals, one line


def test_a_key_header_the_server_has_no_key_for_is_ignored_as_before(tmp_path):
    open_server = Settings(bundle=default_bundle(), gallery=tmp_path / "a.sqlite", cpu_workers=1)
    with TestClient(create_app(open_server)) as c:
        assert c.get("/v1/identities", headers={"X-Admin-Key": "x", "X-API-Key": "y"}).status_code == 200
    api_only = open_server.model_copy(update={"gallery": tmp_path / "b.sqlite", "api_key": "k"})
    with TestClient(create_app(api_only)) as c:
        assert c.get("/v1/identities", headers={"X-API-Key": "k", "X-Admin-Key": "x"}).status_code == 200
