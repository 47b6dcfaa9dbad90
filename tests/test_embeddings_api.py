"""The embeddings API in-process (TestClient runs the real lifespan): POST /v1/embed, and
verify and search with an embedding in place of a photo; also the threshold override's
one validation rule and verify/identity against an identity with no templates left."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from facegate.core.bundle import load_bundle
from facegate.gallery import Gallery
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import blank_png, default_bundle, people

API = {"X-API-Key": "client-key"}
ADMIN = {"X-API-Key": "client-key", "X-Admin-Key": "admin-key"}
BAD_THRESHOLDS = ["nan", "inf", "-inf", "1e6", "-1e6", "1.5"]


@pytest.fixture(scope="module")
def photos(celeba_index) -> list[list[bytes]]:
    """Four photos each of four people; the detector finds exactly one face in each (so
    they enrol under the strict enrolment policy)."""
    chosen = list(people(celeba_index).values())[2:6]
    return [[p.read_bytes() for p in paths[:4]] for paths in chosen]


def make_settings(tmp_path_factory, **extra) -> Settings:
    gallery = tmp_path_factory.mktemp("embeddings") / "gallery.sqlite"
    return Settings(
        bundle=default_bundle(),
        gallery=gallery,
        api_key="client-key",
        admin_key="admin-key",
        cpu_workers=2,
        **extra,
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory, photos):
    """Keys on, threshold override allowed; identities p0 and p1 enrolled from two photos."""
    settings = make_settings(tmp_path_factory, allow_threshold_override=True)
    with TestClient(create_app(settings)) as c:
        for i in range(2):
            assert enrol(c, f"p{i}", photos[i][:2]).status_code == 201
        yield c


def enrol(c: TestClient, identity_id: str, images: list[bytes]):
    files = [("images", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images)]
    return c.post("/v1/identities", data={"name": identity_id, "identity_id": identity_id},
                  files=files, headers=ADMIN)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embedding(c: TestClient, photo: bytes) -> dict:
    response = c.post("/v1/embed", files={"image": photo}, headers=API)
    assert response.status_code == 200, response.text
    body = response.json()
    return {"model_id": body["model_id"], "vector": body["faces"][0]["embedding"]}


def post_json(c: TestClient, path: str, body: dict):
    """JSON as Python writes it, NaN and Infinity included (httpx's json= refuses them)."""
    headers = {**API, "Content-Type": "application/json"}
    return c.post(path, content=json.dumps(body), headers=headers)


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]


def test_embed_returns_a_unit_vector_of_the_bundle_size(api, photos):
    ready = api.get("/readyz").json()
    response = api.post("/v1/embed", files={"image": photos[0][0]}, headers=API)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == ready["model_id"] and body["embedding_size"] == 128
    (face,) = body["faces"]
    assert len(face["embedding"]) == 128
    assert np.linalg.norm(face["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and face["faces_in_image"] == 1
    assert set(body["timings_ms"]) == {"decode", "detect", "align", "embed", "total"}
    assert_error(api.post("/v1/embed", files={"image": blank_png()}, headers=API), 422, "no_face")


def test_verify_with_an_embedding_equals_verify_with_the_photo(api, photos):
    a, b = photos[0][:2]
    by_photos = api.post("/v1/verify", files={"image1": a, "image2": b}, headers=API).json()
    first = embedding(api, a)
    mixed = api.post("/v1/verify", json={"embedding1": first, "image2_b64": b64(b)}, headers=API)
    assert mixed.status_code == 200, mixed.text
    assert mixed.json()["similarity"] == pytest.approx(by_photos["similarity"], abs=1e-5)
    assert mixed.json()["faces"][0] is None and mixed.json()["faces"][1] == by_photos["faces"][1]
    scaled = {**first, "vector": [3.7 * v for v in first["vector"]]}  # normalised by the server
    both = api.post(
        "/v1/verify", json={"embedding1": scaled, "embedding2": embedding(api, b)}, headers=API
    ).json()
    assert both["similarity"] == pytest.approx(by_photos["similarity"], abs=1e-5)
    assert both["match"] == by_photos["match"] and both["faces"] == [None, None]
    assert both["timings_ms"]["detect"] == 0


def test_an_embedding_of_another_model_is_409(api, photos):
    foreign = {**embedding(api, photos[0][2]), "model_id": "arcface-r100@1#0123456789ab"}
    for path, body in [
        ("/v1/verify", {"embedding1": foreign, "image2_b64": b64(photos[0][3])}),
        ("/v1/search", {"embedding": foreign}),
        ("/v1/verify/identity", {"embedding": foreign, "identity_id": "p0"}),
    ]:
        assert_error(api.post(path, json=body, headers=API), 409, "model_mismatch", "arcface-r100")


def test_a_vector_of_wrong_length_or_not_finite_or_zero_is_422(api, photos):
    good = embedding(api, photos[1][2])
    model_id = good["model_id"]
    assert post_json(api, "/v1/search", {"embedding": good}).status_code == 200
    cases = [
        ("127 values", good["vector"][:-1]),
        ("129 values", [*good["vector"], 0.0]),
        ("finite", [math.nan, *good["vector"][1:]]),
        ("finite", [math.inf, *good["vector"][1:]]),
        ("zero norm", [0.0] * 128),
    ]
    for words, vector in cases:
        bad = {"model_id": model_id, "vector": vector}
        for path, body in [
            ("/v1/verify", {"embedding1": bad, "embedding2": good}),
            ("/v1/search", {"embedding": bad, "k": 3}),
        ]:
            assert_error(post_json(api, path, body), 422, "validation_error", words)


def test_search_and_verify_identity_by_embedding_agree_with_the_photo(api, photos):
    probe = photos[0][3]
    by_photo = api.post("/v1/search", files={"image": probe}, data={"k": "2"}, headers=API).json()
    found = api.post("/v1/search", json={"embedding": embedding(api, probe), "k": 2}, headers=API)
    assert found.status_code == 200, found.text
    body = found.json()
    assert [c["identity_id"] for c in body["candidates"]] == ["p0", "p1"]
    assert body["candidates"][0]["similarity"] == pytest.approx(
        by_photo["candidates"][0]["similarity"], abs=1e-5
    )
    assert body["face"] is None and body["timings_ms"]["detect"] == 0
    checked = api.post(
        "/v1/verify/identity",
        json={"identity_id": "p0", "embedding": embedding(api, probe)},
        headers=API,
    )
    assert checked.status_code == 200, checked.text
    by_file = api.post(
        "/v1/verify/identity", files={"image": probe}, data={"identity_id": "p0"}, headers=API
    ).json()
    assert checked.json()["similarities"] == pytest.approx(by_file["similarities"], abs=1e-5)
    assert checked.json()["face"] is None and by_file["face"] is not None


def test_threshold_override_must_be_finite_and_in_range(api, photos, tmp_path_factory):
    """One rule for both body types, checked before the permission: malformed is 422 even
    where overrides are forbidden, and a valid override there is 403."""
    a, b = photos[1][:2]
    files = {"image1": a, "image2": b}
    allowed = api.post("/v1/verify", files=files, data={"threshold": "-1"}, headers=API).json()
    assert allowed["threshold"] == -1 and allowed["threshold_source"] == "request"
    locked = make_settings(tmp_path_factory)
    with TestClient(create_app(locked)) as forbidding:
        for c in (api, forbidding):
            for raw in BAD_THRESHOLDS:
                by_form = c.post("/v1/verify", files=files, data={"threshold": raw}, headers=API)
                assert_error(by_form, 422, "validation_error", "threshold")
                body = {"image1_b64": b64(a), "image2_b64": b64(b), "threshold": float(raw)}
                assert_error(post_json(c, "/v1/verify", body), 422, "validation_error", "threshold")
        valid = forbidding.post("/v1/verify", files=files, data={"threshold": "0.5"}, headers=API)
        assert_error(valid, 403, "threshold_override_forbidden")


def test_an_identity_without_templates_is_409(api, photos):
    created = enrol(api, "emptied", [photos[2][0]])
    assert created.status_code == 201, created.text
    (template,) = created.json()["identity"]["templates"]
    url = f"/v1/identities/emptied/templates/{template['template_id']}"
    assert api.delete(url, headers=ADMIN).status_code == 200
    by_file = api.post(
        "/v1/verify/identity", files={"image": photos[2][1]}, data={"identity_id": "emptied"},
        headers=API,
    )
    assert_error(by_file, 409, "identity_has_no_templates", "emptied")
    by_embedding = api.post(
        "/v1/verify/identity",
        json={"identity_id": "emptied", "embedding": embedding(api, photos[2][1])},
        headers=API,
    )
    assert_error(by_embedding, 409, "identity_has_no_templates")
    assert api.delete("/v1/identities/emptied", headers=ADMIN).status_code == 200


def test_an_identity_whose_templates_are_all_of_another_model_is_409(photos, tmp_path_factory):
    """Not a similarity of -1 (nothing was compared): the templates need re-embedding."""
    settings = make_settings(tmp_path_factory)
    vector = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    with Gallery(
        settings.gallery,
        model_id="older@1#000000000000",
        embedding_size=128,
        geometry=load_bundle(settings.bundle, verify=False).geometry,
    ) as old:
        old.create_identity("old", embeddings=vector / np.linalg.norm(vector))
    with TestClient(create_app(settings)) as c:
        response = c.post(
            "/v1/verify/identity", files={"image": photos[3][0]}, data={"identity_id": "old"},
            headers=API,
        )
        assert_error(response, 409, "model_mismatch", "reembed")


def test_openapi_documents_the_embeddings_api(api):
    spec = api.get("/openapi.json").json()
    embed = spec["paths"]["/v1/embed"]["post"]
    assert set(embed["requestBody"]["content"]) == {"multipart/form-data"}
    assert embed["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/EmbedResponse"
    )
    for path, field in [
        ("/v1/verify", "embedding1"),
        ("/v1/search", "embedding"),
        ("/v1/verify/identity", "embedding"),
    ]:
        operation = spec["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        as_json = content["application/json"]["schema"]
        assert as_json["examples"] and any(field in example for example in as_json["examples"])
        embedding_schema = as_json["properties"][field]["anyOf"][0]
        assert set(embedding_schema["properties"]) == {"model_id", "vector"}
        assert "409" in operation["responses"]
    assert "#/$defs" not in json.dumps(spec)  # every $ref resolves within the document


def test_embed_all_faces_embeds_each_face_largest_first(api, insightface_group_photo):
    """The 6-face group photo: six distinct unit vectors, largest face first, the first the
    same as the single-face answer (the default policy takes the largest)."""
    photo = insightface_group_photo.read_bytes()
    response = api.post("/v1/embed", files={"image": photo}, data={"all_faces": "true"}, headers=API)
    assert response.status_code == 200, response.text
    faces = response.json()["faces"]
    assert len(faces) == 6 and all(f["faces_in_image"] == 6 for f in faces)
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    vectors = np.array([f["embedding"] for f in faces])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    threshold = load_bundle(default_bundle(), verify=False).threshold
    assert similarity[~np.eye(6, dtype=bool)].max() < threshold  # six different people
    single = api.post("/v1/embed", files={"image": photo}, headers=API).json()["faces"]
    assert len(single) == 1 and single[0]["box"] == faces[0]["box"]
    assert np.dot(single[0]["embedding"], vectors[0]) == pytest.approx(1.0, abs=1e-5)
    no_face = api.post("/v1/embed", files={"image": blank_png()}, data={"all_faces": "true"}, headers=API)
    assert_error(no_face, 422, "no_face")


def test_prepare_faces_keeps_the_largest_and_counts_each_stage_once(insightface_group_photo):
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.detect import DlibDetector
    from facegate.core.face import prepare_faces

    photo = insightface_group_photo.read_bytes()
    detector = DlibDetector(landmarks="5")
    every = prepare_faces(photo, detector, DLIB_CHIP_150, max_faces=16)
    first_two = prepare_faces(photo, detector, DLIB_CHIP_150, max_faces=2)
    assert len(every) == 6 and len(first_two) == 2
    assert [p.face.box for p in first_two] == [p.face.box for p in every[:2]]
    assert all(p.crop.shape == (150, 150, 3) for p in every)
    assert every[0].timings["detect"] > 0 and all(p.timings["detect"] == 0 for p in every[1:])
    with pytest.raises(ValueError):
        prepare_faces(photo, detector, DLIB_CHIP_150, max_faces=0)
