"""The gallery part's section of docs/benchmarks.md, from its result JSON.

Kept apart from the measuring code so `--docs-only` can re-render old results and the
sweep (over a hundred rows in the JSON) is summarised: per size, each index's fastest
setting that reaches the recall target, the recall/latency frontier, and 10M memory
on paper.
"""

from __future__ import annotations

from bench.report import fmt, ratio, table

PAPER_N = 10_000_000
PAPER_NLIST = 16_384


def _best(rows: list[dict], target: float) -> dict:
    """The fastest row at or above `target` R@1, else the one with the highest R@1."""
    ok = [r for r in rows if r["recall_at_1"] >= target]
    if ok:
        return min(ok, key=lambda r: r["search"]["p50_ms"])
    return max(rows, key=lambda r: (r["recall_at_1"], -r["search"]["p50_ms"]))


def _cells(r: dict) -> list[object]:
    s = r["search"]
    return [f"{r['n']:,}", r["index"], r["params"], r["recall_at_1"], r["recall_at_10"],
            s["p50_ms"], s["p95_ms"], s["n"], r["build_s"], r["bytes_per_template"]]


HEAD = ["n", "index", "setting", "R@1", "R@10", "p50 ms", "p95 ms", "queries timed",
        "build s", "bytes / template"]


def frontier(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both R@1 and p50 (the recall/latency frontier), fastest first."""
    out, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["search"]["p50_ms"], -r["recall_at_1"])):
        if r["recall_at_1"] > best:
            out.append(r)
            best = r["recall_at_1"]
    return out


def paper_memory(dim: int, hnsw_m: int) -> list[list[object]]:
    """Bytes per template of each index kind at 10M templates, from the FAISS layouts."""
    quantiser = PAPER_NLIST * dim * 4 / PAPER_N
    kinds = [
        ("Flat (facegate flat)", f"4d + 8 = {4 * dim + 8}", 4 * dim + 8),
        (f"HNSW M={hnsw_m}", f"4d + 2M*4 (level 0) + ~8 = {4 * dim + 8 * hnsw_m + 8}",
         4 * dim + 8 * hnsw_m + 8),
        ("IVF-Flat", f"4d + 8 + 4d*nlist/N = {4 * dim + 8 + quantiser:.1f}",
         4 * dim + 8 + quantiser),
        ("IVF-SQ8", f"d + 8 + 4d*nlist/N = {dim + 8 + quantiser:.1f}", dim + 8 + quantiser),
        *((f"IVF-PQ{m}", f"m + 8 + 4d*nlist/N (+ codebooks) = {m + 8 + quantiser:.1f}",
           m + 8 + quantiser) for m in (64, 32, 16)),
    ]
    return [[name, formula, per * PAPER_N / 1e9] for name, formula, per in kinds]


def render(result: dict) -> str:
    real, model, shape = result["real"], result["model"], result["shape"]
    rows = result["rows"]
    target = result["target"]
    text = (
        f"{result['dim']}-d templates of `{model['model_id']}`, k={result['k']}. Real part: "
        f"{real['embeddings']:,} aligned dlib chips of the shared photos ({real['identities']} "
        f"people) embedded as the server embeds (flip on); each person's first "
        f"{real['per_identity']} chips are enrolled ({real['enrolled']:,} templates), "
        f"{real['queries']} of their other {real['held_out']:,} photos are the queries. "
        "Synthetic fill, identity by identity with the same templates per person: centres drawn "
        "from a Gaussian fitted to the real identity means (mean and full covariance, less the "
        "sampling noise of a mean), templates = centre + a residual drawn from the pooled "
        "within-identity covariance, re-normalised (`bench/gallery_data.py`). Ground truth: exact "
        "search; R@1 = share of queries whose top template is the exact top template. Latency: "
        "single queries one at a time, p50/p95 over the queries timed; FAISS rows on one "
        "OpenMP thread unless named otherwise, facegate rows as `TemplateIndex` serves fewer "
        "than 16 queries (flat: NumPy over the FAISS vectors; IVF: one OpenMP thread). Build: "
        "train + add. Bytes per template: the serialised FAISS index / n (no allocator slack). "
        f"HNSW is built up to {max((r['n'] for r in rows if r['family'] == 'hnsw'), default=0):,} "
        "templates: its build is the slowest here (the build s column), and at 1M it alone "
        "would take most of the run's budget on 2 cores.\n\n"
        "Shape check, real vs synthetic (cosines):\n\n"
    )
    keys = ["to_own_mean", "genuine_mean", "genuine_std", "impostor_mean", "impostor_std",
            "impostor_p99"]
    text += table(["set", *keys], [[name, *(shape[name][k] for k in keys)]
                                   for name in ("real", "synthetic")])
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    best_rows, front_rows, verdicts = [], [], []
    for n, group in by_n.items():
        fixed = [r for r in group if r["family"] in ("peer", "facegate")]
        swept: dict[str, list[dict]] = {}
        for r in group:
            if r["family"] not in ("peer", "facegate"):
                swept.setdefault(r["index"], []).append(r)
        best_rows += fixed + [_best(v, target["recall_at_1"]) for v in swept.values()]
        served = [r for r in group if r["family"] != "compressed"]
        front_rows += frontier(served)
        ok = [r for r in served if r["recall_at_1"] >= target["recall_at_1"]]
        fastest = min(ok, key=lambda r: r["search"]["p50_ms"]) if ok else None
        if fastest:
            verdicts.append(
                f"At {n:,}: fastest at R@1 >= {target['recall_at_1']} is {fastest['index']} "
                f"{fastest['params']} (R@1 {fmt(fastest['recall_at_1'])}, p50 "
                f"{fmt(fastest['search']['p50_ms'])} ms"
                + (", within" if fastest["search"]["p50_ms"] <= target["p50_ms"] else ", over")
                + f" the {fmt(target['p50_ms'])} ms target).")
        numpy = next(r for r in fixed if r["index"].startswith("NumPy"))
        flat = next(r for r in fixed if r["index"] == "facegate flat")
        old = next(r for r in fixed if r["index"].startswith("FAISS flat"))
        verdicts.append(
            f"At {n:,}: facegate flat p50 {fmt(flat['search']['p50_ms'])} ms = "
            f"{fmt(ratio(flat['search']['p50_ms'], numpy['search']['p50_ms']))}x NumPy's "
            f"{fmt(numpy['search']['p50_ms'])} ms; FAISS flat with its default threads "
            f"{fmt(old['search']['p50_ms'])} ms.")
    text += ("\nEach index at its fastest setting that reaches R@1 >= "
             f"{target['recall_at_1']} (or its best R@1 where none does); the full sweep is in "
             "`bench/results/gallery.json`. IVF-SQ8 is not served by facegate: its rows "
             "show what compression costs in recall.\n\n")
    text += table(HEAD, [_cells(r) for r in best_rows])
    text += ("\nRecall/latency frontier of what facegate can serve (flat, IVF-Flat, HNSW; "
             "compressed codes left out): no other setting is both faster and more exact.\n\n")
    text += table(HEAD, [_cells(r) for r in front_rows])
    text += "\n" + "\n\n".join(verdicts) + "\n"
    text += (
        f"\nMemory at {PAPER_N:,} templates on paper (d = {result['dim']}, ids 8 bytes, "
        f"nlist = {PAPER_NLIST:,}, float32 coarse centroids amortised over N; PQ codebooks "
        "256 x 4d bytes, negligible; facegate's row -> template map adds its own ~2 kB per "
        "template in Python, see the scaleout part). Cross-check: the bytes / template "
        "column above at 1M is the same layout measured.\n\n")
    text += table(["index", "bytes / template", f"GB at {PAPER_N // 1_000_000}M"],
                  paper_memory(result["dim"], _hnsw_m(rows)))
    if result.get("restart"):
        from bench.gallery_restart import markdown as restart_table

        text += (
            "\nRestart (`bench/gallery_restart.py`): the largest gallery's vectors written into a "
            "real SQLite gallery (4 templates an identity; plaintext, and sealed with a master "
            "key), opened with `index=\"auto\"` as the server opens it: the first open runs "
            "k-means and persists the centroids and row lists (`<gallery>.ivf`), the restart "
            "reuses them. Open s: constructor to a searchable gallery (every row read, sealed "
            "ones opened, the index built). R@1 and latency on the restarted index against exact "
            "search for the same queries, single queries on one OpenMP thread as served.\n\n")
        text += restart_table(result["restart"])
    return text


def _hnsw_m(rows: list[dict]) -> int:
    return next((int(r["index"].split("M=")[1]) for r in rows if r["family"] == "hnsw"), 32)

