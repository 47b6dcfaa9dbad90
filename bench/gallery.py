"""Part 4, gallery: 1:N search at 10k / 100k / 1M templates of the default model's real embeddings.

Base: the shared photos' enrolled templates embedded by the bundle, then synthetic fill
shaped like them (`bench.gallery_data`); queries: the enrolled people's held-out real
photos. Ground truth is exact search (chunked NumPy), so R@1 is the share of queries
whose top hit is the exact top hit. Swept: IVF-Flat over nlist and nprobe, HNSW over
efSearch, IVF-SQ8 (not served; its recall next to its memory), facegate's
``TemplateIndex`` as the server builds it (flat, ivf, auto), FAISS flat with its default
threads (the old single-query path) and NumPy brute force (the peer). Latency is of
single queries, one at a time, on one FAISS thread unless the row says otherwise. At the
largest size, a real SQLite gallery of the same vectors, plaintext and sealed, is opened
and restarted (`bench.gallery_restart`).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.gallery_data import CHUNK, Shape, real_embeddings, shape_stats, split_real
from bench.measure import summarise

SIZES = {
    "full": {"sizes": [10_000, 100_000, 1_000_000], "identities": None, "enrol": 4,
             "queries": 500, "timed": 200, "budget_s": 3.0, "nlist_factors": [1, 2, 4],
             "nprobes": [4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 384], "hnsw_m": 32,
             "hnsw_max": 100_000,
             "ef_searches": [16, 32, 64, 128, 256]},
    "smoke": {"sizes": [3_000], "identities": 6, "enrol": 4, "queries": 20, "timed": 10,
              "budget_s": 0.5, "nlist_factors": [1], "nprobes": [1, 4], "hnsw_m": 16,
              "hnsw_max": 3_000, "ef_searches": [16]},
}
K = 10
TARGET_RECALL = 0.99
TARGET_P50_MS = 5.0


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k inner products, computed in chunks with NumPy (the ground truth)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(base), CHUNK):
        scores = queries @ base[start:start + CHUNK].T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        best_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """k-recall@k: share of the exact top-k that the index also returns in its top-k."""
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist())) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits) / k)


def numpy_search(base: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The naive peer: one matrix-vector product and a partial sort."""
    scores = base @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def single_query_times(search: Callable[[np.ndarray], object], queries: np.ndarray,
                       count: int, budget_s: float) -> list[float]:
    """Durations of one-query searches (one warm-up), up to `count` or until `budget_s` is spent."""
    search(queries[0])
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for q in queries[:count]:
        if len(times) >= 10 and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
    return times


def row(index: str, params: str, n: int, found: np.ndarray, exact: np.ndarray,
        times: list[float], build_s: float, index_bytes: float, family: str) -> dict:
    return {"index": index, "params": params, "family": family, "n": n,
            "recall_at_1": float(np.mean(found[:, 0] == exact[:, 0])),
            "recall_at_10": recall(found, exact, K), "search": summarise(times),
            "build_s": build_s, "bytes_per_template": index_bytes / n}


def faiss_bytes(index: object) -> int:
    """Serialised size of a FAISS index: what it holds in memory, without allocator slack."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def sweep(name: str, family: str, build: Callable[[], object], knob: str, values: list[int],
          base: np.ndarray, queries: np.ndarray, exact: np.ndarray, sizes: dict) -> list[dict]:
    """Build one FAISS index, then measure it at each search-time knob value (one thread)."""
    import faiss

    gc.collect()
    t0 = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    nbytes = faiss_bytes(index)
    out = []
    for value in values:
        faiss.ParameterSpace().set_index_parameter(index, knob, value)
        _, found = index.search(queries, K)
        times = single_query_times(lambda q: index.search(q[None], K), queries,
                                   sizes["timed"], sizes["budget_s"])
        out.append(row(name, f"{knob}={value}", len(base), found, exact, times, build_s, nbytes,
                       family))
    return out


def ivf_rows(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, sizes: dict) -> list[dict]:
    import faiss
    from facegate.gallery.index import (
        IVF_TRAIN_ITERATIONS,
        IVF_TRAIN_PER_LIST,
        IVF_TRAIN_SAMPLE_PER_LIST,
    )

    n, dim = base.shape
    rows = []
    root = int(math.sqrt(n))
    for factor in sizes["nlist_factors"]:
        nlist = factor * root
        if n < IVF_TRAIN_PER_LIST * nlist:
            continue
        codes = [("IVF-Flat", "Flat", "ivf")]
        if factor == sizes["nlist_factors"][-1]:
            codes.append(("IVF-SQ8", "SQ8", "compressed"))
        for label, code, family in codes:
            def build(code: str = code, nlist: int = nlist) -> faiss.Index:
                index = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
                ivf = faiss.extract_index_ivf(index)  # trained as the server trains
                ivf.cp.max_points_per_centroid = IVF_TRAIN_SAMPLE_PER_LIST
                ivf.cp.niter = IVF_TRAIN_ITERATIONS
                ivf.cp.spherical = True
                index.train(base)
                index.add(base)
                return index
            probes = [p for p in sizes["nprobes"] if p <= nlist]
            rows += sweep(f"{label} nlist={nlist}", family, build, "nprobe", probes, base, queries,
                          exact, sizes)
    return rows


def hnsw_rows(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, sizes: dict) -> list[dict]:
    import faiss

    m = sizes["hnsw_m"]

    def build() -> faiss.Index:
        index = faiss.IndexHNSWFlat(base.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.add(base)
        return index

    return sweep(f"HNSW M={m}", "hnsw", build, "efSearch", sizes["ef_searches"], base, queries,
                 exact, sizes)


def facegate_rows(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, sizes: dict) -> list[dict]:
    """``TemplateIndex`` as the server builds it, searched as the server does (one query a call)."""
    from facegate.gallery.index import TemplateIndex, auto_kind

    rows = []
    for kind in ("flat", "ivf"):
        gc.collect()
        t0 = time.perf_counter()
        index = TemplateIndex(base.shape[1], kind, gpu=False)
        index.build(np.arange(len(base)), base)
        build_s = time.perf_counter() - t0
        found = np.concatenate([index.search(queries[i:i + 1], K)[1] for i in range(len(queries))])
        times = single_query_times(lambda q, index=index: index.search(q, K), queries,
                                   sizes["timed"], sizes["budget_s"])
        rows.append(row(f"facegate {kind}", f"backend {index.backend}", len(base), found, exact,
                        times, build_s, faiss_bytes(index._index), "facegate"))
    auto = next(r for r in rows if r["index"] == f"facegate {auto_kind(len(base))}")
    return rows + [{**auto, "index": "facegate auto (the server's default)"}]


def peer_rows(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, sizes: dict) -> list[dict]:
    """NumPy brute force, and FAISS flat with its default OpenMP threads (the old search path)."""
    import faiss

    found = np.stack([numpy_search(base, q, K) for q in queries])
    times = single_query_times(lambda q: numpy_search(base, q, K), queries, sizes["timed"],
                               sizes["budget_s"])
    out = [row("NumPy brute force (peer)", "-", len(base), found, exact, times, 0.0, base.nbytes,
               "peer")]
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    threads = faiss.omp_get_max_threads()
    times = single_query_times(lambda q: flat.search(q[None], K), queries, sizes["timed"],
                               sizes["budget_s"])
    out.append(row(f"FAISS flat, {threads} OpenMP threads (old path)", "-", len(base),
                   flat.search(queries, K)[1], exact, times, 0.0, faiss_bytes(flat), "peer"))
    return out


def run(sizes: dict, workdir: Path) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    embeddings, labels, model = real_embeddings(workdir, sizes["identities"])
    shape = Shape(embeddings, labels)
    enrolled, enrolled_labels, held_out = split_real(embeddings, labels, sizes["enrol"])
    queries = held_out[np.sort(rng.choice(len(held_out), min(sizes["queries"], len(held_out)),
                                          replace=False))]
    check = shape.sample(max(shape.identities, 200), 20, rng)
    stats = {"real": shape_stats(embeddings, labels, rng),
             "synthetic": shape_stats(check, [str(i // 20) for i in range(len(check))], rng)}
    rows, faiss_threads = [], faiss.omp_get_max_threads()
    for n in sizes["sizes"]:
        print(f"bench: gallery {n:,} x {embeddings.shape[1]}", flush=True)
        fill = shape.sample(-(-(n - len(enrolled)) // sizes["enrol"]), sizes["enrol"], rng)
        base = np.concatenate([enrolled, fill[: n - len(enrolled)]])
        del fill
        exact = exact_topk(base, queries, K)
        rows += peer_rows(base, queries, exact, sizes)
        faiss.omp_set_num_threads(1)
        try:
            rows += facegate_rows(base, queries, exact, sizes)
            rows += ivf_rows(base, queries, exact, sizes)
            if n <= sizes["hnsw_max"]:
                rows += hnsw_rows(base, queries, exact, sizes)
        finally:
            faiss.omp_set_num_threads(faiss_threads)
        if n == sizes["sizes"][-1]:  # a real SQLite gallery of the largest size, restarted
            from bench.gallery_restart import restart_part

            restart = restart_part(base, queries, exact, workdir)
        print(f"bench: gallery {n:,} done", flush=True)
        del base
        gc.collect()
    return {"model": model, "dim": int(embeddings.shape[1]), "k": K,
            "real": {"embeddings": len(embeddings), "identities": shape.identities,
                     "enrolled": len(enrolled), "per_identity": sizes["enrol"],
                     "queries": len(queries), "held_out": len(held_out)},
            "shape": stats, "faiss_threads": faiss_threads, "rows": rows, "restart": restart,
            "target": {"recall_at_1": TARGET_RECALL, "p50_ms": TARGET_P50_MS}}


def markdown(result: dict) -> str:
    from bench.gallery_report import render

    return render(result)
