"""The audit trail on the real app and a real SQLite gallery: every enrolment, template
change, deletion, search and verify is recorded with the key's name (never its secret),
the request id, the identity and the outcome; readable with an admin key only; kept
across restarts; never holding a name, an image or a vector."""

from __future__ import annotations

import sqlite3

import pytest
from facegate.server.app import create_app
from facegate.server.keys import KeyFile
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import default_bundle, people


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    (who, paths), (other, _) = list(people(celeba_index).items())[:2]
    return {who: [p.read_bytes() for p in paths[:3]], "other": [_[0].read_bytes()]}


def test_every_gallery_action_is_audited_with_its_key_and_request_id(tmp_path, photos):
    keys = KeyFile(tmp_path / "keys.json")
    kiosk, desk, ops = (keys.create(n, [s]) for n, s in (("kiosk", "verify"), ("desk", "enrol"),
                                                          ("ops", "admin")))
    gallery = tmp_path / "g.sqlite"
    settings = Settings(bundle=default_bundle(), gallery=gallery, keys_file=tmp_path / "keys.json",
                        cpu_workers=2, keep_crops=True)
    who = next(k for k in photos if k != "other")
    name = "Ada Secretname"
    with TestClient(create_app(settings)) as c:
        files = [("images", (f"{i}.jpg", img)) for i, img in enumerate(photos[who][:2])]
        enrolled = c.post("/v1/identities", data={"name": name, "identity_id": "p1"}, files=files,
                          headers={"X-API-Key": desk, "X-Request-ID": "req-enrol"})
        assert enrolled.status_code == 201
        probe = {"image": ("p.jpg", photos[who][2])}
        assert c.post("/v1/verify/identity", files=probe, data={"identity_id": "p1"},
                      headers={"X-API-Key": kiosk, "X-Request-ID": "req-verify"}).json()["match"]
        assert c.post("/v1/search", files={"image": ("o.jpg", photos["other"][0])},
                      headers={"X-API-Key": kiosk, "X-Request-ID": "req-search"}).status_code == 200
        assert c.delete("/v1/identities/p1", headers={"X-API-Key": kiosk}).status_code == 403
        assert c.delete("/v1/identities/p1", headers={"X-API-Key": ops,
                                                      "X-Request-ID": "req-delete"}).status_code == 200
        assert c.get("/v1/audit", headers={"X-API-Key": kiosk}).status_code == 403
        rows = c.get("/v1/audit", headers={"X-API-Key": ops}).json()["records"]
    seen = [(r["action"], r["key_name"], r["identity_id"], r["outcome"], r["request_id"]) for r in rows]
    assert ("enrol", "desk", "p1", "ok", "req-enrol") in seen
    assert ("verify_identity", "kiosk", "p1", "match", "req-verify") in seen
    assert ("search", "kiosk", None, "no_match", "req-search") in seen
    assert any(s[:4] == ("delete_identity", "kiosk", "p1", "insufficient_scope") for s in seen)
    assert ("delete_identity", "ops", "p1", "ok", "req-delete") in seen
    assert [r["row_id"] for r in rows] == sorted((r["row_id"] for r in rows), reverse=True)

    with TestClient(create_app(settings)) as c:  # a restart keeps the trail
        page = c.get("/v1/audit", params={"identity_id": "p1", "limit": 2},
                     headers={"X-API-Key": ops}).json()
        assert len(page["records"]) == 2 and page["next_before"] is not None
        older = c.get("/v1/audit", params={"identity_id": "p1", "before": page["next_before"]},
                      headers={"X-API-Key": ops}).json()["records"]
        assert {r["action"] for r in page["records"] + older} >= {"enrol", "verify_identity",
                                                                  "delete_identity"}
    with sqlite3.connect(gallery) as db:
        stored = repr(db.execute("SELECT * FROM audit").fetchall())
    for secret in (kiosk, desk, ops, name):
        assert secret not in stored
