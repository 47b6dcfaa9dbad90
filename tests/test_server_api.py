"""The HTTP API in-process (TestClient runs the real lifespan): real photos, real gallery file."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_support import (
    REPO,
    blank_png,
    default_bundle,
    gif_bytes,
    huge_declared_png,
    people,
)

API = {"X-API-Key": "client-key"}
ADMIN = {"X-API-Key": "client-key", "X-Admin-Key": "admin-key"}


@pytest.fixture(scope="module")
def bundle() -> Path:
    return default_bundle()


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    """Four photos each of eight people, as bytes."""
    chosen = dict(list(people(celeba_index).items())[:8])
    return {who: [p.read_bytes() for p in paths[:4]] for who, paths in chosen.items()}


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory):
    """Keys on, largest-face policy, no threshold override."""
    gallery = tmp_path_factory.mktemp("gallery") / "gallery.sqlite"
    settings = Settings(
        bundle=bundle, gallery=gallery, api_key="client-key", admin_key="admin-key", cpu_workers=2
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def strict_client(bundle, tmp_path_factory):
    """No keys, strict face policy, threshold override allowed, 1 MB request limit."""
    gallery = tmp_path_factory.mktemp("gallery-strict") / "gallery.sqlite"
    settings = Settings(
        bundle=bundle,
        gallery=gallery,
        face_policy="strict",
        allow_threshold_override=True,
        max_request_bytes=1_000_000,
        cpu_workers=2,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def gallery_state(c: TestClient, headers=API) -> tuple[int, list[tuple[str, int]]]:
    body = c.get("/v1/identities", params={"limit": 1000}, headers=headers).json()
    return body["total"], sorted((i["identity_id"], len(i["templates"])) for i in body["identities"])


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert response.headers.get("x-request-id")


def enrol(c: TestClient, identity_id: str | None, images: list[bytes], name: str = "someone", **extra):
    data = {"name": name, **extra}
    if identity_id is not None:
        data["identity_id"] = identity_id
    files = [("images", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images)]
    return c.post("/v1/identities", data=data, files=files, headers=ADMIN)


def test_health_and_readiness_report_the_loaded_parts(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["gallery"] and body["runtime"] == "onnxruntime-cpu"
    assert body["detector"] == "dlib" and "@" in body["model_id"]


def test_request_id_is_echoed_or_generated(client):
    echoed = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    first = client.get("/healthz").headers["x-request-id"]
    second = client.get("/healthz").headers["x-request-id"]
    assert first and second and first != second
    hostile = client.get("/healthz", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["x-request-id"] != "a b\tc" * 50


def test_verify_same_person_multipart_and_json_agree(client, photos):
    a, b = next(iter(photos.values()))[:2]
    multipart = client.post("/v1/verify", files={"image1": a, "image2": b}, headers=API)
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert len(body["faces"]) == 2
    for face in body["faces"]:
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and face["faces_in_image"] >= 1
    assert set(body["timings_ms"]) == {"decode", "detect", "align", "embed", "total"}
    assert all(v >= 0 for v in body["timings_ms"].values())
    assert body["match"] == (body["similarity"] >= body["threshold"])
    as_json = client.post(
        "/v1/verify",
        json={"image1_b64": base64.b64encode(a).decode(), "image2_b64": base64.b64encode(b).decode()},
        headers=API,
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["similarity"] == pytest.approx(body["similarity"], abs=1e-5)


def test_verify_matches_one_person_and_rejects_two(client, photos):
    (p1, p2) = list(photos.values())[:2]
    same = client.post("/v1/verify", files={"image1": p1[0], "image2": p1[1]}, headers=API).json()
    other = client.post("/v1/verify", files={"image1": p1[0], "image2": p2[0]}, headers=API).json()
    assert same["match"] is True
    assert other["match"] is False
    assert same["similarity"] > other["similarity"]
    assert same["threshold_source"] != "request"


def test_threshold_override_needs_permission(client, strict_client, photos):
    a, b = next(iter(photos.values()))[:2]
    files = {"image1": a, "image2": b}
    assert_error(
        client.post("/v1/verify", files=files, data={"threshold": "0.1"}, headers=API),
        403,
        "threshold_override_forbidden",
    )
    allowed = strict_client.post("/v1/verify", files=files, data={"threshold": "-1"}).json()
    assert allowed["threshold"] == -1 and allowed["threshold_source"] == "request"
    assert allowed["match"] is True


def test_operator_threshold_replaces_the_bundle_threshold(bundle, tmp_path, photos):
    """FACEGATE_THRESHOLD applies to every decision and says so; the bundle's t is the default."""
    a, b = next(iter(photos.values()))[:2]
    settings = Settings(bundle=bundle, gallery=tmp_path / "g.sqlite", threshold=0.999, cpu_workers=1)
    with TestClient(create_app(settings)) as c:
        result = c.post("/v1/verify", files={"image1": a, "image2": b}).json()
    assert result["threshold"] == 0.999 and result["threshold_source"] == "operator"
    assert result["match"] is (result["similarity"] >= 0.999)


@pytest.mark.parametrize(
    ("image", "status", "code"),
    [
        (b"\x00corrupt bytes, not an image" * 10, 400, "image_undecodable"),
        (huge_declared_png(), 413, "image_too_large"),
        (gif_bytes(), 415, "unsupported_image_type"),
        (blank_png(), 422, "no_face"),
    ],
    ids=["corrupt", "huge-declared-size", "gif", "no-face"],
)
def test_bad_images_get_their_status_and_store_nothing(client, photos, image, status, code):
    good = next(iter(photos.values()))[0]
    before = gallery_state(client)
    assert_error(client.post("/v1/verify", files={"image1": good, "image2": image}, headers=API), status, code)
    assert_error(client.post("/v1/search", files={"image": image}, headers=API), status, code)
    assert_error(enrol(client, "never-stored", [image]), 422, "no_usable_image")
    assert gallery_state(client) == before


def test_several_faces_in_strict_mode_is_422(strict_client, insightface_group_photo, photos):
    group = insightface_group_photo.read_bytes()
    good = next(iter(photos.values()))[0]
    before = gallery_state(strict_client, headers={})
    response = strict_client.post("/v1/verify", files={"image1": good, "image2": group})
    assert_error(response, 422, "multiple_faces")
    assert "image2" in response.json()["error"]["message"]
    assert gallery_state(strict_client, headers={}) == before


def test_request_body_limit_is_413_before_reading(strict_client):
    before = gallery_state(strict_client, headers={})
    big = b"\xff\xd8\xff" + b"\x00" * 1_200_000
    response = strict_client.post("/v1/verify", files={"image1": big, "image2": big})
    assert_error(response, 413, "request_too_large")
    streamed = strict_client.post(  # chunked, no Content-Length: counted as it arrives
        "/v1/verify",
        content=iter([b"\x00" * 400_000] * 4),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, "request_too_large")
    assert gallery_state(strict_client, headers={}) == before


def test_verify_refuses_other_body_types(client):
    response = client.post("/v1/verify", content=b"x", headers={**API, "Content-Type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")
    missing = client.post("/v1/verify", json={"image1_b64": "AAAA"}, headers=API)
    assert_error(missing, 422, "validation_error")


def test_api_keys(client, photos):
    before = gallery_state(client)
    assert_error(client.get("/v1/identities"), 401, "missing_api_key")
    assert_error(client.get("/v1/identities", headers={"X-API-Key": "wrong"}), 403, "forbidden")
    image = next(iter(photos.values()))[0]
    files = [("images", ("a.jpg", image, "image/jpeg"))]
    assert_error(
        client.post("/v1/identities", data={"name": "x"}, files=files, headers=API),
        401,
        "missing_api_key",
    )
    wrong_admin = {**API, "X-Admin-Key": "nope"}
    assert_error(
        client.post("/v1/identities", data={"name": "x"}, files=files, headers=wrong_admin),
        403,
        "forbidden",
    )
    assert_error(client.delete("/v1/identities/anyone", headers=wrong_admin), 403, "forbidden")
    assert gallery_state(client) == before
    assert client.get("/healthz").status_code == 200  # health and metrics stay open
    assert client.get("/metrics").status_code == 200


def test_unknown_identity_is_404_everywhere(client, photos):
    image = next(iter(photos.values()))[0]
    before = gallery_state(client)
    assert_error(client.get("/v1/identities/ghost", headers=API), 404, "unknown_identity")
    assert_error(client.delete("/v1/identities/ghost", headers=ADMIN), 404, "unknown_identity")
    assert_error(
        client.post("/v1/verify/identity", files={"image": image}, data={"identity_id": "ghost"}, headers=API),
        404,
        "unknown_identity",
    )
    assert_error(
        client.post("/v1/identities/ghost/templates", files=[("images", ("a.jpg", image))], headers=ADMIN),
        404,
        "unknown_identity",
    )
    assert gallery_state(client) == before


def test_enrol_lifecycle_partial_success_duplicate_search_verify_delete(client, photos):
    (who, mine), (_, theirs) = list(photos.items())[2:4]
    created = enrol(client, "alice", [mine[0], blank_png(), mine[1]], name=who, metadata='{"team": "a"}')
    assert created.status_code == 201, created.text
    body = created.json()
    assert [i["accepted"] for i in body["images"]] == [True, False, True]
    assert body["images"][1]["reason"]["code"] == "no_face"
    assert body["identity"]["metadata"] == {"team": "a"}
    template_ids = [i["template_id"] for i in body["images"] if i["accepted"]]
    assert sorted(template_ids) == sorted(t["template_id"] for t in body["identity"]["templates"])

    before = gallery_state(client)
    assert_error(enrol(client, "alice", [mine[2]]), 409, "duplicate_identity")
    assert_error(enrol(client, "bob", [mine[2]], metadata="{not json"), 422, "validation_error")
    assert gallery_state(client) == before

    generated = enrol(client, None, [theirs[0]], name="generated")
    assert generated.status_code == 201
    generated_id = generated.json()["identity"]["identity_id"]
    assert generated_id

    added = client.post(
        "/v1/identities/alice/templates", files=[("images", ("c.jpg", mine[2]))], headers=ADMIN
    )
    assert added.status_code == 201 and len(added.json()["identity"]["templates"]) == 3

    found = client.post("/v1/search", files={"image": mine[3]}, data={"k": "2"}, headers=API).json()
    assert 1 <= len(found["candidates"]) <= 2
    sims = [c["similarity"] for c in found["candidates"]]
    assert sims == sorted(sims, reverse=True)
    assert (found["match"] is None) == (found["decision"] == "no_match")

    checked = client.post(
        "/v1/verify/identity", files={"image": mine[3]}, data={"identity_id": "alice"}, headers=API
    ).json()
    assert len(checked["similarities"]) == 3
    assert checked["similarity"] == pytest.approx(max(checked["similarities"]))

    removed = client.delete(f"/v1/identities/alice/templates/{template_ids[0]}", headers=ADMIN)
    assert removed.status_code == 200
    assert len(client.get("/v1/identities/alice", headers=API).json()["templates"]) == 2
    assert_error(
        client.delete(f"/v1/identities/alice/templates/{template_ids[0]}", headers=ADMIN),
        404,
        "unknown_template",
    )
    for identity_id in ("alice", generated_id):
        assert client.delete(f"/v1/identities/{identity_id}", headers=ADMIN).json()["deleted"]
    assert_error(client.get("/v1/identities/alice", headers=API), 404, "unknown_identity")


def test_search_finds_the_enrolled_person_and_says_no_match_for_strangers(client, photos):
    """Ranking and threshold logic on real faces; recognition floors are in test_server_e2e."""
    items = list(photos.items())
    for who, images in items[4:6]:
        assert enrol(client, f"real-{who}", images[:2], name=who).status_code == 201
    hit = client.post("/v1/search", files={"image": items[4][1][3]}, headers=API).json()
    best = hit["candidates"][0]
    assert best["identity_id"] == f"real-{items[4][0]}"
    assert best["match"] is (best["similarity"] >= hit["threshold"])
    assert hit["decision"] == ("match" if best["match"] else "no_match")
    stranger = client.post("/v1/search", files={"image": items[7][1][0]}, headers=API).json()
    assert stranger["decision"] == "no_match" and stranger["match"] is None
    assert stranger["candidates"][0]["similarity"] < best["similarity"]
    same = client.post(
        "/v1/verify/identity",
        files={"image": items[5][1][3]},
        data={"identity_id": f"real-{items[5][0]}"},
        headers=API,
    ).json()
    other = client.post(
        "/v1/verify/identity",
        files={"image": items[7][1][0]},
        data={"identity_id": f"real-{items[5][0]}"},
        headers=API,
    ).json()
    assert same["match"] is (same["similarity"] >= same["threshold"])
    assert other["match"] is False and other["similarity"] < same["similarity"]
    consistency = client.get("/v1/consistency", headers=API)
    assert consistency.status_code == 200, consistency.text
    for who, _ in items[4:6]:
        client.delete(f"/v1/identities/real-{who}", headers=ADMIN)


def test_pagination(client, photos):
    face = list(photos.values())[6][0]
    for i in range(3):
        assert enrol(client, f"page-{i}", [face]).status_code == 201
    total, _ = gallery_state(client)
    page = client.get("/v1/identities", params={"offset": 1, "limit": 2}, headers=API).json()
    assert page["total"] == total and page["offset"] == 1 and len(page["identities"]) == min(2, total - 1)
    assert_error(client.get("/v1/identities", params={"limit": 0}, headers=API), 422, "validation_error")
    for i in range(3):
        client.delete(f"/v1/identities/page-{i}", headers=ADMIN)


def counters(c: TestClient) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        if family.name == "facegate_http_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["method"], s.labels["route"], s.labels["status"])] = s.value
    return out


def test_metrics_count_exactly_what_was_done(client, photos):
    a, b = next(iter(photos.values()))[:2]
    before = counters(client)
    for _ in range(2):
        client.post("/v1/verify", files={"image1": a, "image2": b}, headers=API)
    client.post("/v1/verify", files={"image1": a, "image2": blank_png()}, headers=API)
    client.get("/v1/identities/nobody", headers=API)
    after = counters(client)  # this scrape itself is counted after rendering
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert delta == {
        ("POST", "/v1/verify", "200"): 2,
        ("POST", "/v1/verify", "422"): 1,
        ("GET", "/v1/identities/{identity_id}", "404"): 1,
        ("GET", "/metrics", "200"): 1,  # the first scrape
    }
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    stages = {s.labels["stage"] for s in families["facegate_stage_seconds"].samples}
    assert {"decode", "detect", "align", "embed"} <= stages
    decisions = {
        (s.labels["route"], s.labels["outcome"]): s.value
        for s in families["facegate_decisions"].samples
        if s.name.endswith("_total")
    }
    assert sum(v for (route, _), v in decisions.items() if route == "verify") >= 2
    assert "facegate_embed_batch_size" in families and "facegate_gallery_identities" in families


def test_concurrent_enrol_search_delete_stay_consistent(client, photos):
    faces = [images[0] for images in photos.values()]
    errors: list[str] = []
    base_total, _ = gallery_state(client)

    def worker(n: int) -> None:
        for i in range(2):
            identity_id = f"t{n}-{i}"
            r = enrol(client, identity_id, [faces[(n + i) % len(faces)]])
            if r.status_code != 201:
                errors.append(f"enrol {r.status_code} {r.text}")
            r = client.post("/v1/search", files={"image": faces[n % len(faces)]}, headers=API)
            if r.status_code != 200:
                errors.append(f"search {r.status_code} {r.text}")
            if i == 0:
                r = client.delete(f"/v1/identities/{identity_id}", headers=ADMIN)
                if r.status_code != 200:
                    errors.append(f"delete {r.status_code} {r.text}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total, state = gallery_state(client)
    assert total == base_total + 4
    assert {f"t{n}-1" for n in range(4)} <= {i for i, _ in state}
    assert not {f"t{n}-0" for n in range(4)} & {i for i, _ in state}
    ready = client.get("/readyz").json()
    assert ready["identities"] == total
    assert ready["templates"] == sum(n for _, n in state)
    for n in range(4):
        client.delete(f"/v1/identities/t{n}-1", headers=ADMIN)


def test_openapi_documents_both_verify_bodies(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/verify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "/v1/identities/{identity_id}/templates/{template_id}" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_cors_is_off_by_default(client):
    response = client.get("/healthz", headers={"Origin": "https://example.org"})
    assert "access-control-allow-origin" not in response.headers


def test_server_does_not_import_torch():
    code = (
        "import sys; import facegate.server.app, facegate.server.cli, facegate.client; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_consistency_report_and_bounded_identity_gauges(bundle, tmp_path, photos):
    settings = Settings(
        bundle=bundle, gallery=tmp_path / "g.sqlite", metrics_worst_n=2, target_far=0.25, cpu_workers=2
    )
    items = list(photos.items())[:3]
    with TestClient(create_app(settings)) as c:
        for who, images in items:
            files = [("images", (f"{i}.jpg", img)) for i, img in enumerate(images[:2])]
            assert c.post("/v1/identities", data={"name": who, "identity_id": who}, files=files).status_code == 201
        c.post("/v1/verify/identity", files={"image": items[0][1][2]}, data={"identity_id": items[0][0]})
        report = c.get("/v1/consistency").json()
        assert report["identities"] == 3 and report["opis_identities"] == 3
        assert report["opis"] is not None and report["opis"] >= 0
        assert report["target_far"] == settings.target_far
        assert report["per_identity"][items[0][0]]["observed"]["count"] == 1
        for row in report["per_identity"].values():
            assert row["genuine_pairs"] == 1 and row["impostor_pairs"] == 8
        assert len(report["worst"]) == 2
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        frr = {s.labels["rank"]: s for s in families["facegate_identity_frr"].samples}
        assert set(frr) == {"1", "2"}  # by rank: unauthenticated /metrics names nobody
        assert not any("identity_id" in s.labels for s in frr.values())
        assert not any(who in c.get("/metrics").text for who, _ in items)
        assert families["facegate_consistency_opis"].samples[0].value == pytest.approx(report["opis"])


def test_unexpected_errors_get_the_envelope_and_request_id(bundle, tmp_path):
    app = create_app(Settings(bundle=bundle, gallery=tmp_path / "g.sqlite", cpu_workers=1))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/broken", headers={"X-Request-ID": "bug-1"})
        assert_error(response, 500, "internal_error")
        assert "a bug" not in response.text  # internals stay in the log
        assert response.headers["x-request-id"] == "bug-1"
        assert counters(c)[("GET", "/broken", "500")] == 1


def test_settings_come_from_facegate_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEGATE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("FACEGATE_BATCH_MAX_SIZE", "8")
    monkeypatch.setenv("FACEGATE_FACE_POLICY", "strict")
    monkeypatch.setenv("FACEGATE_GALLERY", str(tmp_path / "x.sqlite"))
    settings = Settings()
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.batch_max_size == 8 and settings.face_policy == "strict"
    assert settings.gallery == tmp_path / "x.sqlite"
    monkeypatch.setenv("FACEGATE_FACE_POLICY", "everyone")
    with pytest.raises(ValueError):
        Settings()
