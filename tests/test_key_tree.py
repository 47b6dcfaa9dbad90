"""The key tree (gallery/key_tree.py): a deleted identity's key is gone from every copy at
once, on real SQLite files and a real `facegate serve`; everyone else still opens."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from facegate.core.errors import UnknownIdentity
from facegate.gallery.crypto import Sealer, SealError, leaf_of, load_sealer
from facegate.gallery.key_tree import DEPTH, KeyTree, KeyTreeFile, Shredded
from facegate.gallery.store import Gallery
from server_support import REPO, default_bundle, free_port, people, start_server


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    master = secrets / "master.key"
    master.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    tree = tmp_path / "keys.tree"  # beside the data is allowed: alone it opens nothing
    KeyTreeFile.create(tree)
    return master, tree


def sealer(keys: tuple[Path, Path], tree: Path | None = None) -> Sealer:
    return load_sealer(master_key_file=keys[0], key_tree_file=tree or keys[1])


def vector(i: int, dim: int = 4) -> np.ndarray:
    v = np.zeros((1, dim), np.float32)
    v[0, i % dim] = 1
    return v


def wrapped_key(path: Path, identity_id: str) -> bytes:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return bytes(db.execute("SELECT sealed_key FROM identities WHERE identity_id = ?",
                                (identity_id,)).fetchone()[0])
    finally:
        db.close()


def test_a_punctured_leaf_cannot_be_derived_and_every_other_leaf_is_unchanged():
    tree = KeyTree.fresh()
    rng = np.random.default_rng(0)
    leaves = sorted({int(x) for x in rng.integers(0, 5000, 300)}) + [2**DEPTH - 1]
    before = {leaf: tree.leaf_key(leaf) for leaf in leaves}
    gone = set(leaves[::3])
    for leaf in gone:
        assert tree.puncture(leaf)
    assert not tree.puncture(leaves[0])  # twice: nothing left to forget
    for leaf in leaves:
        if leaf in gone:
            with pytest.raises(Shredded):
                tree.leaf_key(leaf)
        else:
            assert tree.leaf_key(leaf) == before[leaf]
    # No stored node lies on a punctured leaf's path: nothing derives its key.
    for depth, prefix in tree.nodes:
        assert not any(leaf >> (DEPTH - depth) == prefix for leaf in gone)
    again = KeyTree.from_bytes(tree.to_bytes())
    assert again.nodes == tree.nodes and again.leaf_key(leaves[1]) == before[leaves[1]]
    assert len(tree.to_bytes()) < 37 * DEPTH * len(gone)  # a few hundred bytes a deletion
    damaged = bytearray(tree.to_bytes())
    damaged[40] ^= 1
    with pytest.raises(ValueError, match="damaged"):
        KeyTree.from_bytes(bytes(damaged))


def test_the_file_is_rewritten_on_each_puncture_and_its_old_bytes_are_gone(tmp_path):
    path = tmp_path / "keys.tree"
    KeyTreeFile.create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        KeyTreeFile.create(path)  # never overwrites a tree (it would lose the gallery)
    tree = KeyTreeFile(path)
    root = tree.tree.nodes[(0, 0)]
    assert tree.puncture([7]) == 1 and tree.puncture([7]) == 0
    stored = path.read_bytes()
    assert root not in stored and KeyTreeFile(path).tree.nodes == tree.tree.nodes
    assert [p.name for p in tmp_path.iterdir()] == ["keys.tree"]  # no temporary left


def test_a_backup_of_the_gallery_keeps_nobody_the_delete_shredded(tmp_path, keys):
    path = tmp_path / "g.sqlite"
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer(keys)) as g:
        g.create_identity("gone", name="Ada Leftover", embeddings=vector(0))
        g.create_identity("kept", name="Bea Kept", embeddings=vector(1))
        backup = tmp_path / "backup.sqlite"
        shutil.copy(path, backup)  # a backup taken while both were enrolled
        for suffix in ("-wal", "-shm"):
            if Path(f"{path}{suffix}").exists():
                shutil.copy(f"{path}{suffix}", f"{backup}{suffix}")
        wrapped = wrapped_key(path, "gone")
        assert leaf_of(wrapped) is not None and leaf_of(wrapped) != leaf_of(wrapped_key(path, "kept"))
        g.delete_identity("gone")
        # As soon as the delete returns: the key tree holds nothing that derives its leaf.
        with pytest.raises(SealError, match="shredded"):
            sealer(keys).remember("gone", wrapped)
    with Gallery(backup, model_id="m", embedding_size=4, sealer=sealer(keys)) as restored:
        assert restored.get_identity("kept").name == "Bea Kept"  # the rest of the backup opens
        with pytest.raises(UnknownIdentity):  # and the delete it predates is finished
            restored.get_identity("gone")
        assert [c.identity_id for c in restored.search(vector(0)[0], k=2)] == ["kept"]


def test_a_copy_of_the_tree_that_missed_a_delete_is_punctured_when_the_gallery_opens(tmp_path, keys):
    path = tmp_path / "g.sqlite"
    stale = tmp_path / "stale.tree"
    shutil.copy(keys[1], stale)  # as if the process died between the commit and the puncture
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer(keys)) as g:
        g.create_identity("gone", embeddings=vector(0))
        g.create_identity("kept", embeddings=vector(1))
        wrapped = wrapped_key(path, "gone")
        g.delete_identity("gone")
    assert KeyTreeFile(stale).leaf_key(leaf_of(wrapped))  # the stale copy still derives it...
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer(keys, stale)) as g:
        assert g.get_identity("kept")  # ...until the gallery opens with it
    with pytest.raises(Shredded):
        KeyTreeFile(stale).leaf_key(leaf_of(wrapped))


def test_a_sealed_gallery_gets_leaves_at_open_and_rotation_keeps_them(tmp_path, keys):
    path = tmp_path / "g.sqlite"
    with Gallery(path, model_id="m", embedding_size=4,
                 sealer=load_sealer(master_key_file=keys[0])) as g:  # sealed before the tree
        g.create_identity("a", name="Cy Before", embeddings=vector(0))
    assert leaf_of(wrapped_key(path, "a")) is None
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer(keys)) as g:
        assert g.get_identity("a").name == "Cy Before"
        g.create_identity("b", embeddings=vector(1))
    leaf_a, leaf_b = leaf_of(wrapped_key(path, "a")), leaf_of(wrapped_key(path, "b"))
    assert {leaf_a, leaf_b} == {0, 1}  # handed out in order, each once
    old = keys[0].read_text()
    new = base64.b64encode(os.urandom(32)).decode()
    keys[0].write_text(f"{new}\n{old}")
    env = {**os.environ, "FACEGATE_MASTER_KEY_FILE": str(keys[0]), "FACEGATE_GALLERY": str(path),
           "FACEGATE_KEY_TREE_FILE": str(keys[1])}
    done = subprocess.run([sys.executable, "-m", "facegate", "gallery", "rotate-key"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    keys[0].write_text(new + "\n")
    assert leaf_of(wrapped_key(path, "a")) == leaf_a
    with Gallery(path, model_id="m", embedding_size=4, sealer=sealer(keys)) as g:
        assert g.get_identity("a").name == "Cy Before"
    with pytest.raises(SealError, match="master key too"):
        load_sealer(key_tree_file=keys[1])


def test_the_cli_writes_a_tree_and_never_overwrites_one(tmp_path):
    path = tmp_path / "keys.tree"
    run = lambda: subprocess.run([sys.executable, "-m", "facegate", "gallery", "new-key-tree",  # noqa: E731
                                  str(path)], cwd=REPO, capture_output=True, text=True)
    first = run()
    assert first.returncode == 0 and "FACEGATE_KEY_TREE_FILE" in first.stdout
    data = path.read_bytes()
    assert run().returncode == 1 and path.read_bytes() == data
    assert KeyTreeFile(path).tree.nodes.keys() == {(0, 0)}


def test_a_delete_over_http_shreds_the_key_before_it_answers(tmp_path, keys, celeba_index):
    (_, paths), (_, others) = list(people(celeba_index).items())[:2]
    gallery = tmp_path / "data" / "gallery.sqlite"
    gallery.parent.mkdir()
    port = free_port()
    proc = start_server(default_bundle(), gallery, port, env={
        "FACEGATE_MASTER_KEY_FILE": str(keys[0]), "FACEGATE_KEY_TREE_FILE": str(keys[1]),
        "FACEGATE_KEEP_CROPS": "true"})
    base = f"http://127.0.0.1:{port}"
    try:
        for identity_id, photos in (("dora", paths), ("eli", others)):
            files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:1]]
            answer = httpx.post(f"{base}/v1/identities", timeout=60, files=files,
                                data={"identity_id": identity_id, "name": identity_id.title()})
            assert answer.status_code == 201, answer.text
        wrapped = wrapped_key(gallery, "dora")
        tree_before = keys[1].read_bytes()
        assert httpx.delete(f"{base}/v1/identities/dora").status_code == 200
        assert keys[1].read_bytes() != tree_before
        with pytest.raises(Shredded):  # read from the file, while the server still runs
            KeyTreeFile(keys[1]).leaf_key(leaf_of(wrapped))
        assert httpx.get(f"{base}/v1/identities/eli").json()["name"] == "Eli"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    port = free_port()
    proc = start_server(default_bundle(), gallery, port, env={
        "FACEGATE_MASTER_KEY_FILE": str(keys[0]), "FACEGATE_KEY_TREE_FILE": str(keys[1])})
    try:  # restarted: the rest of the gallery still opens
        assert httpx.get(f"http://127.0.0.1:{port}/v1/identities/eli").json()["name"] == "Eli"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
