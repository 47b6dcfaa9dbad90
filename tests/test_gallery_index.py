"""TemplateIndex: the automatic kind by gallery size, one-thread single queries, and that the
chosen index finds the exact nearest template for real photos' embeddings."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from facegate.gallery import index as index_mod
from facegate.gallery.index import AUTO_FLAT_MAX, TemplateIndex, auto_kind, ivf_lists
from server_support import default_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` (python -m bench)

from bench.gallery_data import Shape, split_real  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_kind_is_flat_up_to_the_threshold_then_ivf():
    assert auto_kind(0) == auto_kind(1_000) == auto_kind(AUTO_FLAT_MAX) == "flat"
    assert auto_kind(AUTO_FLAT_MAX + 1) == "ivf" and auto_kind(10_000_000) == "ivf"
    assert all(ivf_lists(n) for n in (AUTO_FLAT_MAX + 1, 1_000_000))  # IVF is trainable there


def test_auto_index_rebuilds_when_the_size_crosses_to_another_kind(monkeypatch):
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 6_000)
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(7_000, 16)))
    index = TemplateIndex(16, "auto", gpu=False)
    index.build(np.arange(5_000), vectors[:5_000])
    assert index.backend == "flat" and not index.needs_rebuild
    index.add(np.arange(5_000, 7_000), vectors[5_000:])
    assert index.needs_rebuild  # past the threshold: the owner rebuilds
    index.build(np.arange(7_000), vectors)
    assert index.backend == "ivf" and not index.needs_rebuild
    assert index.search(vectors[7], 1)[1][0, 0] == 7
    index.remove(np.arange(3_000, 7_000))  # back under: flat again at the next build
    assert index.needs_rebuild


def test_single_queries_run_on_one_thread_in_the_calling_thread_only():
    seen = []
    inner = faiss.IndexFlatIP(8)
    inner.add(unit(np.random.default_rng(1).normal(size=(50, 8))))

    class Spy:
        ntotal = 50

        def search(self, q, k):
            seen.append((len(q), faiss.omp_get_max_threads()))
            return inner.search(q, k)

    index = TemplateIndex(8, "hnsw", gpu=False)  # flat single queries go through NumPy
    index._index = Spy()
    default = faiss.omp_get_max_threads()
    index.search(np.ones((1, 8)), 3)
    index.search(np.ones((index_mod.BATCH_QUERIES, 8)), 3)
    assert seen == [(1, 1), (index_mod.BATCH_QUERIES, default)]
    assert faiss.omp_get_max_threads() == default  # restored
    other = []
    worker = threading.Thread(target=lambda: other.append(index.search(np.ones((1, 8)), 3)))
    worker.start()
    worker.join()
    assert seen[-1] == (1, 1) and other


@pytest.fixture(scope="module")
def real_embeddings(celeba_root):
    """30 people x 6 shared photos, detected, aligned and embedded as the server does."""
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder
    from facegate.export.parity import sample_crops

    bundle = load_bundle(default_bundle())
    crops, labels = sample_crops(celeba_root, 180, per_identity=6, seed=0, geometry=bundle.geometry)
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    return embedder.embed(crops), list(labels)


def test_flat_single_queries_equal_faiss_flat_after_adds_and_removes():
    """Searches between writes too: the views a search keeps must follow every change."""
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(500, 32)))
    index = TemplateIndex(32, "flat", gpu=False)
    index.build(np.arange(1000, 1400), vectors[:400])
    assert index.search(vectors[450], 1)[1][0, 0] != 2050  # not there yet
    index.add(np.arange(2000, 2100), vectors[400:])
    assert index.search(vectors[450], 1)[1][0, 0] == 2050
    assert index.search(vectors[50], 1)[1][0, 0] == 1050
    index.remove(np.arange(1000, 1100))
    assert index.search(vectors[50], 1)[1][0, 0] != 1050
    reference = faiss.IndexFlatIP(32)
    reference.add(vectors[100:])
    ids = np.concatenate([np.arange(1100, 1400), np.arange(2000, 2100)])
    for q in unit(rng.normal(size=(5, 32))):
        sims, found = index.search(q, 10)
        ref_sims, ref_rows = reference.search(q[None], 10)
        assert np.array_equal(found, ids[ref_rows]) and np.allclose(sims, ref_sims, atol=1e-5)
    assert index.search(vectors[150], 400)[1].shape == (1, 400)  # k = everything
    index.build(np.arange(7), vectors[:7])
    assert index.search(vectors[3], 7)[1][0, 0] == 3 and len(index) == 7


def test_auto_index_finds_the_exact_top_template_for_real_queries(real_embeddings, monkeypatch):
    """Past the flat threshold (lowered here to keep the test small) auto serves IVF with the
    tuned nlist/nprobe; its top hit for held-out real photos is the exact one, in a gallery of
    the enrolled real templates plus synthetic people shaped like them."""
    embeddings, labels = real_embeddings
    monkeypatch.setattr(index_mod, "AUTO_FLAT_MAX", 5_000)
    enrolled, _, queries = split_real(embeddings, labels, 3)
    fill = Shape(embeddings, labels).sample(6_000, 3, np.random.default_rng(2))
    base = np.concatenate([enrolled, fill])
    index = TemplateIndex(base.shape[1], "auto", gpu=False)
    index.build(np.arange(len(base)), base)
    assert index.backend == "ivf"
    exact = np.argmax(queries @ base.T, axis=1)
    found = np.array([index.search(q, 1)[1][0, 0] for q in queries])
    assert len(queries) >= 60 and np.mean(found == exact) >= 0.99
