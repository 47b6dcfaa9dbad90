"""Face quality on every served face, probes too poor to decide, and enrolment review
(FACEGATE_ENROL_REVIEW) through the real app: real photos, real gallery file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from facegate.core.bundle import load_bundle
from facegate.core.embed import create_embedder, embed_with_stability
from facegate.core.errors import FacegateError
from facegate.core.face import make_detector, prepare_face
from facegate.core.quality import COMPONENTS, Signals
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from PIL import Image
from server_support import default_bundle, people


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[Path]]:
    return dict(list(people(celeba_index).items())[:6])


def _client(tmp_path_factory, **settings):
    gallery = tmp_path_factory.mktemp("gallery") / "gallery.sqlite"
    return TestClient(create_app(Settings(bundle=default_bundle(), gallery=gallery,
                                          cpu_workers=2, **settings)))


@pytest.fixture(scope="module")
def off(tmp_path_factory):
    with _client(tmp_path_factory) as c:
        yield c


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    with _client(tmp_path_factory, enrol_review="strict") as c:
        yield c


def _files(images: list[bytes]) -> list:
    return [("images", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images)]


def _enrol(c: TestClient, identity_id: str, images: list[bytes]):
    return c.post("/v1/identities", data={"name": identity_id, "identity_id": identity_id},
                  files=_files(images))


def _scaled(path: Path, factor: float) -> bytes:
    image = Image.open(path).convert("RGB")
    image = image.resize((round(image.width * factor), round(image.height * factor)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _check_quality(face: dict) -> None:
    assert face["stage"] in ("hog0", "hog1", "mmod")
    quality = face["quality"]
    assert set(quality["components"]) == set(COMPONENTS)
    assert all(0.0 <= v <= 1.0 for v in [quality["score"], *quality["components"].values()])


def test_every_face_carries_its_quality(off, photos) -> None:
    (a, paths_a), (_, paths_b) = list(photos.items())[:2]
    embedded = off.post("/v1/embed", files={"image": paths_a[0].read_bytes()}).json()
    _check_quality(embedded["faces"][0])
    every = off.post("/v1/embed", files={"image": paths_a[0].read_bytes()},
                     data={"all_faces": "true"}).json()
    assert every["faces"][0]["quality"] == embedded["faces"][0]["quality"]
    verify = off.post("/v1/verify", files={"image1": paths_a[0].read_bytes(),
                                           "image2": paths_b[0].read_bytes()}).json()
    for face in verify["faces"]:
        _check_quality(face)
    model = load_bundle(default_bundle()).quality_model
    assert verify["probe_quality"]["min_quality"] == pytest.approx(model.cut(0.02))
    enrolled = _enrol(off, a, [p.read_bytes() for p in paths_a[:2]]).json()
    assert all(item["accepted"] for item in enrolled["images"])
    _check_quality(enrolled["images"][0]["face"])
    assert enrolled["review"]["mode"] == "off" and enrolled["review"]["more_photos"] == 1
    search = off.post("/v1/search", files={"image": paths_a[2].read_bytes()}).json()
    _check_quality(search["face"])
    assert search["probe_quality"]["sufficient"] == (search["face"]["quality"]["score"]
                                                     >= model.cut(0.02))


def test_a_probe_under_the_operator_cut_is_flagged_not_a_silent_no_match(tmp_path_factory,
                                                                          photos) -> None:
    (_, paths), = list(photos.items())[:1]
    with _client(tmp_path_factory, probe_min_quality=0.9999) as c:
        body = c.post("/v1/verify", files={"image1": paths[0].read_bytes(),
                                           "image2": paths[1].read_bytes()}).json()
        assert body["probe_quality"] == {"sufficient": False, "min_quality": 0.9999,
                                         "score": min(f["quality"]["score"] for f in body["faces"])}
        search = c.post("/v1/search", files={"image": paths[0].read_bytes()}).json()
        assert search["probe_quality"]["sufficient"] is False
        vector = c.post("/v1/embed", files={"image": paths[0].read_bytes()}).json()
        sent = c.post("/v1/search", json={"embedding": {"model_id": vector["model_id"],
                                                        "vector": vector["faces"][0]["embedding"]}})
        assert sent.json()["probe_quality"] == {"sufficient": True, "min_quality": 0.9999,
                                                "score": None}  # an embedding has no photo
    with _client(tmp_path_factory, probe_min_quality=0) as c:
        body = c.post("/v1/search", files={"image": paths[0].read_bytes()}).json()
        assert body["probe_quality"]["sufficient"] is True
        assert body["probe_quality"]["min_quality"] is None


def test_strict_review_refuses_another_enrolled_persons_photo(strict, photos) -> None:
    (a, paths_a), (b, paths_b) = list(photos.items())[2:4]
    assert _enrol(strict, a, [p.read_bytes() for p in paths_a[:3]]).status_code == 201
    assert _enrol(strict, b, [p.read_bytes() for p in paths_b[:3]]).status_code == 201
    intruder = paths_b[3].read_bytes()
    added = strict.post(f"/v1/identities/{a}/templates",
                        files=_files([paths_a[3].read_bytes(), intruder]))
    assert added.status_code == 201, added.text
    own, other = added.json()["images"]
    assert own["accepted"] and own["template_id"]
    assert not other["accepted"] and other["reason"]["code"] == "identity_conflict"
    assert repr(b) in other["reason"]["message"]
    assert added.json()["review"]["refused"] == 1
    assert len(strict.get(f"/v1/identities/{a}").json()["templates"]) == 4
    alone = strict.post(f"/v1/identities/{a}/templates", files=_files([intruder]))
    assert alone.status_code == 422 and "identity_conflict" in alone.json()["error"]["message"]


def test_review_refuses_small_and_low_quality_faces_and_keeps_the_good_ones(strict, photos
                                                                            ) -> None:
    (c_id, paths), = list(photos.items())[4:5]
    worst = _worst_photo(list(photos.values()))
    small = _scaled(paths[1], 13.0 / _eye_distance(paths[1]))  # eyes 13 px apart: under 16
    body = _enrol(strict, c_id, [paths[0].read_bytes(), small, worst]).json()
    good, small, poor = body["images"]
    assert good["accepted"]
    assert small["reason"]["code"] == "face_too_small" and small["face"]["quality"]
    assert poor["reason"]["code"] == "low_quality"
    review = body["review"]
    assert review == {"mode": "strict", "refused": 2, "more_photos": 2,
                      "advice": review["advice"]}
    assert review["advice"].startswith("take 2 more photos") and "closer" in review["advice"]


def _eye_distance(path: Path) -> float:
    bundle = load_bundle(default_bundle())
    face = prepare_face(path.read_bytes(), make_detector(bundle.geometry), bundle.geometry)
    return Signals.of(face.crop, face.face.landmarks, None, None).eye_distance


def _worst_photo(groups: list[list[Path]]) -> bytes:
    """The lowest-scored of these shared photos, scored as the server scores it; it must be
    under the strict review's cut-off for the test to mean anything."""
    bundle = load_bundle(default_bundle())
    detector, model = make_detector(bundle.geometry), bundle.quality_model
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    scored = []
    for path in (p for group in groups for p in group):
        try:
            face = prepare_face(path.read_bytes(), detector, bundle.geometry)
        except FacegateError:
            continue
        _, stability = embed_with_stability(embedder, face.crop[None])
        signals = Signals.of(face.crop, face.face.landmarks, float(stability[0]), face.face.stage)
        if signals.eye_distance >= 16 and signals.yaw <= 0.3 and signals.roll <= 0.45:
            scored.append((model.assess(signals).score, path))
    score, path = min(scored)
    assert score < model.cut(0.05), np.round(score, 3)
    return path.read_bytes()
