"""facegate.gallery: real SQLite files and real FAISS indexes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from facegate.core.errors import DuplicateIdentity, ModelMismatch, UnknownIdentity, UnknownTemplate
from facegate.gallery import Candidate, Gallery

DIM = 32
pytestmark = pytest.mark.usefixtures("single_threaded_faiss")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clusters(rng, identities: int, per: int, dim: int = DIM, noise: float = 0.05):
    """`identities` random centres with `per` noisy templates each: (centres, templates)."""
    centres = unit(rng.normal(size=(identities, dim)))
    templates = unit(centres[:, None, :] + noise * rng.normal(size=(identities, per, dim)))
    return centres, templates


def brute_force(query, vectors, labels, k):
    """Best template similarity per identity, top k identities, by NumPy."""
    sims = vectors @ query
    best: dict[str, float] = {}
    for sim, label in zip(sims, labels, strict=True):
        best[label] = max(best.get(label, -2.0), float(sim))
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    gallery = Gallery(tmp_path / "g.db", model_id="m@1#abc", embedding_size=DIM)
    vectors = unit(rng.normal(size=(2, DIM)))
    created = gallery.create_identity(
        "alice",
        name="Alice",
        metadata={"team": "x"},
        embeddings=vectors,
        sources=["a.jpg", None],
        scores=[0.9, None],
    )
    assert [t.source for t in created.templates] == ["a.jpg", None]
    assert [t.score for t in created.templates] == [pytest.approx(0.9), None]
    fetched = gallery.get_identity("alice")
    assert fetched == created
    assert fetched.metadata == {"team": "x"}
    np.testing.assert_array_equal(gallery.identity_embeddings("alice"), vectors)

    more = gallery.add_templates("alice", unit(rng.normal(size=(1, DIM))), sources=["b.jpg"])
    assert len(gallery.get_identity("alice").templates) == 3
    assert gallery.get_identity("alice").templates[-1] == more[0]

    anonymous = gallery.create_identity(None, embeddings=unit(rng.normal(size=(1, DIM))))
    assert len(anonymous.identity_id) == 32 and anonymous.name is None
    page, total = gallery.list_identities(offset=1, limit=1)
    assert total == 2 and [i.identity_id for i in page] == [anonymous.identity_id]
    vectors_all, labels = gallery.embeddings()
    assert vectors_all.shape == (4, DIM) and labels.count("alice") == 3
    stats = gallery.stats()
    assert (stats["identities"], stats["templates"], stats["stale_templates"]) == (2, 4, 0)
    assert stats["index"] == "flat" and stats["model_id"] == "m@1#abc"
    gallery.close()


def test_search_matches_numpy_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    gallery = Gallery(tmp_path / "g.db", model_id="m", embedding_size=DIM)
    vectors = unit(rng.normal(size=(300, DIM)))
    labels = [f"id{i // 3}" for i in range(300)]
    for start in range(0, 300, 3):
        gallery.create_identity(labels[start], embeddings=vectors[start : start + 3])
    for query in unit(rng.normal(size=(25, DIM))):
        got = gallery.search(query, k=7)
        expected = brute_force(query, vectors, labels, 7)
        assert [c.identity_id for c in got] == [label for label, _ in expected]
        np.testing.assert_allclose([c.similarity for c in got], [s for _, s in expected], atol=1e-5)
        best = got[0]
        template_ids = [t.template_id for t in gallery.get_identity(best.identity_id).templates]
        row = template_ids.index(best.template_id)
        own = gallery.identity_embeddings(best.identity_id)
        assert own[row] @ query == pytest.approx(best.similarity, abs=1e-5)
    assert len(gallery.search(vectors[0], k=500)) == 100
    gallery.close()


def test_persistence_across_reopen(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "g.db"
    _, templates = clusters(rng, 20, 3)
    with Gallery(path, model_id="m", embedding_size=DIM) as gallery:
        for i, rows in enumerate(templates):
            gallery.create_identity(f"p{i}", name=f"Person {i}", embeddings=rows)
        gallery.record_decision("p3", 0.7, True, "verify")
        query = templates[5, 0]
        before = gallery.search(query, k=5)
    with Gallery(path, model_id="m", embedding_size=DIM) as gallery:
        assert gallery.search(query, k=5) == before
        assert before[0] == Candidate("p5", "Person 5", pytest.approx(1.0), before[0].template_id)
        assert gallery.stats()["identities"] == 20
        assert gallery.decisions() == {"p3": [(pytest.approx(0.7), True)]}


def test_deletes_update_search(tmp_path):
    rng = np.random.default_rng(3)
    _, templates = clusters(rng, 10, 2)
    gallery = Gallery(tmp_path / "g.db", model_id="m", embedding_size=DIM)
    for i, rows in enumerate(templates):
        gallery.create_identity(f"p{i}", embeddings=rows)
    query = templates[4, 0]
    first = gallery.search(query, k=1)[0]
    assert first.identity_id == "p4"
    gallery.delete_template("p4", first.template_id)
    second = gallery.search(query, k=1)[0]
    assert second.identity_id == "p4" and second.template_id != first.template_id
    assert second.similarity < first.similarity
    gallery.delete_identity("p4")
    assert "p4" not in [c.identity_id for c in gallery.search(query, k=10)]
    assert gallery.stats()["templates"] == 18
    with pytest.raises(UnknownIdentity):
        gallery.delete_identity("p4")
    with pytest.raises(UnknownTemplate):
        gallery.delete_template("p5", first.template_id)
    gallery.close()


def test_typed_errors_and_model_mismatch(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "g.db"
    _, templates = clusters(rng, 3, 2)
    crops = rng.integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    gallery = Gallery(path, model_id="old", embedding_size=DIM, keep_crops=True)
    gallery.create_identity("a", embeddings=templates[0], crops=crops)
    gallery.create_identity("b", embeddings=templates[1])  # no crops: cannot be re-embedded
    with pytest.raises(DuplicateIdentity):
        gallery.create_identity("a", embeddings=templates[2])
    for call in (
        lambda: gallery.get_identity("zz"),
        lambda: gallery.add_templates("zz", templates[2]),
        lambda: gallery.identity_embeddings("zz"),
        lambda: gallery.record_decision("zz", 0.5, True, "verify"),
    ):
        with pytest.raises(UnknownIdentity):
            call()
    assert gallery.stats()["templates"] == 4  # the failed duplicate left nothing behind
    gallery.close()

    gallery = Gallery(path, model_id="new", embedding_size=DIM)
    assert gallery.stats()["stale_templates"] == 4
    with pytest.raises(ModelMismatch, match="2 identities") as mismatch:
        gallery.search(templates[0, 0])
    assert "facegate gallery reembed" in str(mismatch.value) and "re-enrol" in str(mismatch.value)
    seen: list[np.ndarray] = []

    def embed(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return templates[2][: len(batch)]

    report = gallery.reembed(embed)
    assert (report.reembedded, report.without_crop, report.blocked_identities) == (2, 2, 1)
    np.testing.assert_array_equal(np.concatenate(seen), crops)  # the kept crops, PNG lossless
    with pytest.raises(ModelMismatch, match="1 identities") as mismatch:
        gallery.search(templates[0, 0])
    assert "reembed" not in str(mismatch.value) and "re-enrol" in str(mismatch.value)
    gallery.delete_identity("b")
    assert gallery.search(templates[2, 0], k=1)[0].identity_id == "a"
    gallery.close()


def test_no_crops_stored_unless_kept(tmp_path):
    rng = np.random.default_rng(5)
    crops = rng.integers(0, 256, size=(1, 112, 112, 3), dtype=np.uint8)
    path = tmp_path / "g.db"
    with Gallery(path, model_id="old", embedding_size=DIM) as gallery:
        gallery.create_identity("a", embeddings=unit(rng.normal(size=(1, DIM))), crops=crops)
    with Gallery(path, model_id="new", embedding_size=DIM, keep_crops=True) as gallery:
        report = gallery.reembed(lambda batch: pytest.fail("no crop should have been kept"))
        assert (report.reembedded, report.without_crop) == (0, 1)


def test_decisions_are_bounded(tmp_path):
    gallery = Gallery(tmp_path / "g.db", model_id="m", embedding_size=DIM, decisions_per_identity=5)
    gallery.create_identity("a", embeddings=unit(np.ones((1, DIM))))
    for i in range(12):
        gallery.record_decision("a", i / 10, i % 2 == 0, "verify")
    assert gallery.decisions() == {"a": [(pytest.approx(i / 10), i % 2 == 0) for i in range(7, 12)]}
    gallery.delete_identity("a")
    assert gallery.decisions() == {}
    gallery.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_the_right_identity(tmp_path, kind):
    rng = np.random.default_rng(6)
    identities, per = 200, 10
    centres, templates = clusters(rng, identities, per)
    path = tmp_path / "g.db"
    gallery = Gallery(path, model_id="m", embedding_size=DIM, index=kind)
    for i, rows in enumerate(templates):
        gallery.create_identity(f"p{i}", embeddings=rows)
    assert gallery.stats()["index_backend"] == kind  # IVF trained once 2,000 vectors were in
    probes = unit(centres + 0.05 * rng.normal(size=centres.shape))
    hits = [gallery.search(p, k=1)[0].identity_id for p in probes]
    assert hits == [f"p{i}" for i in range(identities)]

    deleted = [f"p{i}" for i in range(0, identities, 3)]  # a third: forces an HNSW rebuild
    for identity in deleted:
        gallery.delete_identity(identity)
    found = {c.identity_id for p in probes for c in gallery.search(p, k=3)}
    assert found.isdisjoint(deleted)
    assert gallery.stats()["indexed_templates"] == (identities - len(deleted)) * per
    gallery.close()
    with Gallery(path, model_id="m", embedding_size=DIM, index=kind) as reopened:
        assert reopened.search(probes[1], k=1)[0].identity_id == "p1"


def test_flat_ivf_falls_back_below_training_size(tmp_path):
    rng = np.random.default_rng(7)
    _, templates = clusters(rng, 10, 3)
    with Gallery(tmp_path / "g.db", model_id="m", embedding_size=DIM, index="ivf") as gallery:
        for i, rows in enumerate(templates):
            gallery.create_identity(f"p{i}", embeddings=rows)
        assert gallery.stats()["index_backend"] == "flat"
        assert gallery.search(templates[3, 1], k=1)[0].identity_id == "p3"


def test_concurrent_writers_and_readers(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "g.db"
    gallery = Gallery(path, model_id="m", embedding_size=DIM)
    _, seed_templates = clusters(rng, 10, 2)
    for i, rows in enumerate(seed_templates):
        gallery.create_identity(f"seed{i}", embeddings=rows)
    errors: list[BaseException] = []
    kept: list[str] = []
    kept_lock = threading.Lock()
    per_writer, writers = 25, 4

    def writer(w: int) -> None:
        local = np.random.default_rng(100 + w)
        for n in range(per_writer):
            identity = f"w{w}-{n}"
            gallery.create_identity(identity, embeddings=unit(local.normal(size=(2, DIM))))
            if n % 5 == 4:
                gallery.delete_identity(identity)
            else:
                gallery.add_templates(identity, unit(local.normal(size=(1, DIM))))
                with kept_lock:
                    kept.append(identity)

    def reader(r: int) -> None:
        local = np.random.default_rng(200 + r)
        for _ in range(60):
            candidates = gallery.search(unit(local.normal(size=DIM)), k=5)
            assert len(candidates) == 5
            sims = [c.similarity for c in candidates]
            assert sims == sorted(sims, reverse=True)
            gallery.list_identities(limit=10)
            gallery.get_identity("seed0")

    def guarded(fn, i):
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(writer, w)) for w in range(writers)]
    threads += [threading.Thread(target=guarded, args=(reader, r)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected_identities = 10 + len(kept)
    expected_templates = 20 + 3 * len(kept)
    assert len(kept) == writers * per_writer * 4 // 5
    stats = gallery.stats()
    assert (stats["identities"], stats["templates"]) == (expected_identities, expected_templates)
    assert stats["indexed_templates"] == expected_templates
    assert len(gallery.embeddings()[1]) == expected_templates
    gallery.close()
    with Gallery(path, model_id="m", embedding_size=DIM) as reopened:
        assert reopened.list_identities(limit=1)[1] == expected_identities
        assert reopened.stats()["indexed_templates"] == expected_templates


ENROL_LOOP = """
import sys, numpy as np
from facegate.gallery import Gallery
gallery = Gallery(sys.argv[1], model_id="m", embedding_size={dim})
rng = np.random.default_rng(0)
n = 0
while True:
    v = rng.normal(size=(1, {dim})).astype(np.float32)
    identity = gallery.create_identity(f"k{{n}}", embeddings=v / np.linalg.norm(v))
    print(identity.templates[0].template_id, flush=True)
    n += 1
"""


def test_acknowledged_enrolments_survive_kill_9(tmp_path):
    path = tmp_path / "g.db"
    process = subprocess.Popen(
        [sys.executable, "-c", ENROL_LOOP.format(dim=DIM), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            acknowledged.append(line.strip())
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 40, "the enrolling process stopped early"
    with Gallery(path, model_id="m", embedding_size=DIM) as reopened:
        identities, total = reopened.list_identities(limit=10_000)
        stored = {t.template_id for i in identities for t in i.templates}
        assert set(acknowledged) <= stored
        assert total >= len(acknowledged)
        assert reopened.stats()["indexed_templates"] == total


def test_rejects_malformed_embeddings(tmp_path):
    with Gallery(Path(tmp_path) / "g.db", model_id="m", embedding_size=DIM) as gallery:
        with pytest.raises(ValueError):
            gallery.create_identity("a", embeddings=np.ones((1, DIM), dtype=np.float32))
        with pytest.raises(ValueError):
            gallery.create_identity("a", embeddings=unit(np.ones((1, DIM + 1))))
        assert gallery.stats()["identities"] == 0
