"""Part 4, gallery: 1:N search at 10k / 100k / 1M templates of 512 dimensions.

The queries and part of the base are real embeddings (aligned shared photos, embedded
by the bench bundle); the rest of the base is synthetic but clustered like the real
data: identities are random unit centres, and each template is its centre plus
Gaussian noise scaled so the template-to-centre cosine matches the one measured on the
real embeddings. facegate's ``gallery.index.TemplateIndex`` (flat, HNSW, IVF-Flat) is
compared with FAISS IVF-PQ (not used by facegate) and NumPy brute force (the naive
peer); recall is against exact search (chunked NumPy), and the flat scan is compared
with this machine's memory-bandwidth bound.
"""

from __future__ import annotations

import gc
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.assets import bundle_info, real_crops, resolve_bundle
from bench.measure import rss_bytes, summarise
from bench.report import fmt, ratio, table

SIZES = {
    "full": {"sizes": [10_000, 100_000, 1_000_000], "hnsw_max": 100_000, "queries": 200,
             "real_photos": 240, "per_identity": 4, "search_budget_s": 8.0,
             "bandwidth_mib": 512, "store_templates": 2_000},
    "smoke": {"sizes": [2_000], "hnsw_max": 2_000, "queries": 8, "real_photos": 8,
              "per_identity": 2, "search_budget_s": 1.0, "bandwidth_mib": 16,
              "store_templates": 40},
}
K = 10
DIM_CHUNK = 100_000


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def within_identity_cosine(embeddings: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """Mean and std of each template's cosine to its identity's mean direction (>= 2 templates)."""
    cosines = []
    labels_arr = np.asarray(labels)
    for label in np.unique(labels_arr):
        members = embeddings[labels_arr == label]
        if len(members) < 2:
            continue
        centre = l2n(members.mean(axis=0, keepdims=True))[0]
        cosines.extend(members @ centre)
    if not cosines:
        raise ValueError("no identity has two or more embeddings")
    return float(np.mean(cosines)), float(np.std(cosines))


def noise_scale(cosine_to_mean: float, group_size: int) -> float:
    """Noise norm s giving templates the measured cosine to their group's *sample* mean.

    A template is c + s*u (u a random unit vector, orthogonal to c in high dimension);
    the mean of g such templates is c + s*u_bar with |u_bar|^2 = 1/g, so the cosine of a
    template to it is sqrt(1 + s^2/g) / sqrt(1 + s^2). Solving for s:
    s^2 = (1 - rho^2) / (rho^2 - 1/g).
    """
    g = max(group_size, 2)
    rho2 = min(max(cosine_to_mean, 1e-3), 0.999) ** 2
    return math.sqrt((1.0 - rho2) / max(rho2 - 1.0 / g, 1e-3))


def clustered_vectors(n: int, dim: int, cluster_size: int, scale: float,
                      rng: np.random.Generator) -> np.ndarray:
    """`n` unit vectors in clusters of `cluster_size` around random unit centres."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, DIM_CHUNK):
        m = min(DIM_CHUNK, n - start)
        centres = l2n(rng.standard_normal((-(-m // cluster_size), dim), dtype=np.float32))
        centres = np.repeat(centres, cluster_size, axis=0)[:m]
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(scale / math.sqrt(dim))
        out[start:start + m] = l2n(centres + noise)
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k inner products, computed in chunks with NumPy (the ground truth)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(base), DIM_CHUNK):
        scores = queries @ base[start:start + DIM_CHUNK].T
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


def memory_bandwidth(mib: int) -> dict[str, float]:
    """Best-of-3 read (sum) and copy bandwidth in GB/s over a `mib` MiB float32 array."""
    a = np.ones(mib * 2**18, dtype=np.float32)
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t0)
    return {"read_gb_s": a.nbytes / min(read) / 1e9, "copy_gb_s": 2 * a.nbytes / min(copy) / 1e9}


def scan_bound_ms(n: int, dim: int, bandwidth: dict[str, float]) -> float:
    """Milliseconds to stream an (n, dim) float32 base once at the best measured memory rate."""
    best = max(bandwidth["read_gb_s"], bandwidth["copy_gb_s"])
    return n * dim * 4 / (best * 1e9) * 1000


def real_embeddings(workdir: Path, photos: int, per_identity: int) -> tuple[np.ndarray, list[str], dict]:
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder

    bundle_path, stand_in = resolve_bundle(workdir)
    bundle = load_bundle(bundle_path)
    crops, identities = real_crops(photos, per_identity, bundle.geometry)
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu")
    return embedder.embed(crops), list(identities), bundle_info(bundle_path, stand_in)


def split_real(embeddings: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probes, enrolled): each identity's first embedding probes, the rest are enrolled."""
    seen: set[str] = set()
    probe_rows, base_rows = [], []
    for row, label in enumerate(labels):
        (base_rows if label in seen else probe_rows).append(row)
        seen.add(label)
    return embeddings[probe_rows], embeddings[base_rows]


def single_query_times(search: Callable[[np.ndarray], object], queries: np.ndarray,
                       budget_s: float) -> list[float]:
    search(queries[0])
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for q in queries:
        if times and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
    return times


def measure_index(name: str, build: Callable[[], object], base: np.ndarray, queries: np.ndarray,
                  exact: np.ndarray, budget_s: float) -> dict:
    """Build a FAISS-backed index, then time single queries with FAISS's default threads and with one.

    ``build()`` returns an object whose ``search(queries (m, d), k)`` gives (scores, ids).
    On a loaded machine OpenMP threads wait for each other, so the one-thread figure is
    reported next to the default.
    """
    import faiss

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    memory = rss_bytes() - before
    _, found = index.search(queries, K)
    times = single_query_times(lambda q: index.search(q[None], K), queries, budget_s)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        one_thread = single_query_times(lambda q: index.search(q[None], K), queries, budget_s)
    finally:
        faiss.omp_set_num_threads(threads)
    row = _row(name, len(base), build_s, times, found, exact, memory)
    row["search_1_thread"] = summarise(one_thread)
    row["faiss_threads"] = threads
    return row


def bench_template_index(kind: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                         budget_s: float) -> dict:
    from facegate.gallery.index import TemplateIndex, ivf_lists

    def build() -> TemplateIndex:
        index = TemplateIndex(base.shape[1], kind, gpu=False)
        index.build(np.arange(len(base)), base)
        return index

    name = f"facegate {kind}"
    if kind == "ivf" and not ivf_lists(len(base)):
        name += " (too few vectors to train: flat)"
    return measure_index(name, build, base, queries, exact, budget_s)


def bench_ivfpq(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, budget_s: float) -> dict:
    import faiss
    from facegate.gallery.index import IVF_NPROBE, ivf_lists

    nlist = max(ivf_lists(len(base)), 4)

    def build() -> faiss.Index:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(base.shape[1]), base.shape[1], nlist, 64, 8,
                                 faiss.METRIC_INNER_PRODUCT)
        rows = np.random.default_rng(1).choice(len(base), min(len(base), 64 * nlist + 10_000),
                                               replace=False)
        index.train(base[np.sort(rows)])
        index.add(base)
        index.nprobe = min(nlist, IVF_NPROBE)
        return index

    return measure_index(f"faiss IVF-PQ (nlist={nlist}, m=64; not in facegate)", build, base,
                         queries, exact, budget_s)


def numpy_row(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, budget_s: float) -> dict:
    found = np.stack([numpy_search(base, q, K) for q in queries])
    times = single_query_times(lambda q: numpy_search(base, q, K), queries, budget_s)
    row = _row("NumPy brute force (peer)", len(base), float("nan"), times, found, exact, base.nbytes)
    row["add_per_s"] = float("nan")
    return row


def _row(name: str, n: int, build_s: float, times: list[float], found: np.ndarray,
         exact: np.ndarray, memory: int) -> dict:
    return {"index": name, "n": n,
            "add_per_s": n / build_s if build_s > 0 else float("nan"),
            "build_s": build_s, "search": summarise(times),
            "recall_at_1": float(np.mean(found[:, 0] == exact[:, 0])),
            "recall_at_10": recall(found, exact, K), "memory_mb": memory / 1e6}


def bench_store(n: int, dim: int, workdir: Path, vectors: np.ndarray, budget_s: float) -> dict:
    """facegate.gallery.Gallery: durable enrol (SQLite WAL, one transaction per identity) and search."""
    from facegate.gallery import Gallery

    path = workdir / "bench-gallery.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    per_identity = 4
    with Gallery(path, model_id="bench", embedding_size=dim) as gallery:
        t0 = time.perf_counter()
        for start in tqdm(range(0, n, per_identity), desc="gallery store enrol", leave=False):
            gallery.create_identity(None, embeddings=vectors[start:start + per_identity])
        enrol_s = time.perf_counter() - t0
        times = single_query_times(lambda q: gallery.search(q, K), vectors[:50], budget_s)
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM templates").fetchone()
    return {"templates": int(count), "enrol_templates_per_s": count / enrol_s,
            "identities_per_s": count / per_identity / enrol_s, "search": summarise(times),
            "file_mb": path.stat().st_size / 1e6}


def run(sizes: dict, workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    embeddings, labels, model = real_embeddings(workdir, sizes["real_photos"], sizes["per_identity"])
    mean_cos, std_cos = within_identity_cosine(embeddings, labels)
    counts = [c for c in Counter(labels).values() if c >= 2]
    group = int(np.median(counts))
    scale = noise_scale(mean_cos, group)
    probes, enrolled = split_real(embeddings, labels)
    cluster = max(1, group - 1)
    bandwidth = memory_bandwidth(sizes["bandwidth_mib"])
    dim = embeddings.shape[1]
    rows = []
    for n in sizes["sizes"]:
        print(f"bench: gallery {n:,} x {dim}", flush=True)
        base = np.empty((n, dim), dtype=np.float32)
        base[: len(enrolled)] = enrolled
        base[len(enrolled):] = clustered_vectors(n - len(enrolled), dim, cluster, scale, rng)
        extra = max(0, sizes["queries"] - len(probes))
        synthetic_probes = l2n(base[len(enrolled):][rng.choice(n - len(enrolled), extra)]
                               + rng.standard_normal((extra, dim), dtype=np.float32)
                               * np.float32(scale / math.sqrt(dim)))
        queries = np.concatenate([probes, synthetic_probes])[: sizes["queries"]]
        exact = exact_topk(base, queries, K)
        kinds = ["flat", "ivf"] + (["hnsw"] if n <= sizes["hnsw_max"] else [])
        for kind in tqdm(kinds, desc=f"indexes at {n:,}", leave=False):
            rows.append(bench_template_index(kind, base, queries, exact, sizes["search_budget_s"]))
        rows.append(bench_ivfpq(base, queries, exact, sizes["search_budget_s"]))
        rows.append(numpy_row(base, queries, exact, sizes["search_budget_s"]))
        bound_ms = scan_bound_ms(n, dim, bandwidth)
        for row in rows:
            if row["n"] == n:
                row["bandwidth_bound_ms"] = bound_ms
        del base
        gc.collect()
    store = bench_store(sizes["store_templates"], dim, workdir,
                        l2n(clustered_vectors(sizes["store_templates"], dim, 4, scale, rng)),
                        sizes["search_budget_s"])
    return {
        "model": model, "dim": dim, "k": K,
        "real": {"embeddings": len(embeddings), "identities": len(set(labels)),
                 "probes": len(probes), "enrolled": len(enrolled),
                 "cosine_to_centre_mean": mean_cos, "cosine_to_centre_std": std_cos,
                 "group_size": group, "noise_scale": scale, "synthetic_cluster_size": cluster},
        "queries": sizes["queries"], "hnsw_max": sizes["hnsw_max"],
        "bandwidth": bandwidth, "rows": rows, "store": store,
        "pending": {"faiss GPU (flat / IVF)": "pending: no GPU lent to this task"},
    }


def markdown(result: dict) -> str:
    real = result["real"]
    model = result["model"]
    bw = result["bandwidth"]
    text = (
        f"{result['dim']}-d templates, k={result['k']}. Real part: {real['embeddings']} aligned "
        f"shared photos of {real['identities']} people embedded by `{model['model_id']}`"
        + (" (an untrained stand-in, so its clusters are not a trained model's)" if model["stand_in"] else "")
        + f"; each person's first photo is a query ({real['probes']}), the rest "
        f"({real['enrolled']}) are enrolled. Synthetic fill: clusters of "
        f"{real['synthetic_cluster_size']} around random unit centres with noise scale "
        f"{real['noise_scale']:.3f}, chosen so that groups of {real['group_size']} reproduce the "
        f"measured cosine of a real template to its person's mean, "
        f"{real['cosine_to_centre_mean']:.3f} +- {real['cosine_to_centre_std']:.3f}. "
        f"{result['queries']} queries (real probes first, then synthetic); single-query "
        "latency over as many queries as fit a time budget (n shown); recall against exact "
        "chunked NumPy search. Add rate includes training (IVF) and graph building (HNSW). "
        f"HNSW is built only up to {result['hnsw_max']:,} vectors (its build alone would "
        "take longer than the whole run budget at 1M on 2 cores). Memory is RSS growth "
        "while building (NumPy: the array itself); below ~100 MB the allocator reuses memory "
        "freed by the previous index, so small figures understate. The synthetic centres are uniform on the "
        "sphere, with none of the coarse structure real embeddings have, which is the hard "
        "case for IVF's coarse quantiser: read its recall as a lower bound.\n\n"
        f"Memory bandwidth on this machine: read {bw['read_gb_s']:.1f} GB/s, copy "
        f"{bw['copy_gb_s']:.1f} GB/s (bytes read + written); the bound is the time to stream the "
        "whole base once at the better of the two rates.\n\n"
    )
    rows = []
    for r in result["rows"]:
        s = r["search"]
        one = r.get("search_1_thread", {}).get("p50_ms")
        rows.append([f"{r['n']:,}", r["index"], r["add_per_s"], s["p50_ms"], s["p99_ms"], one, s["n"],
                     r["recall_at_1"], r["recall_at_10"], r["memory_mb"],
                     ratio(s["p50_ms"], r["bandwidth_bound_ms"])])
    text += table(["n", "index", "add /s", "search p50 ms", "p99 ms", "p50 ms, 1 FAISS thread",
                   "queries timed",
                   "recall@1", "recall@10", "memory MB", "p50 / bandwidth bound"], rows)
    text += "\n" + table(["GPU index", "status"], [[k, v] for k, v in result["pending"].items()])
    st = result["store"]
    text += (
        f"\nThe durable store (`facegate.gallery.Gallery`: SQLite WAL with synchronous=FULL, one "
        f"transaction per enrolled identity of 4 templates, flat index): {st['templates']:,} "
        f"templates enrolled at {st['enrol_templates_per_s']:.0f} templates/s "
        f"({st['identities_per_s']:.0f} identities/s), search p50 {fmt(st['search']['p50_ms'])} ms "
        f"/ p99 {fmt(st['search']['p99_ms'])} ms, file {st['file_mb']:.1f} MB.\n"
    )
    waits = [r for r in result["rows"] if "search_1_thread" in r
             and r["search"]["p50_ms"] > 2 * r["search_1_thread"]["p50_ms"]]
    if waits:
        text += (
            "\nOn this loaded 2-core machine FAISS's default OpenMP threads wait for each other on "
            "single queries: " + ", ".join(
                f"{r['index']} at {r['n']:,} ({fmt(r['search']['p50_ms'])} ms vs "
                f"{fmt(r['search_1_thread']['p50_ms'])} ms with one thread)" for r in waits)
            + ". facegate.gallery searches one query per request with the default threads.\n")
    by_n: dict[int, dict[str, dict]] = {}
    for r in result["rows"]:
        by_n.setdefault(r["n"], {})[r["index"]] = r
    for n, group in by_n.items():
        peer = group.get("NumPy brute force (peer)")
        for name, r in group.items():
            if name.startswith("facegate") and peer:
                q = ratio(r["search"]["p50_ms"], peer["search"]["p50_ms"])
                if q > 1.05:
                    one = ratio(r["search_1_thread"]["p50_ms"], peer["search"]["p50_ms"])
                    text += (f"\nAt {n:,} vectors {name} searches slower than NumPy brute force "
                             f"({fmt(q)}x its p50; {fmt(one)}x with one FAISS thread).\n")
    return text
