"""Part scaleout: one real PostgreSQL gallery and 1 or 2 real `facegate serve` replicas.

A throwaway PostgreSQL (bench/pg_cluster.py) is prefilled with synthetic identities
(COPY, 2 templates each: what a replica must load at start). Then, with 1 and with 2
replicas on this machine, requests spread round-robin over the replicas:

- search rate: POST /v1/search with an embedding (JSON), so the figure is the gallery's
  and the server's, not the detector's;
- enrol rate: POST /v1/identities with one real photo each (detection included: the
  real cost), and the store's own write rate (PostgresGallery.create_identity of a
  vector from this process: one transaction + change + NOTIFY each);
- propagation (2 replicas): a write acknowledged by the store in this process (as a third
  replica) or by replica A over HTTP (a real photo), until a search on each replica finds
  it; p50/p99 over the samples.

Also measured: a replica's index rebuild time and memory per template at the prefill
size, and PostgreSQL's bytes per template row; ``markdown`` turns them into the paper
estimate at 1M and 10M templates.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import psycopg

from bench.assets import bundle_info, photos_by_identity, resolve_bundle
from bench.measure import rss_bytes, summarise
from bench.pg_cluster import Cluster
from bench.report import fmt, table
from bench.server import Server, loopback_client

SIZES = {
    "full": {"prefill_identities": 50_000, "search_requests": 3000, "search_budget_s": 40.0,
             "concurrency": 8, "enrol_requests": 60, "enrol_budget_s": 60.0,
             "store_writes": 400, "propagation_samples": 300, "http_propagation_samples": 20},
    "smoke": {"prefill_identities": 200, "search_requests": 20, "search_budget_s": 5.0,
              "concurrency": 2, "enrol_requests": 2, "enrol_budget_s": 20.0,
              "store_writes": 5, "propagation_samples": 5, "http_propagation_samples": 1},
}
TEMPLATES_PER_IDENTITY = 2
POLL_S = 0.002


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def prefill(url: str, model_id: str, dim: int, identities: int) -> dict:
    """Synthetic identities straight into the tables (schema migrated first)."""
    from facegate.gallery.pg_schema import migrate

    rng = np.random.default_rng(0)
    now = time.time()
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY identities (identity_id, name, metadata, created_at) FROM STDIN") as cp:
                for i in range(identities):
                    cp.write_row((f"synthetic-{i}", None, "{}", now))
            with cur.copy("COPY templates (template_id, identity_id, model_id, dim, embedding,"
                          " created_at) FROM STDIN") as cp:
                for start in range(0, identities, 5000):
                    n = min(5000, identities - start)
                    vectors = unit(rng, n * TEMPLATES_PER_IDENTITY, dim)
                    for j, v in enumerate(vectors):
                        who = f"synthetic-{start + j // TEMPLATES_PER_IDENTITY}"
                        cp.write_row((uuid.uuid4().hex, who, model_id, dim, v.tobytes(), now))
        conn.execute("VACUUM ANALYZE")
        (table_bytes,) = conn.execute("SELECT pg_total_relation_size('templates')").fetchone()
    templates = identities * TEMPLATES_PER_IDENTITY
    return {"identities": identities, "templates": templates, "copy_s": time.perf_counter() - t0,
            "pg_bytes_per_template": table_bytes / templates}


def measure_rebuild(url: str, model_id: str, dim: int) -> dict:
    """Open the store once (as a starting replica does) in this process: build time and
    RSS growth per template."""
    from facegate.gallery.postgres import PostgresGallery

    before = rss_bytes()
    t0 = time.perf_counter()
    g = PostgresGallery(url, model_id=model_id, embedding_size=dim)
    seconds = time.perf_counter() - t0
    grown = rss_bytes() - before
    n = len(g._cache)
    g.close()
    return {"templates": n, "rebuild_s": seconds, "replica_bytes_per_template": grown / max(n, 1)}


def rate(fn, total: int, budget_s: float, concurrency: int) -> dict:
    """Requests per second and latency of up to `total` calls fn(i) over `concurrency` threads."""
    counter = count()
    deadline = time.perf_counter() + budget_s
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= total:
                return
            t0 = time.perf_counter()
            ok = fn(i)
            with lock:
                latencies.append(time.perf_counter() - t0)
                failures[0] += not ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    return {"per_s": len(latencies) / wall, "failures": failures[0], **summarise(latencies)}


def until_found(clients: list[httpx.Client], body: dict, identity_id: str, timeout: float = 30.0) -> list[float]:
    """Seconds until each client's search returns `identity_id` first (from the call)."""
    start = time.perf_counter()
    found: list[float | None] = [None] * len(clients)
    while None in found:
        for i, c in enumerate(clients):
            if found[i] is None:
                match = c.post("/v1/search", json=body).json().get("match")
                if match and match["identity_id"] == identity_id:
                    found[i] = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{identity_id} not found on every replica in {timeout} s")
        time.sleep(POLL_S)
    return found  # type: ignore[return-value]


def photos(n: int) -> list[bytes]:
    """One real photo each of `n` people."""
    people = sorted(photos_by_identity().items())
    return [paths[0].read_bytes() for _, paths in people[:n]]


def run(sizes: dict, workdir: Path) -> dict:
    from facegate.gallery.postgres import PostgresGallery

    bundle, stand_in = resolve_bundle(workdir)
    info = bundle_info(bundle, stand_in)
    model_id, dim = info["model_id"], info["embedding_size"]
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster()
    rows = []
    propagation: dict = {}
    rng = np.random.default_rng(1)
    real = photos(sizes["enrol_requests"] * 2 + sizes["http_propagation_samples"])
    try:
        url = cluster.create_database()
        filled = prefill(url, model_id, dim, sizes["prefill_identities"])
        rebuild = measure_rebuild(url, model_id, dim)
        writer = PostgresGallery(url, model_id=model_id, embedding_size=dim)
        probes = [{"embedding": {"model_id": model_id, "vector": v.tolist()}, "k": 5}
                  for v in unit(rng, 64, dim)]
        for n in (1, 2):
            replicas = [Server(bundle, url, {"FACEGATE_CPU_WORKERS": "2"},
                               log=workdir / f"scaleout-{n}-{i}.log", ready_s=300)
                        for i in range(n)]
            clients = [loopback_client(r.url) for r in replicas]
            try:
                row = measure_rates(clients, writer, probes, real, sizes, rng, dim)
                rows.append({"replicas": n, "start_s": max(r.start_s for r in replicas), **row})
                if n == 2:
                    propagation = measure_propagation(
                        writer, clients, real[-sizes["http_propagation_samples"]:], sizes, rng,
                        model_id, dim)
            finally:
                for c in clients:
                    c.close()
                for r in replicas:
                    r.stop()
        writer.close()
    except BaseException:
        cluster.stop()
        print(f"bench scaleout: failed; PostgreSQL log kept in {cluster.log}", file=sys.stderr)
        raise
    cluster.remove()
    return {"model": info, "concurrency": sizes["concurrency"], "prefill": filled, "rebuild": rebuild, "rows": rows,
            "propagation": propagation, "templates_per_identity": TEMPLATES_PER_IDENTITY}


def measure_rates(clients: list[httpx.Client], writer, probes: list[dict], real: list[bytes],
                  sizes: dict, rng: np.random.Generator, dim: int) -> dict:
    """Search, HTTP enrol and store enrol rates, requests round-robin over `clients`."""
    n = len(clients)
    offset = (n - 1) * sizes["enrol_requests"]  # fresh photos for each replica count

    def search(i: int) -> bool:
        return clients[i % n].post("/v1/search", json=probes[i % len(probes)]).status_code == 200

    def enrol(i: int) -> bool:
        files = [("images", ("p.jpg", real[offset + i], "image/jpeg"))]
        answer = clients[i % n].post(
            "/v1/identities", data={"name": "p", "identity_id": f"http-{n}-{i}"}, files=files)
        return answer.status_code in (201, 422)  # 422: not exactly one face found

    vectors = unit(rng, sizes["store_writes"], dim)

    def store(i: int) -> bool:
        return bool(writer.create_identity(f"store-{n}-{i}", embeddings=vectors[i]))

    return {
        "search": rate(search, sizes["search_requests"], sizes["search_budget_s"], sizes["concurrency"]),
        "http_enrol": rate(enrol, sizes["enrol_requests"], sizes["enrol_budget_s"], min(4, 2 * n)),
        "store_enrol": rate(store, sizes["store_writes"], 60.0, 4),
    }


def measure_propagation(writer, clients: list[httpx.Client], real: list[bytes], sizes: dict,
                        rng: np.random.Generator, model_id: str, dim: int) -> dict:
    """Store write (this process) -> found on replicas A and B; HTTP enrol on A -> found on B."""
    to_a, to_b = [], []
    for i, v in enumerate(unit(rng, sizes["propagation_samples"], dim)):
        who = f"prop-{i}"
        writer.create_identity(who, embeddings=v)  # returns after COMMIT (and its own catch-up)
        a, b = until_found(clients, {"embedding": {"model_id": model_id, "vector": v.tolist()}, "k": 1}, who)
        to_a.append(a)
        to_b.append(b)
    http_b = []
    for i, photo in enumerate(real):
        embedded = clients[0].post("/v1/embed", files={"image": ("p.jpg", photo, "image/jpeg")}).json()
        if not embedded.get("faces"):
            continue
        body = {"embedding": {"model_id": model_id, "vector": embedded["faces"][0]["embedding"]}, "k": 1}
        answer = clients[0].post("/v1/identities", data={"name": "p", "identity_id": f"hp-{i}"},
                                 files=[("images", ("p.jpg", photo, "image/jpeg"))])
        if answer.status_code == 201:
            http_b.append(until_found(clients[1:], body, f"hp-{i}")[0])
    return {"store_to_a": summarise(to_a), "store_to_b": summarise(to_b),
            "http_a_to_b": summarise(http_b)}


def markdown(result: dict) -> str:
    fill, rebuild, prop = result["prefill"], result["rebuild"], result["propagation"]
    dim = result["model"]["embedding_size"]
    text = (
        f"One PostgreSQL 15 gallery prefilled with {fill['identities']:,} synthetic identities x "
        f"{result['templates_per_identity']} templates ({fill['templates']:,} {dim}-d float32 "
        "templates), then 1 and 2 `facegate serve` replicas on this machine, requests "
        f"round-robin. Search: JSON embedding probes (no detection), {result['concurrency']} "
        "client threads. HTTP enrol: one real photo per "
        "identity (detection and embedding included). Store enrol: "
        "`PostgresGallery.create_identity` of one vector from the bench process, 4 threads "
        "(one transaction + change row + NOTIFY each, serialised by the change lock). Both "
        "replicas and PostgreSQL share the same 2 cores here, so two replicas cannot double "
        "anything CPU-bound; read the 2-replica rows as 'no loss from sharing', not as scaling.\n\n"
    )
    rows = []
    for r in result["rows"]:
        rows.append([r["replicas"], r["start_s"], r["search"]["per_s"], r["search"]["p50_ms"],
                     r["search"]["p99_ms"], r["http_enrol"]["per_s"], r["http_enrol"]["p50_ms"],
                     r["store_enrol"]["per_s"], r["store_enrol"]["p50_ms"]])
    text += table(["replicas", "ready after (s)", "search/s", "search p50 ms", "search p99 ms",
                   "HTTP enrol/s", "HTTP enrol p50 ms", "store enrol/s", "store enrol p50 ms"], rows)
    if prop:
        text += "\nPropagation with 2 replicas: from the acknowledgement of a write until a search "
        text += f"on the replica finds it (polled every {POLL_S * 1000:.0f} ms plus one search).\n\n"
        text += table(["write", "found on", "n", "p50 ms", "p99 ms", "bound the tests hold"], [
            ["store (as a 3rd replica)", "A", prop["store_to_a"]["n"], prop["store_to_a"]["p50_ms"],
             prop["store_to_a"]["p99_ms"], "5 s (tested)"],
            ["store (as a 3rd replica)", "B", prop["store_to_b"]["n"], prop["store_to_b"]["p50_ms"],
             prop["store_to_b"]["p99_ms"], "5 s (tested)"],
            ["HTTP enrol on A (real photo)", "B", prop["http_a_to_b"]["n"],
             prop["http_a_to_b"]["p50_ms"], prop["http_a_to_b"]["p99_ms"], "5 s (tested)"],
        ])
    per_tpl_s = rebuild["rebuild_s"] / max(rebuild["templates"], 1)
    pg_b = fill["pg_bytes_per_template"]
    mem_b = rebuild["replica_bytes_per_template"]
    est = [[f"{n:,}", n * pg_b / 1e9, n * mem_b / 1e9, n * per_tpl_s, n * dim * 4 / 10e9 * 1000]
           for n in (1_000_000, 10_000_000)]
    text += (
        f"\nMeasured at {rebuild['templates']:,} templates: a replica's index build (read every "
        f"template from PostgreSQL in one snapshot + FAISS flat) took {rebuild['rebuild_s']:.1f} s "
        f"({per_tpl_s * 1e6:.1f} us per template) and grew its RSS by {fmt(mem_b)} bytes per "
        f"template (the vector is {dim * 4} of them; the rest is the Python map from index id "
        "to identity and template id, two 32-character strings per template, and allocator "
        f"slack); PostgreSQL holds {fmt(pg_b)} bytes per template row (table + TOAST + "
        f"indexes, no kept crop; a kept 112x112 PNG crop adds ~20-30 kB).\n\n"
        "Paper estimate, linear in the measured per-template figures (flat index; the "
        "search column is one exact scan at 10 GB/s of memory bandwidth):\n\n"
    )
    text += table(["templates", "PostgreSQL (GB)", "RAM per replica (GB)", "replica start (s)",
                   "flat search per query (ms)"], est)
    text += (
        "\nWhere one PostgreSQL + N replicas stops scaling: (1) writes: every enrolment and "
        "delete is serialised by the change-sequence lock (a synchronous COMMIT with fsync and "
        "about eight round trips each), so the store enrol rate above is a ceiling for the "
        "whole deployment, whatever N; measured here under the load average shown, on 2 shared "
        "cores, it is a floor for that ceiling on a dedicated database host (it is detection, "
        "not the database, that limits HTTP enrolment on CPU); each write also costs every replica one catch-up query, "
        "N queries per write. (2) Memory and start: every replica holds the whole index; at 10M "
        "templates that is the RAM column per replica and a start (or a restart after kill -9) "
        "of the start column, during which /readyz is 503. (3) Search: flat is linear in the "
        "gallery; past ~1M templates per replica use FACEGATE_INDEX=ivf or hnsw, and search "
        "throughput then grows with replicas, as searches never touch the database. "
        "(4) Connections: replicas x (FACEGATE_GALLERY_POOL_SIZE + 1) <= max_connections.\n"
    )
    return text
