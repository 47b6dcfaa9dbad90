"""Sealed at rest and gone when deleted, on a real `facegate serve` with a real SQLite
gallery (crops kept): while the server runs, no file of the gallery (main, -wal, -shm)
holds the person's name, metadata, crop or embedding in the clear, and after the delete
not even their ciphertext or wrapped key. Plus the sealer's own rules."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from facegate.gallery.crypto import MAGIC, Sealer, SealError, load_sealer, parse_master_keys
from facegate.gallery.store import Gallery
from server_support import REPO, default_bundle, free_port, people, start_server

NAME = "Zelda Uniquename-4711"
METADATA = {"badge": "QX-99817-secret", "team": "night shift"}


def gallery_bytes(gallery: Path) -> bytes:
    return b"".join(p.read_bytes() for p in gallery.parent.glob(gallery.name + "*"))


def unsealed_rows(gallery: Path, sealer: Sealer, identity_id: str) -> dict[str, list[bytes]]:
    """What the test must never find in the clear: read back through the master key."""
    db = sqlite3.connect(f"file:{gallery}?mode=ro", uri=True)
    try:
        (wrapped,) = db.execute("SELECT sealed_key FROM identities WHERE identity_id = ?",
                                (identity_id,)).fetchone()
        sealer.remember(identity_id, wrapped)
        rows = db.execute("SELECT template_id, embedding, crop FROM templates WHERE identity_id = ?",
                          (identity_id,)).fetchall()
    finally:
        db.close()
    return {  # 32-byte pieces: a crop spans SQLite overflow pages, a piece seldom does
        "wrapped": [bytes(wrapped)],
        "sealed": [piece for _, e, c in rows for b in (e, c) for piece in pieces(bytes(b))],
        "embedding": [piece for t, e, _ in rows
                      for piece in pieces(sealer.open(identity_id, f"embedding:{t}", e))],
        "crop": [piece for t, _, c in rows
                 for piece in pieces(sealer.open(identity_id, f"crop:{t}", c))],
    }


def pieces(blob: bytes, n: int = 5) -> list[bytes]:
    step = max(1, (len(blob) - 32) // n)
    return [blob[i : i + 32] for i in range(16, len(blob) - 32, step)][:n]


@pytest.fixture
def master_key(tmp_path) -> Path:
    path = tmp_path / "secrets" / "master.key"  # not beside the gallery
    path.parent.mkdir()
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def test_a_deleted_identity_leaves_nothing_readable_in_any_sqlite_file(tmp_path, master_key, celeba_index):
    _, paths = next(iter(people(celeba_index).items()))
    gallery = tmp_path / "data" / "gallery.sqlite"
    gallery.parent.mkdir()
    port = free_port()
    proc = start_server(default_bundle(), gallery, port, env={
        "FACEGATE_MASTER_KEY_FILE": str(master_key), "FACEGATE_KEEP_CROPS": "true"})
    base = f"http://127.0.0.1:{port}"
    try:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:2]]
        enrolled = httpx.post(f"{base}/v1/identities", timeout=60, files=files, data={
            "identity_id": "zelda", "name": NAME, "metadata": json.dumps(METADATA)})
        assert enrolled.status_code == 201, enrolled.text
        keep = [("images", (paths[2].name, paths[2].read_bytes(), "image/jpeg"))]
        assert httpx.post(f"{base}/v1/identities", timeout=60, files=keep,
                          data={"identity_id": "other", "name": "Other Person"}).status_code == 201
        shown = httpx.get(f"{base}/v1/identities/zelda").json()
        assert shown["name"] == NAME and shown["metadata"] == METADATA  # opened for the API
        assert [t["source"] for t in shown["templates"]] == [p.name for p in paths[:2]]
        found = httpx.post(f"{base}/v1/search", timeout=60,
                           files={"image": (paths[3].name, paths[3].read_bytes())}).json()
        assert found["candidates"][0]["name"] == NAME

        secrets = unsealed_rows(gallery, Sealer(parse_master_keys(master_key.read_text())), "zelda")
        clear = [NAME.encode(), METADATA["badge"].encode(), *secrets["embedding"], *secrets["crop"],
                 *(p.name.encode() for p in paths[:2])]  # photo file names are sealed too
        before = gallery_bytes(gallery)
        assert sum(s in before for s in secrets["sealed"]) >= 0.8 * len(secrets["sealed"])  # seen...
        assert not any(s in before for s in clear)  # ...and they are sealed at rest

        assert httpx.delete(f"{base}/v1/identities/zelda").status_code == 200
        after = gallery_bytes(gallery)  # the server still runs, the files are open
        for what in ("embedding", "crop", "sealed", "wrapped"):
            assert not any(s in after for s in secrets[what]), what
        assert not any(s in after for s in clear)
        assert httpx.get(f"{base}/v1/identities/other").json()["name"] == "Other Person"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_existing_plaintext_gallery_is_sealed_at_open_and_the_index_rebuilt(tmp_path, master_key):
    path = tmp_path / "g.sqlite"
    vector = np.zeros((1, 4), np.float32)
    vector[0, 1] = 1
    with Gallery(path, model_id="m", embedding_size=4) as plain:
        plain.create_identity("p", name=NAME, metadata=METADATA, embeddings=vector,
                              sources=["IMG_0042-zelda.jpg"])
    assert NAME.encode() in gallery_bytes(path)
    sealer = load_sealer(master_key_file=master_key, data_dir=path.parent)
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer) as sealed:
        assert sealed.get_identity("p").name == NAME
        assert sealed.get_identity("p").templates[0].source == "IMG_0042-zelda.jpg"
        assert sealed.search(vector[0], k=1)[0].name == NAME
        sealed._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        stored = gallery_bytes(path)
    assert NAME.encode() not in stored and vector.tobytes() not in stored and MAGIC in stored
    assert b"IMG_0042-zelda.jpg" not in stored
    with pytest.raises(SealError, match="MASTER_KEY"):  # sealed: no serving without its key
        Gallery(path, model_id="m", embedding_size=4)


def test_rotation_rewraps_keys_and_the_old_key_can_go(tmp_path, master_key):
    path = tmp_path / "g.sqlite"
    vector = np.eye(4, dtype=np.float32)[:1]
    with Gallery(path, model_id="m", embedding_size=4,
                 sealer=load_sealer(master_key_file=master_key)) as g:
        g.create_identity("p", name=NAME, embeddings=vector)
    old = master_key.read_text()
    new = base64.b64encode(os.urandom(32)).decode()
    master_key.write_text(f"{new}\n{old}")
    env = {**os.environ, "FACEGATE_MASTER_KEY_FILE": str(master_key), "FACEGATE_GALLERY": str(path)}
    done = subprocess.run([sys.executable, "-m", "facegate", "gallery", "rotate-key"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "re-wrapped 1 identity keys" in done.stdout
    master_key.write_text(new + "\n")  # the old key destroyed
    with Gallery(path, model_id="m", embedding_size=4,
                 sealer=load_sealer(master_key_file=master_key)) as g:
        assert g.get_identity("p").name == NAME
        assert len(g.identity_embeddings("p")) == 1
    master_key.write_text(old)
    with pytest.raises(SealError, match="not configured"):
        Gallery(path, model_id="m", embedding_size=4, sealer=load_sealer(master_key_file=master_key))


def test_sealed_values_are_bound_to_their_row_and_keys_kept_off_the_data(tmp_path):
    sealer = Sealer([os.urandom(32)])
    wrapped, key = sealer.new_key("a")
    sealer.adopt("a", key)
    blob = sealer.seal("a", "embedding:t1", b"vector")
    assert sealer.open("a", "embedding:t1", blob) == b"vector"
    with pytest.raises(SealError):  # moved to another template
        sealer.open("a", "embedding:t2", blob)
    assert sealer.open_vectors([(1, "a", "t2")], [blob]) == [b""]  # quarantined, never matched
    with pytest.raises(SealError):  # another identity's wrapped key
        Sealer([os.urandom(32)]).remember("a", wrapped)
    beside = tmp_path / "master.key"
    beside.write_text(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(SealError, match="beside"):
        load_sealer(master_key_file=beside, data_dir=tmp_path)


def test_reembed_opens_sealed_crops_and_seals_the_new_vectors(tmp_path, master_key):
    from facegate.core.align import ARCFACE_112

    path = tmp_path / "g.sqlite"
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 255, (1, 112, 112, 3), dtype=np.uint8)
    sealer = lambda: load_sealer(master_key_file=master_key)  # noqa: E731
    with Gallery(path, model_id="old", embedding_size=4, keep_crops=True, geometry=ARCFACE_112,
                 sealer=sealer()) as g:
        g.create_identity("p", name=NAME, embeddings=np.eye(4, dtype=np.float32)[:1], crops=crop)
    seen = []

    def embed(crops: np.ndarray) -> np.ndarray:
        seen.append(crops.copy())
        return np.eye(4, dtype=np.float32)[1:2].repeat(len(crops), axis=0)

    with Gallery(path, model_id="new", embedding_size=4, keep_crops=True, geometry=ARCFACE_112,
                 sealer=sealer()) as g:
        assert g.reembed(embed).reembedded == 1
        np.testing.assert_array_equal(seen[0], crop)  # the crop came back opened
        assert g.search(np.eye(4, dtype=np.float32)[1], k=1)[0].identity_id == "p"
    assert np.eye(4, dtype=np.float32)[1].tobytes() not in gallery_bytes(path)
