"""facegate.client against a real `facegate serve` on loopback: every method, typed errors."""

from __future__ import annotations

import pytest
from facegate.server.schemas import Embedding, SearchResponse, VerifyResponse
from server_support import blank_png, default_bundle, free_port, people, start_server

from facegate.client import FacegateAPIError, FacegateClient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client")
    bundle = default_bundle()
    port = free_port()
    env = {"FACEGATE_API_KEY": "k", "FACEGATE_ADMIN_KEY": "adm"}
    proc = start_server(bundle, folder / "gallery.sqlite", port, env=env)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def test_every_method_round_trips(server, celeba_index, tmp_path):
    (who, paths), (other, other_paths) = list(people(celeba_index).items())[:2]
    with FacegateClient(server, api_key="k", admin_key="adm") as fg:
        assert fg.ready().ready
        verdict = fg.verify(paths[0], paths[1])  # paths, read by the client
        assert isinstance(verdict, VerifyResponse) and len(verdict.faces) == 2
        enrolled = fg.enrol(who, [paths[0], blank_png()], identity_id="p1", metadata={"k": 1})
        assert [i.accepted for i in enrolled.images] == [True, False]
        assert enrolled.identity.metadata == {"k": 1}
        added = fg.add_templates("p1", [paths[1].read_bytes()])
        assert len(added.identity.templates) == 2
        fg.enrol(other, [other_paths[0]], identity_id="p2")
        listing = fg.list_identities(limit=1)
        assert listing.total == 2 and len(listing.identities) == 1
        assert fg.get_identity("p1").name == who
        found = fg.search(paths[2], k=2)
        assert isinstance(found, SearchResponse) and len(found.candidates) == 2
        checked = fg.verify_identity(paths[2], "p1")
        assert len(checked.similarities) == 2
        report = fg.consistency()
        assert report.identities == 2
        assert report.per_identity["p1"].observed.count == 1
        template_id = added.images[0].template_id
        assert fg.delete_template("p1", template_id).template_id == template_id
        assert fg.delete_identity("p2").deleted
        assert fg.list_identities().total == 1


def test_errors_raise_typed_exceptions(server, celeba_index):
    photo = next(iter(people(celeba_index).values()))[0]
    with FacegateClient(server, api_key="k") as fg:
        with pytest.raises(FacegateAPIError) as missing:
            fg.get_identity("nobody")
        assert (missing.value.status, missing.value.code) == (404, "unknown_identity")
        assert missing.value.request_id
        with pytest.raises(FacegateAPIError) as no_admin:
            fg.enrol("x", [photo])
        assert (no_admin.value.status, no_admin.value.code) == (401, "missing_api_key")
        with pytest.raises(FacegateAPIError) as no_face:
            fg.verify(photo, blank_png())
        assert (no_face.value.status, no_face.value.code) == (422, "no_face")
    with FacegateClient(server, api_key="wrong") as fg, pytest.raises(FacegateAPIError) as wrong:
        fg.list_identities()
    assert wrong.value.status == 403


def test_embeddings_round_trip(server, celeba_index):
    """An embedding from embed() stands in for its photo in verify, search, verify_identity."""
    paths = list(people(celeba_index).values())[2][:3]  # single-face photos: they enrol
    with FacegateClient(server, api_key="k", admin_key="adm") as fg:
        embedded = fg.embed(paths[0])
        stored = embedded.embedding()
        assert isinstance(stored, Embedding) and len(stored.vector) == embedded.embedding_size
        by_photos = fg.verify(paths[0], paths[1])
        by_embedding = fg.verify(stored, paths[1])
        assert by_embedding.similarity == pytest.approx(by_photos.similarity, abs=1e-5)
        assert by_embedding.faces[0] is None and by_embedding.faces[1] is not None
        fg.enrol("someone", [paths[1], paths[2]], identity_id="emb")
        found = fg.search(stored, k=1)
        assert found.candidates[0].identity_id == "emb" and found.face is None
        checked = fg.verify_identity(stored, "emb").similarity
        assert checked == pytest.approx(fg.verify_identity(paths[0], "emb").similarity, abs=1e-5)
        foreign = stored.model_copy(update={"model_id": "another@1#000000000000"})
        with pytest.raises(FacegateAPIError) as mismatch:
            fg.search(foreign)
        assert (mismatch.value.status, mismatch.value.code) == (409, "model_mismatch")
        assert fg.delete_identity("emb").deleted


def test_embed_all_faces(server, insightface_group_photo):
    with FacegateClient(server, api_key="k") as fg:
        every = fg.embed(insightface_group_photo, all_faces=True)
        assert len(every.faces) == 6 and every.embedding(5).model_id == every.model_id
        assert len(fg.embed(insightface_group_photo).faces) == 1
