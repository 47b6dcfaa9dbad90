"""What the console needs from the server, in-process with real photos: its files (local
only, strict CSP), the alignment geometry, and GET /v1/consistency/live."""

from __future__ import annotations

import re

import pytest
from facegate.server.app import create_app
from facegate.server.routers.console import STATIC
from facegate.server.routers.monitoring import score_histogram
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import default_bundle

API = {"X-API-Key": "k"}
ADMIN = {"X-API-Key": "k", "X-Admin-Key": "a"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    gallery = tmp_path_factory.mktemp("console-api") / "gallery.sqlite"
    settings = Settings(
        bundle=default_bundle(), gallery=gallery, api_key="k", admin_key="a", cpu_workers=2
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_console_is_served_with_a_strict_policy(client):
    r = client.get("/console", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/console/"
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp
    assert '<script type="module" src="main.js">' in page.text
    script = client.get("/console/main.js")
    assert script.headers["content-type"].startswith("text/javascript")
    for path in ("/console/nope.js", "/console/.hidden.js", "/console/app.py", "/console/..%2Fapp.py"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


def test_console_files_load_nothing_from_elsewhere():
    """No CDN, no web fonts: every URL in the console's files is relative to this server."""
    files = sorted(STATIC.iterdir())
    assert {f.suffix for f in files} <= {".html", ".js", ".css"}
    for f in files:
        text = f.read_text()
        assert not re.search(r"https?://|//cdn|@import|url\(", text), f.name
    assert "sessionStorage" in (STATIC / "api.js").read_text()


def test_geometry_places_the_landmarks_inside_the_crop(client):
    geometry = client.get("/console/geometry.json").json()
    assert geometry["method"] == "dlib_chip" and geometry["size"] == 150
    assert len(geometry["points"]) == 5
    (lx, ly), (rx, ry) = geometry["points"][:2]
    assert 0 < lx < rx < 150 and abs(ly - ry) < 1  # eyes level, left before right
    assert all(0 < v < 150 for p in geometry["points"] for v in p)


def test_score_histogram_splits_by_decision_and_covers_the_threshold():
    bins = score_histogram([(0.5, False), (0.95, True), (0.97, True), (0.99, True)], 0.9, 5)
    assert bins[0].lo == 0.5 and bins[-1].hi == 0.99
    assert sum(b.no_match for b in bins) == 1 and sum(b.match for b in bins) == 3
    assert bins[-1].match == 3  # the last bin is closed: 0.99 counts
    assert score_histogram([(0.95, True)], 0.5, 4)[0].lo == 0.5
    assert score_histogram([], 0.9, 10) == []


def test_live_scores_follow_verify_identity_decisions(client, celeba_index):
    assert client.get("/v1/consistency/live").status_code == 401
    empty = client.get("/v1/consistency/live", headers=API).json()
    assert empty["decisions"] == 0 and empty["bins"] == [] and empty["routes"] == ["verify_identity"]

    photos = {who: [p for p, i in celeba_index if i == who][:3] for who in ("7202", "7203")}
    for who, paths in photos.items():
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:2]]
        r = client.post("/v1/identities", data={"identity_id": who, "name": who}, files=files, headers=ADMIN)
        assert r.status_code == 201, r.text
    probe = photos["7202"][2].read_bytes()
    outcomes = []
    for who in ("7202", "7203"):
        r = client.post("/v1/verify/identity", data={"identity_id": who},
                        files={"image": ("p.jpg", probe, "image/jpeg")}, headers=API)
        assert r.status_code == 200, r.text
        outcomes.append((r.json()["similarity"], r.json()["match"]))
    assert [m for _, m in outcomes] == [True, False]

    live = client.get("/v1/consistency/live", params={"bins": 10}, headers=API).json()
    assert live["decisions"] == 2 and live["matches"] == 1 and len(live["bins"]) == 10
    assert sum(b["match"] for b in live["bins"]) == 1 and sum(b["no_match"] for b in live["bins"]) == 1
    assert live["bins"][0]["lo"] <= min(s for s, _ in outcomes)
    assert live["bins"][-1]["hi"] >= max(s for s, _ in outcomes)
    assert live["bins"][0]["lo"] <= live["threshold"] <= live["bins"][-1]["hi"]
    r = client.get("/v1/consistency/live", params={"bins": 0}, headers=API)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
