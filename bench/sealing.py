"""What sealing the gallery costs (issue 23): ``python -m bench.sealing``.

1. Store, at 100k templates (50k identities x 2, random unit vectors, SQLite): the time
   to open the gallery (every identity key unwrapped, every vector opened, the FAISS
   index built), one enrolment (``create_identity``, sealing included), one search and
   one delete, plaintext against sealed and sealed with a key tree (gallery/key_tree.py),
   measured in alternation. The gallery file is written directly in the store's format
   (the same sealer calls as the store), so building it takes seconds, not an hour of
   fsync'd enrolments.
2. HTTP: three ``facegate serve`` on loopback, plaintext, with a master key, and with a
   master key and a key tree, the same real photos sent to each in turn: enrolment and
   search p50.

Writes ``bench/results/sealing.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from facegate.gallery.crypto import PlainSealer, Sealer
from facegate.gallery.key_tree import KeyTreeFile
from facegate.gallery.store import Gallery

from bench.assets import REPO, photo_pairs, resolve_bundle
from bench.measure import environment, summarise
from bench.server import Server, loopback_client

DIM = 128


def build(path: Path, sealer: Sealer | PlainSealer, identities: int, per: int) -> None:
    """A gallery of ``identities`` x ``per`` templates, written as the store writes them."""
    Gallery(path, model_id="m", embedding_size=DIM, sealer=sealer).close()  # schema
    rng = np.random.default_rng(0)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    now = time.time()
    for i in range(identities):
        identity_id = f"id{i:06d}"
        wrapped, key = sealer.new_key(identity_id, i if sealer.tree is not None else None)
        db.execute("INSERT INTO identities (identity_id, name, metadata, created_at, sealed_key)"
                   " VALUES (?, ?, ?, ?, ?)",
                   (identity_id, sealer.seal_text(identity_id, "name", f"Person {i}", key),
                    sealer.seal_text(identity_id, "metadata", "{}", key), now, wrapped))
        vectors = rng.standard_normal((per, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for v in vectors:
            template_id = uuid.uuid4().hex
            db.execute("INSERT INTO templates (template_id, identity_id, model_id, dim, embedding,"
                       " created_at) VALUES (?, ?, 'm', ?, ?, ?)",
                       (template_id, identity_id, DIM,
                        sealer.seal(identity_id, f"embedding:{template_id}", v.tobytes(), key), now))
    db.execute("UPDATE meta SET value = ? WHERE key = 'next_key_leaf'", (str(identities),))
    db.execute("COMMIT")
    db.close()


def store_part(workdir: Path, identities: int, per: int, enrolments: int, searches: int,
               opens: int = 3) -> dict:
    """Both galleries built, then measured in alternation (opens, then enrolments and
    searches interleaved call by call), so a busy spell of the machine hits both alike."""
    master = [os.urandom(32)]
    tree = workdir / "store.tree"
    tree.unlink(missing_ok=True)
    KeyTreeFile.create(tree)
    makers = {"plaintext": PlainSealer, "sealed": lambda: Sealer(master),
              "key tree": lambda: Sealer(master, KeyTreeFile(tree))}
    paths = {mode: workdir / f"store-{mode.replace(' ', '-')}.sqlite" for mode in makers}
    for mode, make in makers.items():
        for suffix in ("", "-wal", "-shm", ".ivf"):  # .ivf: the persisted IVF (index_file.py)
            Path(f"{paths[mode]}{suffix}").unlink(missing_ok=True)
        build(paths[mode], make(), identities, per)
    rng = np.random.default_rng(1)
    probes = rng.standard_normal((max(searches, enrolments), DIM)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    times: dict[str, dict[str, list[float]]] = {
        m: {"open": [], "enrol": [], "search": [], "delete": []} for m in makers}

    def open_gallery(mode: str) -> Gallery:
        t0 = time.perf_counter()
        g = Gallery(paths[mode], model_id="m", embedding_size=DIM, index="auto", sealer=makers[mode]())
        times[mode]["open"].append(time.perf_counter() - t0)
        return g

    for i in range(opens):
        for mode in (list(makers) if i % 2 == 0 else list(reversed(makers))):
            open_gallery(mode).close()
    galleries = {mode: open_gallery(mode) for mode in makers}
    for i in range(enrolments):
        for mode, g in galleries.items():
            t0 = time.perf_counter()
            g.create_identity(f"new{i}", name=f"New {i}", embeddings=probes[i : i + 1])
            times[mode]["enrol"].append(time.perf_counter() - t0)
    for probe in probes[:searches]:
        for mode, g in galleries.items():
            t0 = time.perf_counter()
            g.search(probe, k=5)
            times[mode]["search"].append(time.perf_counter() - t0)
    for i in range(enrolments):  # old identities, spread over the tree
        for mode, g in galleries.items():
            t0 = time.perf_counter()
            g.delete_identity(f"id{i * (identities // enrolments):06d}")
            times[mode]["delete"].append(time.perf_counter() - t0)
    for g in galleries.values():
        g.close()
    return {mode: {"open_s": float(np.median(t["open"])), "opens_s": t["open"],
                   **{what: summarise(t[what]) for what in ("enrol", "search", "delete")},
                   "templates": identities * per, "identities": identities,
                   **({"tree_bytes": tree.stat().st_size} if mode == "key tree" else {})}
            for mode, t in times.items()}


def crypto_part(identities: int, per: int) -> dict:
    """The sealing work alone in opening a gallery: every data key unwrapped, every vector
    opened (the rest of the open, reading rows and building the index, is the same)."""
    sealer = Sealer([os.urandom(32)])
    rng = np.random.default_rng(2)
    wrapped, keys, blobs = {}, [], []
    for i in range(identities):
        identity_id = f"id{i:06d}"
        wrapped[identity_id], key = sealer.new_key(identity_id)
        for j in range(per):
            v = rng.standard_normal(DIM).astype(np.float32)
            keys.append((0, identity_id, f"t{j}"))
            blobs.append(sealer.seal(identity_id, f"embedding:t{j}", v.tobytes(), key))
    opener = Sealer([sealer._current])
    t0 = time.perf_counter()
    for identity_id, w in wrapped.items():
        opener.remember(identity_id, w)
    t1 = time.perf_counter()
    opener.open_vectors(keys, blobs)
    return {"unwrap_s": t1 - t0, "open_vectors_s": time.perf_counter() - t1}


def http_part(workdir: Path, rounds: int) -> dict:
    bundle, _ = resolve_bundle(workdir)
    key_file = workdir / "secrets" / "master.key"
    key_file.parent.mkdir(exist_ok=True)
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    tree = workdir / "http.tree"
    tree.unlink(missing_ok=True)
    KeyTreeFile.create(tree)
    sealed = {"FACEGATE_KEEP_CROPS": "true", "FACEGATE_MASTER_KEY_FILE": str(key_file)}
    pairs = [(a.read_bytes(), b.read_bytes()) for a, b in photo_pairs(max(rounds, 8))]
    servers = {
        "plaintext": Server(bundle, workdir / "http-plain.sqlite", {"FACEGATE_KEEP_CROPS": "true"}),
        "sealed": Server(bundle, workdir / "http-sealed.sqlite", sealed),
        "key tree": Server(bundle, workdir / "http-key-tree.sqlite",
                           {**sealed, "FACEGATE_KEY_TREE_FILE": str(tree)}),
    }
    times: dict[str, dict[str, list[float]]] = {m: {"enrol": [], "search": []} for m in servers}
    try:
        clients = {m: loopback_client(s.url) for m, s in servers.items()}
        for i in range(rounds):
            a, b = pairs[i % len(pairs)]
            order = list(servers)[i % 3:] + list(servers)[:i % 3]
            for mode in order:
                c = clients[mode]
                t0 = time.perf_counter()
                r = c.post("/v1/identities", files={"images": ("a.jpg", a)},
                           data={"identity_id": f"p{i}", "name": f"Person {i}"})
                times[mode]["enrol"].append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text
                t0 = time.perf_counter()
                r = c.post("/v1/search", files={"image": ("b.jpg", b)})
                times[mode]["search"].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    finally:
        for s in servers.values():
            s.stop()
    out: dict = {m: {k: summarise(v) for k, v in t.items()} for m, t in times.items()}
    out["paired_ratio"] = {  # per round, sealed / plaintext on the same photo, back to back
        mode: {k: float(np.median(np.array(times[mode][k]) / np.array(times["plaintext"][k])))
               for k in ("enrol", "search")}
        for mode in ("sealed", "key tree")
    }
    return out


def markdown(result: dict) -> str:
    s, h = result["store"], result["http"]
    n, plain, sealed, tree = s["plaintext"]["templates"], s["plaintext"], s["sealed"], s["key tree"]
    rows = [
        "| measured | plaintext | sealed | sealed / plaintext | sealed, key tree | key tree / plaintext |",
        "|---|---|---|---|---|---|",
        f"| open the gallery ({n:,} templates, index built; median of 4) | {plain['open_s']:.2f} s | "
        f"{sealed['open_s']:.2f} s | {sealed['open_s'] / plain['open_s']:.2f} | "
        f"{tree['open_s']:.2f} s | {tree['open_s'] / plain['open_s']:.2f} |",
    ]
    for what in ("enrol", "search", "delete"):
        p, q, t = (m[what]["p50_ms"] for m in (plain, sealed, tree))
        rows.append(f"| one store {what} at {n:,} templates, p50 | {p:.2f} ms | {q:.2f} ms | "
                    f"{q / p:.2f} | {t:.2f} ms | {t / p:.2f} |")
    c = result["crypto"]
    rows.append(f"| of which sealing: {sealed['identities']:,} keys unwrapped + {n:,} vectors "
                f"opened | | {c['unwrap_s'] + c['open_vectors_s']:.2f} s | | | |")
    rows.append(f"| key tree file after {tree['delete']['n']} deletes | | | | "
                f"{tree['tree_bytes']:,} bytes | |")
    for what, label in (("enrol", "HTTP enrolment (1 photo), p50"), ("search", "HTTP search, p50")):
        p, q, t = (h[m][what]["p50_ms"] for m in ("plaintext", "sealed", "key tree"))
        paired = h["paired_ratio"]
        rows.append(f"| {label} (n={h['sealed'][what]['n']}) | {p:.0f} ms | {q:.0f} ms | "
                    f"{q / p:.2f} (paired median {paired['sealed'][what]:.2f}) | {t:.0f} ms | "
                    f"{t / p:.2f} (paired median {paired['key tree'][what]:.2f}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sealing", description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=50_000)
    parser.add_argument("--per", type=int, default=2, help="templates per identity")
    parser.add_argument("--enrolments", type=int, default=100)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30, help="HTTP enrol+search rounds per server")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "facegate-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": environment(),
        "store": store_part(args.workdir, args.identities, args.per, args.enrolments, args.searches),
        "crypto": crypto_part(args.identities, args.per),
        "http": http_part(args.workdir, args.rounds),
    }
    result["command"] = "python -m bench.sealing " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "workdir")
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "sealing.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
