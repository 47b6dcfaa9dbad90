"""A 1M-template SQLite gallery opened twice, as a server (re)starts: part of ``make bench
PART=gallery`` (at its largest size), alone ``python -m bench.gallery_restart``.

The gallery bench's vectors (the shared photos' enrolled templates, then synthetic fill
shaped like them, 4 per identity; `bench.gallery_data`) are written straight into a real
SQLite gallery in the store's format (the same sealer calls as the store: an hour of
fsync'd enrolments otherwise), plaintext and sealed. Each is opened with ``index="auto"``
twice: the first open trains k-means and persists the centroids (`gallery.index_file`),
the second is the restart: time to ready (the constructor returns a searchable gallery),
k-means runs counted (must be 0). On the restarted index, as the server serves it: R@1
against exact search for the held-out real photos, and single-query p50 (one call at a
time, one OpenMP thread as ``TemplateIndex`` serves).

Writes ``bench/results/gallery_restart.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from facegate.gallery.crypto import PlainSealer, Sealer
from facegate.gallery.store import Gallery

from bench.assets import REPO
from bench.gallery import K, exact_topk, single_query_times
from bench.gallery_data import Shape, real_embeddings, split_real
from bench.measure import environment, summarise

PER = 4
MODEL = "bench-restart"


def write_gallery(path: Path, sealer: Sealer | PlainSealer, vectors: np.ndarray) -> None:
    """`vectors` as identities of `PER` templates, written as the store writes them."""
    for suffix in ("", "-wal", "-shm", ".ivf"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    dim = vectors.shape[1]
    Gallery(path, model_id=MODEL, embedding_size=dim, sealer=sealer).close()  # schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    now = time.time()
    for i in range(0, len(vectors), PER):
        identity_id = f"id{i // PER:07d}"
        wrapped, key = sealer.new_key(identity_id)
        db.execute("INSERT INTO identities (identity_id, name, metadata, created_at, sealed_key)"
                   " VALUES (?, ?, ?, ?, ?)",
                   (identity_id, sealer.seal_text(identity_id, "name", f"Person {i}", key),
                    sealer.seal_text(identity_id, "metadata", "{}", key), now, wrapped))
        rows = []
        for v in vectors[i:i + PER]:
            template_id = uuid.uuid4().hex
            rows.append((template_id, identity_id, MODEL, dim,
                         sealer.seal(identity_id, f"embedding:{template_id}", v.tobytes(), key), now))
        db.executemany("INSERT INTO templates (template_id, identity_id, model_id, dim, embedding,"
                       " created_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    db.close()


def opened(path: Path, sealer: Sealer | PlainSealer, dim: int) -> tuple[Gallery, float]:
    t0 = time.perf_counter()
    g = Gallery(path, model_id=MODEL, embedding_size=dim, index="auto", sealer=sealer)
    return g, time.perf_counter() - t0


def measure(path: Path, make, base: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> dict:
    """First open (k-means, file written), then the restart and its searches."""
    t0 = time.perf_counter()
    write_gallery(path, make(), base)
    write_s = time.perf_counter() - t0
    g, first_s = opened(path, make(), base.shape[1])
    first_trainings = g._index.trainings
    g.close()
    g, restart_s = opened(path, make(), base.shape[1])
    index = g._index
    row_of = {r: j for j, r in enumerate(sorted(g._cache._rows))}  # row ids in insertion order
    found = np.array([[row_of.get(int(r), -1) for r in index.search(q, K)[1][0]] for q in queries])
    times = single_query_times(lambda q: index.search(q, K), queries, 200, 5.0)
    out = {"templates": len(index), "write_s": write_s, "first_open_s": first_s,
           "first_open_trainings": first_trainings, "restart_s": restart_s,
           "restart_trainings": index.trainings, "backend": index.backend,
           "nlist": int(len(index.trained.centroids)) if index.trained else 0,
           "nprobe": int(index._index.nprobe) if index.backend == "ivf" else 0,
           "index_file_bytes": os.path.getsize(f"{path}.ivf") if Path(f"{path}.ivf").exists() else 0,
           "recall_at_1": float(np.mean(found[:, 0] == exact[:, 0])), "search": summarise(times)}
    g.close()
    for suffix in ("", "-wal", "-shm", ".ivf"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return out


def restart_part(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, workdir: Path) -> dict:
    """`measure` for a plaintext and a sealed gallery of `base` (one random master key)."""
    master = [os.urandom(32)]
    modes = {"plaintext": PlainSealer, "sealed": lambda: Sealer(master)}
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode, make in modes.items():
        print(f"bench: gallery restart, {mode}, {len(base):,} templates", flush=True)
        rows[mode] = measure(workdir / f"restart-{mode}.sqlite", make, base, queries, exact)
        print(json.dumps(rows[mode]), flush=True)
    return rows


def run(n: int, workdir: Path) -> dict:
    """Standalone: the gallery bench's real part and fill at `n`, then `restart_part`."""
    import faiss

    rng = np.random.default_rng(0)
    embeddings, labels, model = real_embeddings(workdir, None)
    enrolled, _, held_out = split_real(embeddings, labels, PER)
    queries = held_out[np.sort(rng.choice(len(held_out), min(500, len(held_out)), replace=False))]
    fill = Shape(embeddings, labels).sample(-(-(n - len(enrolled)) // PER), PER, rng)
    base = np.concatenate([enrolled, fill[: n - len(enrolled)]])
    del fill
    exact = exact_topk(base, queries, K)
    return {"model": model, "n": n, "queries": len(queries), "real_identities": len(set(labels)),
            "faiss_threads": faiss.omp_get_max_threads(),
            "rows": restart_part(base, queries, exact, workdir)}


def markdown(rows: dict) -> str:
    """The restart table of `restart_part`'s rows."""
    lines = ["| gallery | templates | first open s (k-means runs) | restart s (k-means runs) | "
             "backend | nlist / nprobe | R@1 | p50 ms | p95 ms | index file MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['templates']:,} | {r['first_open_s']:.1f} "
                     f"({r['first_open_trainings']}) | {r['restart_s']:.1f} "
                     f"({r['restart_trainings']}) | {r['backend']} | {r['nlist']} / {r['nprobe']} | "
                     f"{r['recall_at_1']:.3f} | {r['search']['p50_ms']:.2f} | "
                     f"{r['search']['p95_ms']:.2f} | {r['index_file_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "facegate-bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gallery_restart.json")
    args = parser.parse_args()
    env = environment()
    t0 = time.perf_counter()
    result = run(args.templates, args.workdir)
    record = {"command": "python -m bench.gallery_restart" + (
        f" --templates {args.templates}" if args.templates != 1_000_000 else ""),
        "elapsed_s": time.perf_counter() - t0, "environment": env, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(record["rows"]))


if __name__ == "__main__":
    main()
