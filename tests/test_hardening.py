"""Inputs found to break the server in a black-box attack (issue 10): each gets its status,
the JSON envelope, and leaves the gallery as it was. Real app, real photos, real SQLite."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from facegate.gallery import Gallery
from facegate.gallery.metadata import UNREADABLE_KEY, MetadataError
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import default_bundle, people

ADMIN = {"X-Admin-Key": "admin-key"}


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:3])
    return {who: [p.read_bytes() for p in paths[:2]] for who, paths in chosen.items()}


@pytest.fixture(scope="module")
def gallery_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening") / "gallery.sqlite"


@pytest.fixture(scope="module")
def client(gallery_path):
    settings = Settings(
        bundle=default_bundle(), gallery=gallery_path, admin_key="admin-key", cpu_workers=2,
        max_images_per_request=4,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def state(c: TestClient) -> tuple[int, list]:
    response = c.get("/v1/identities", params={"limit": 1000})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["total"], sorted((i["identity_id"], len(i["templates"])) for i in body["identities"])


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    return body["error"]


def enrol(c, photo: bytes, **data):
    return c.post(
        "/v1/identities",
        data={"name": "someone", **data},
        files=[("images", ("a.jpg", photo, "image/jpeg"))],
        headers=ADMIN,
    )


@pytest.mark.parametrize("depth", [300, 950, 5000])
def test_deep_metadata_is_422_and_stores_nothing(client, photos, depth):
    before = state(client)
    metadata = '{"a":' * depth + "1" + "}" * depth
    response = enrol(client, next(iter(photos.values()))[0], identity_id=f"deep{depth}",
                     metadata=metadata)
    assert "deeper than 8" in assert_envelope(response, 422, "validation_error")["message"]
    assert state(client) == before
    assert_envelope(client.get(f"/v1/identities/deep{depth}"), 404, "unknown_identity")


@pytest.mark.parametrize(
    "metadata, words",
    [
        ('{"score": NaN}', "NaN"),
        ('{"score": Infinity}', "Infinity"),
        ('{"score": -Infinity}', "Infinity"),
        ('{"score": 1e999}', "finite"),
        ('{"blob": "' + "x" * 20_000 + '"}', "limit is 16384"),
        ("[1, 2]", "JSON object"),
        ('{"a": ', "not valid JSON"),
    ],
)
def test_bad_metadata_values_are_422(client, photos, metadata, words):
    before = state(client)
    response = enrol(client, next(iter(photos.values()))[0], metadata=metadata)
    assert words in assert_envelope(response, 422, "validation_error")["message"]
    assert state(client) == before


def test_nested_metadata_within_limits_round_trips(client, photos):
    metadata = {"team": "a", "tags": ["x", {"level": [1.5, None, True]}]}
    response = enrol(client, list(photos.values())[1][0], identity_id="meta-ok",
                     metadata=json.dumps(metadata))
    assert response.status_code == 201, response.text
    assert client.get("/v1/identities/meta-ok").json()["metadata"] == metadata
    assert client.delete("/v1/identities/meta-ok", headers=ADMIN).status_code == 200


def test_a_poisoned_row_from_an_older_version_does_not_break_listing(tmp_path, photos):
    """A gallery written before the limits may hold metadata nested 950 deep: readers
    still answer 200, the row shows it is unreadable, and nothing is rewritten."""
    path = tmp_path / "old.sqlite"
    bundle = default_bundle()
    settings = Settings(bundle=bundle, gallery=path, cpu_workers=1)
    with TestClient(create_app(settings)) as c:
        assert enrol(c, next(iter(photos.values()))[0], identity_id="victim").status_code == 201
    poison = '{"a":' * 950 + "1" + "}" * 950
    with sqlite3.connect(path) as db:
        db.execute("UPDATE identities SET metadata = ? WHERE identity_id = 'victim'", (poison,))
    with TestClient(create_app(settings)) as c:
        listing = c.get("/v1/identities")
        assert listing.status_code == 200, listing.text
        assert UNREADABLE_KEY in listing.json()["identities"][0]["metadata"]
        assert c.get("/v1/identities/victim").status_code == 200
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT metadata FROM identities").fetchone()[0] == poison


def test_the_store_itself_refuses_metadata_it_could_not_read_back(tmp_path):
    with Gallery(tmp_path / "g.sqlite", model_id="m", embedding_size=4) as gallery:
        vector = np.array([[1, 0, 0, 0]], np.float32)
        for metadata in ({"x": float("nan")}, {"a": json.loads('{"a":' * 100 + "1" + "}" * 100)}):
            with pytest.raises(MetadataError):
                gallery.create_identity("x", metadata=metadata, embeddings=vector)
        assert gallery.stats()["identities"] == 0


@pytest.mark.parametrize("offset", ["99999999999999999999", str(2**31), "-1"])
def test_out_of_range_offsets_are_422(client, offset):
    assert_envelope(client.get("/v1/identities", params={"offset": offset}), 422,
                    "validation_error")


def test_largest_accepted_offset_is_an_empty_page(client):
    response = client.get("/v1/identities", params={"offset": 2**31 - 1})
    assert response.status_code == 200 and response.json()["identities"] == []


@pytest.mark.parametrize("identity_id", [".", ".."])
def test_dot_ids_are_refused(client, photos, identity_id):
    before = state(client)
    response = enrol(client, next(iter(photos.values()))[0], identity_id=identity_id)
    assert "'..'" in assert_envelope(response, 422, "validation_error")["message"]
    assert state(client) == before


def test_ids_with_dots_inside_are_fine(client, photos):
    response = enrol(client, list(photos.values())[2][0], identity_id="a.b..c")
    assert response.status_code == 201, response.text
    assert client.get("/v1/identities/a.b..c").status_code == 200
    assert client.delete("/v1/identities/a.b..c", headers=ADMIN).status_code == 200


def test_too_many_images_is_refused_before_any_decode(client, photos):
    before = state(client)
    photo = next(iter(photos.values()))[0]
    files = [("images", (f"{i}.jpg", photo, "image/jpeg")) for i in range(5)]
    started = time.perf_counter()
    response = client.post("/v1/identities", data={"name": "many"}, files=files, headers=ADMIN)
    seconds = time.perf_counter() - started
    assert "limit is 4" in assert_envelope(response, 422, "too_many_images")["message"]
    assert seconds < 1.0  # five detections would take longer on these cores
    assert state(client) == before
    response = enrol(client, photo, identity_id="few")
    assert response.status_code == 201
    response = client.post("/v1/identities/few/templates", files=files, headers=ADMIN)
    assert_envelope(response, 422, "too_many_images")
    assert state(client)[1].count(("few", 1)) == 1
    client.delete("/v1/identities/few", headers=ADMIN)


def test_long_input_is_not_echoed_in_full(client):
    long_id = "x" * 60_000  # httpx refuses URLs over 64 KiB
    for response in (
        client.get(f"/v1/identities/{long_id}"),
        client.delete(f"/v1/identities/{long_id}", headers=ADMIN),
        client.post("/v1/identities", data={"name": "n", "identity_id": long_id},
                    files=[("images", ("a.jpg", b"\xff\xd8\xff", "image/jpeg"))], headers=ADMIN),
    ):
        assert response.status_code in (404, 422), response.text
        assert len(response.content) < 1000
    message = client.get(f"/v1/identities/{long_id}").json()["error"]["message"]
    assert message.startswith("unknown identity 'xxx") and "more characters" in message


def test_group_photo_enrolment_is_strict_by_default(client, insightface_group_photo):
    before = state(client)
    group = insightface_group_photo.read_bytes()
    response = enrol(client, group, identity_id="group")
    message = assert_envelope(response, 422, "no_usable_image")["message"]
    assert "found 6" in message and "one person" in message
    assert state(client) == before


def test_group_photo_enrolment_takes_the_largest_face_when_the_operator_opts_in(
    tmp_path, insightface_group_photo
):
    settings = Settings(
        bundle=default_bundle(), gallery=tmp_path / "g.sqlite", cpu_workers=1,
        enrol_face_policy="largest",
    )
    with TestClient(create_app(settings)) as c:
        response = enrol(c, insightface_group_photo.read_bytes(), identity_id="group")
        assert response.status_code == 201, response.text
        assert response.json()["images"][0]["face"]["faces_in_image"] == 6
