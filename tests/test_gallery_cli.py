"""Moving a gallery to a new model: kept crops' geometry, `facegate gallery reembed`, the 409.

Real SQLite files, real photos enrolled through the real server, real ONNX embedders:
the "old" model is the default bundle (dlib chips) under another version (same network
and geometry, so its templates must come back identical after re-embedding), the
"other" model is a small real ONNX graph on 112x112 ArcFace-template crops.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from facegate.core.align import ARCFACE_112, DLIB_CHIP_150
from facegate.core.bundle import load_bundle, write_bundle
from facegate.core.errors import ModelMismatch
from facegate.gallery import Gallery
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from server_support import default_bundle, people

from facegate.cli import main

PEOPLE = 3
pytestmark = pytest.mark.usefixtures("single_threaded_faiss")


@pytest.fixture(scope="module")
def photos(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:PEOPLE])
    return {who: [p.read_bytes() for p in paths[:3]] for who, paths in chosen.items()}


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory) -> Path:
    """The default bundle under another version: another model_id, same network and geometry."""
    root = tmp_path_factory.mktemp("old-bundle")
    for name in ("manifest.json", "embedder.onnx"):
        shutil.copy(default_bundle() / name, root / name)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = "old"
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(root).model_id != load_bundle(default_bundle()).model_id
    return root


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    """A real ONNX embedder on 112x112 ArcFace crops: (N, 3, 112, 112) -> mean pool -> MatMul."""
    root = tmp_path_factory.mktemp("other-bundle")
    weight = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["embedding"]),
        ],
        "chip",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(root / "chip.onnx"))
    write_bundle(
        root / "bundle", onnx_file=root / "chip.onnx", name="chip", version="1",
        embedding_size=16, threshold=0.5, threshold_source="manual",
        threshold_provenance="a test model", geometry=ARCFACE_112,
    )
    return root / "bundle"


@pytest.fixture(scope="module")
def old_gallery(old_bundle, photos, tmp_path_factory) -> Path:
    """A gallery enrolled through the server with the old bundle, crops kept."""
    path = tmp_path_factory.mktemp("old-gallery") / "gallery.sqlite"
    settings = Settings(bundle=old_bundle, gallery=path, keep_crops=True, cpu_workers=2)
    with TestClient(create_app(settings)) as c:
        for who, images in photos.items():
            files = [("images", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images[:2])]
            response = c.post("/v1/identities", data={"identity_id": who, "name": who}, files=files)
            assert response.status_code == 201, response.text
    return path


def copy_gallery(source: Path, target_dir: Path) -> Path:
    target = target_dir / "gallery.sqlite"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{target}{suffix}")
    return target


def templates(path: Path) -> list[tuple[str, str, bytes, str | None]]:
    """(model_id, identity_id, embedding, crop_geometry) of every template, in row order."""
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT model_id, identity_id, embedding, crop_geometry FROM templates ORDER BY row_id"
        ).fetchall()


def reembed(*args: str) -> int:
    return main(["gallery", "reembed", *args])


def test_reembed_matching_geometry_and_the_server_serves_again(
    old_gallery, old_bundle, photos, tmp_path, capsys
):
    gallery = copy_gallery(old_gallery, tmp_path)
    before = templates(gallery)
    assert len(before) == 2 * PEOPLE
    old_id, new_id = load_bundle(old_bundle).model_id, load_bundle(default_bundle()).model_id
    assert {m for m, *_ in before} == {old_id}
    assert {g for *_, g in before} == {json.dumps(DLIB_CHIP_150.to_dict(), sort_keys=True, separators=(",", ":"))}

    who, images = next(iter(photos.items()))
    settings = Settings(bundle=default_bundle(), gallery=gallery, cpu_workers=2)
    with TestClient(create_app(settings)) as c:
        response = c.post("/v1/search", files={"image": images[2]})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "model_mismatch"
        assert error["message"].startswith(f"{PEOPLE} identities ({2 * PEOPLE} templates)")
        assert "facegate gallery reembed" in error["message"]
        assert "re-enrol" not in error["message"]

    assert reembed("--bundle", str(default_bundle()), "--gallery", str(gallery), "--dry-run") == 0
    assert templates(gallery) == before  # a dry run changes nothing
    capsys.readouterr()
    assert reembed("--bundle", str(default_bundle()), "--gallery", str(gallery)) == 0
    out = capsys.readouterr().out
    assert f"re-embedded {2 * PEOPLE} templates" in out, out
    after = templates(gallery)
    assert {m for m, *_ in after} == {new_id}
    # Same network, same lossless crops, flipped as the server embeds: same vectors.
    for (_, ident_a, a, _), (_, ident_b, b, _) in zip(before, after, strict=True):
        assert ident_a == ident_b
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), atol=1e-5)

    with TestClient(create_app(settings)) as c:
        response = c.post("/v1/search", files={"image": images[2]})
        assert response.status_code == 200, response.text
        assert response.json()["candidates"][0]["identity_id"] == who
        verify = c.post("/v1/verify/identity", files={"image": images[2]}, data={"identity_id": who})
        assert verify.status_code == 200 and verify.json()["match"] is True

    assert reembed("--bundle", str(default_bundle()), "--gallery", str(gallery)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_other_geometry_is_refused_with_what_to_do(old_gallery, other_bundle, tmp_path, capsys):
    gallery = copy_gallery(old_gallery, tmp_path)
    before = templates(gallery)
    assert reembed("--bundle", str(other_bundle), "--gallery", str(gallery)) == 1
    captured = capsys.readouterr()
    assert f"refused {2 * PEOPLE} kept crops of another geometry ({2 * PEOPLE} dlib_chip 150x150 padding 0.25)" in captured.out
    assert f"re-enrol {PEOPLE} identities ({2 * PEOPLE} templates) from their photos" in captured.out
    assert "nothing can be re-embedded" in captured.err
    assert [(i, e, g) for _, i, e, g in templates(gallery)] == [(i, e, g) for _, i, e, g in before]

    bundle = load_bundle(other_bundle)
    with Gallery(gallery, model_id=bundle.model_id, embedding_size=16, geometry=bundle.geometry) as g:
        report = g.reembed(lambda batch: pytest.fail("a dlib chip reached an ArcFace-template model"))
        assert (report.reembedded, report.refused, report.blocked_identities) == (0, 2 * PEOPLE, PEOPLE)
        with pytest.raises(ModelMismatch) as mismatch:
            g.search(np.eye(16, dtype=np.float32)[0])
        message = str(mismatch.value)
        assert "re-enrol them from their photos" in message and "fresh gallery file" in message
        assert "reembed" not in message
    # A kept crop must be in the gallery's geometry.
    with Gallery(
        tmp_path / "new.sqlite", model_id="m", embedding_size=16, keep_crops=True,
        geometry=ARCFACE_112,
    ) as g, pytest.raises(ValueError, match="arcface_template 112x112"):
        g.create_identity(
            "x", embeddings=np.eye(16, dtype=np.float32)[:1], crops=np.zeros((1, 150, 150, 3), np.uint8)
        )


def test_partial_reembed_exits_1_and_names_who_to_re_enrol(old_gallery, old_bundle, tmp_path, capsys):
    gallery = copy_gallery(old_gallery, tmp_path)
    old = load_bundle(old_bundle)
    vector = np.frombuffer(templates(gallery)[0][2], np.float32)[None]
    with Gallery(gallery, model_id=old.model_id, embedding_size=old.embedding_size,
                 geometry=old.geometry) as g:
        g.create_identity("no-crop", embeddings=vector)  # keep_crops off: nothing to re-embed from
    with Gallery(gallery, model_id=load_bundle(default_bundle()).model_id,
                 embedding_size=old.embedding_size, geometry=old.geometry) as g:
        with pytest.raises(ModelMismatch, match=f"re-embed the {2 * PEOPLE} whose kept crops fit"):
            g.search(vector[0])
    assert reembed("--bundle", str(default_bundle()), "--gallery", str(gallery), "--dry-run") == 1
    assert reembed("--bundle", str(default_bundle()), "--gallery", str(gallery)) == 1
    out = capsys.readouterr().out
    assert f"re-embedded {2 * PEOPLE} templates" in out
    assert "re-enrol 1 identities (1 templates)" in out
    assert [i for m, i, *_ in templates(gallery) if m == old.model_id] == ["no-crop"]


def test_cli_errors_exit_1(tmp_path, capsys):
    missing = tmp_path / "missing.sqlite"
    assert reembed("--bundle", str(default_bundle()), "--gallery", str(missing)) == 1
    assert not missing.exists()  # never creates a gallery
    (tmp_path / "g.sqlite").touch()
    assert reembed("--bundle", str(tmp_path / "no-bundle"), "--gallery", str(tmp_path / "g.sqlite")) == 1
    assert "facegate gallery reembed:" in capsys.readouterr().err


def schema_1_file(path: Path) -> None:
    """A gallery as facegate wrote it before crops recorded their geometry (schema 1)."""
    rng = np.random.default_rng(0)

    def png(size: int) -> bytes:
        return cv2.imencode(".png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))[1].tobytes()

    vector = np.eye(8, dtype=np.float32)[0].tobytes()
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE identities (identity_id TEXT PRIMARY KEY, name TEXT,
                metadata TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
            CREATE TABLE templates (row_id INTEGER PRIMARY KEY AUTOINCREMENT,
                template_id TEXT NOT NULL UNIQUE,
                identity_id TEXT NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
                model_id TEXT NOT NULL, dim INTEGER NOT NULL, embedding BLOB NOT NULL,
                created_at REAL NOT NULL, source TEXT, score REAL, crop BLOB);
            INSERT INTO meta VALUES ('schema_version', '1'), ('model_id', 'old');
            INSERT INTO identities VALUES ('a', NULL, '{}', 0), ('b', NULL, '{}', 0);
            """
        )
        db.executemany(
            "INSERT INTO templates(template_id, identity_id, model_id, dim, embedding, created_at,"
            " crop) VALUES (?, ?, 'old', 8, ?, 0, ?)",
            [("t1", "a", vector, png(112)), ("t2", "b", vector, png(150)), ("t3", "b", vector, None)],
        )


def test_schema_1_file_is_migrated_in_place(tmp_path):
    path = tmp_path / "g.sqlite"
    schema_1_file(path)
    for _ in range(2):  # migrating is idempotent
        with Gallery(path, model_id="new", embedding_size=8) as g:
            status = g.reembed_status()
    assert (status.reembeddable, status.other_geometry, status.without_crop) == (
        1, {"unknown geometry": 1}, 1,
    )
    assert status.blocked_identities == 1 and status.stale_identities == 2
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    with Gallery(path, model_id="new", embedding_size=8) as g:
        report = g.reembed(lambda batch: np.eye(8, dtype=np.float32)[1:2].repeat(len(batch), 0))
        assert (report.reembedded, report.blocked) == (1, 2)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="newer"):
        Gallery(path, model_id="new", embedding_size=8)
