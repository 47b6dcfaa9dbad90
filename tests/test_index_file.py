"""Persisted IVF centroids (gallery/index_file.py) with real SQLite galleries and real FAISS:
a restart reuses them without k-means and answers as a retrained index does; a stale,
foreign or damaged file is refused, retrained and rewritten; a sealed gallery seals it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from facegate.gallery.crypto import Sealer
from facegate.gallery.index import TrainedLists
from facegate.gallery.index_file import MAGIC, IndexFile, RefusedFile
from facegate.gallery.store import Gallery

DIM = 16
MODEL = "m@1"
IDENTITIES, PER = 60, 30  # 1,800 templates: 46 IVF lists


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(IDENTITIES, DIM)))
    return unit(np.repeat(centres, PER, axis=0) + 0.3 * rng.normal(size=(IDENTITIES * PER, DIM)))


def filled(path: Path, vectors: np.ndarray, sealer: Sealer | None = None) -> None:
    """Enrol everyone through a flat gallery, so the first IVF open trains once, at full size."""
    with Gallery(path, model_id=MODEL, embedding_size=DIM, index="flat", sealer=sealer) as g:
        for i in range(IDENTITIES):
            g.create_identity(f"p{i}", embeddings=vectors[i * PER:(i + 1) * PER])


def open_ivf(path: Path, sealer: Sealer | None = None, model_id: str = MODEL) -> Gallery:
    return Gallery(path, model_id=model_id, embedding_size=DIM, index="ivf", sealer=sealer)


def answers(g: Gallery, queries: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(c.identity_id, round(c.similarity, 6), c.template_id) for c in g.search(q, k=5)] for q in queries]


def queries_for(vectors: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    return unit(vectors[rng.choice(len(vectors), 40)] + 0.2 * rng.normal(size=(40, DIM)))


def test_a_restart_reuses_the_persisted_centroids_without_kmeans(tmp_path, vectors):
    path = tmp_path / "g.sqlite"
    filled(path, vectors)
    queries = queries_for(vectors)
    with open_ivf(path) as g:
        assert g._index.trainings == 1 and g._index.backend == "ivf"
        first = answers(g, queries)
    file = Path(f"{path}.ivf")
    written = file.read_bytes()
    stored = IndexFile(file, model_id=MODEL, dim=DIM).load()
    assert stored is not None and stored.size == len(stored.ids) == IDENTITIES * PER
    with open_ivf(path) as g:
        assert g._index.trainings == 0 and g._index.backend == "ivf"  # no k-means at restart
        np.testing.assert_array_equal(g._index.trained.centroids, stored.centroids)
        np.testing.assert_array_equal(g._index.trained.lists, stored.lists)  # rows not reassigned
        assert answers(g, queries) == first
    assert file.read_bytes() == written  # nothing new to persist
    file.unlink()
    with open_ivf(path) as g:  # the same vectors retrained (FAISS k-means is seeded)
        assert g._index.trainings == 1
        assert answers(g, queries) == first


def foreign(path: Path, **kwargs) -> bytes:
    """A well-formed file of another gallery's kind (another model, dimension or sealing)."""
    dim = kwargs.pop("dim", DIM)
    lists = TrainedLists(unit(np.random.default_rng(2).normal(size=(46, dim))), IDENTITIES * PER)
    return IndexFile(path, model_id=kwargs.pop("model_id", MODEL), dim=dim, **kwargs).encode(lists)


def other_training(path: Path) -> bytes:
    """A file whose centroids came from another k-means (plain, not spherical)."""
    good = foreign(path)
    end = good.index(b"\n", len(MAGIC)) + 1
    header = good[len(MAGIC):end].replace(b'"spherical k-means"', b'"k-means"')
    payload = good[end + 32:]
    return MAGIC + header + hashlib.sha256(header + payload).digest() + payload  # intact


def damaged(data: bytes) -> bytes:
    return data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]


@pytest.mark.parametrize("make", [
    lambda p, good: foreign(p, model_id="other@2"),
    lambda p, good: foreign(p, dim=8),
    lambda p, good: foreign(p, sealer=Sealer([os.urandom(32)])),
    lambda p, good: other_training(p),
    lambda p, good: damaged(good),
    lambda p, good: good[: len(good) // 2],
    lambda p, good: b"not an index file",
], ids=["model_id", "dimension", "sealed", "training", "damaged", "truncated", "garbage"])
def test_a_stale_foreign_or_damaged_file_is_refused_and_rebuilt(tmp_path, vectors, make):
    path = tmp_path / "g.sqlite"
    filled(path, vectors)
    queries = queries_for(vectors)
    with open_ivf(path) as g:
        fresh = answers(g, queries)
    file = Path(f"{path}.ivf")
    file.write_bytes(make(file, file.read_bytes()))
    with open_ivf(path) as g:
        assert g._index.trainings == 1  # refused: k-means again, never the bad file
        assert answers(g, queries) == fresh
    assert IndexFile(file, model_id=MODEL, dim=DIM).load() is not None  # rewritten


def test_the_refusal_names_the_reason(tmp_path):
    file = IndexFile(tmp_path / "g.ivf", model_id=MODEL, dim=DIM)
    with pytest.raises(RefusedFile, match="'k-means'"):
        file.decode(other_training(file.path))
    with pytest.raises(RefusedFile, match="model_id 'other@2'"):
        file.decode(foreign(file.path, model_id="other@2"))
    with pytest.raises(RefusedFile, match="checksum"):
        file.decode(damaged(foreign(file.path)))


def test_a_sealed_gallery_seals_the_file_and_reuses_it_with_its_key(tmp_path, vectors):
    path = tmp_path / "g.sqlite"
    master = [os.urandom(32)]
    filled(path, vectors, Sealer(master))
    with open_ivf(path, Sealer(master)) as g:
        assert g._index.trainings == 1
        centroids = g._index.trained.centroids
        first = answers(g, queries_for(vectors))
    data = Path(f"{path}.ivf").read_bytes()
    assert centroids[0].astype("<f4").tobytes() not in data  # no centroid in the clear
    assert oct(os.stat(f"{path}.ivf").st_mode & 0o777) == "0o600"
    with open_ivf(path, Sealer(master)) as g:
        assert g._index.trainings == 0
        assert answers(g, queries_for(vectors)) == first
    with pytest.raises(RefusedFile, match="master keys"):
        IndexFile(path, model_id=MODEL, dim=DIM, sealer=Sealer([os.urandom(32)])).decode(data)
    with pytest.raises(RefusedFile, match="sealed file, plaintext gallery"):
        IndexFile(path, model_id=MODEL, dim=DIM).decode(data)
    header_moved = data.replace(b'"nlist": 46', b'"nlist": 45')
    with pytest.raises(RefusedFile, match="master keys"):
        IndexFile(path, model_id=MODEL, dim=DIM, sealer=Sealer(master)).decode(header_moved)


def test_centroids_that_no_longer_fit_the_gallery_size_are_retrained(tmp_path, vectors):
    path = tmp_path / "g.sqlite"
    filled(path, vectors)
    small = TrainedLists(unit(vectors[:4]), 200)  # trained at 200: 1,800 is past 2x
    Path(f"{path}.ivf").write_bytes(IndexFile(f"{path}.ivf", model_id=MODEL, dim=DIM).encode(small))
    with open_ivf(path) as g:
        assert g._index.trainings == 1 and len(g._index.trained.centroids) == 46


def test_rows_added_since_are_assigned_at_open_and_persisted_once_a_tenth_are_new(tmp_path, vectors):
    path = tmp_path / "g.sqlite"
    filled(path, vectors)
    with open_ivf(path) as g:
        g.create_identity("late", embeddings=np.repeat(vectors[-1:], PER, axis=0))  # 1.7% new
    file = Path(f"{path}.ivf")
    written = file.read_bytes()
    with open_ivf(path) as g:
        assert g._index.trainings == 0 and len(g._index) == IDENTITIES * PER + PER
        assert file.read_bytes() == written  # under a tenth new: not rewritten
        for i in range(8):  # 240 more rows (15%); in memory, no rebuild (not past 2x)
            g.create_identity(f"new{i}", embeddings=vectors[i * PER:(i + 1) * PER])
    with open_ivf(path) as g:
        assert g._index.trainings == 0
        assert g.search(vectors[0], k=1)[0].identity_id in ("p0", "new0")
    stored = IndexFile(file, model_id=MODEL, dim=DIM).load()
    assert stored is not None and len(stored.ids) == IDENTITIES * PER + 9 * PER  # rewritten


def test_a_postgresql_replica_reuses_its_local_index_file(tmp_path, vectors):
    from facegate.gallery.postgres import PostgresGallery
    from postgres_support import cluster

    url = cluster().create_database()
    file = tmp_path / "replica.ivf"

    def replica(**kwargs) -> PostgresGallery:
        return PostgresGallery(url, model_id=MODEL, embedding_size=DIM, poll_s=60, **kwargs)

    with replica(index="flat") as g:
        for i in range(IDENTITIES):
            g.create_identity(f"p{i}", embeddings=vectors[i * PER:(i + 1) * PER])
    queries = queries_for(vectors)
    with replica(index="ivf", index_file=file) as g:
        assert g._cache.index.trainings == 1 and file.exists()
        first = answers(g, queries)
    with replica(index="ivf", index_file=file) as g:
        assert g._cache.index.trainings == 0  # its restart: no k-means
        assert answers(g, queries) == first
    with replica(index="ivf") as g:  # no local file named: every start trains
        assert g._cache.index.trainings == 1
        assert answers(g, queries) == first
