"""The decisions part's section of docs/benchmarks.md (and the tables docs/results.md quotes)."""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pooled(rows: list[dict], count: str, rate: str) -> str:
    """'trials | rate' of per-fold rows pooled by their trial counts."""
    trials = sum(r[count] for r in rows)
    return f"{trials} | {_pct(sum(r[rate] * r[count] for r in rows) / max(trials, 1))}"


def render(result: dict) -> str:
    lines = ["Decisions at every scale through a real server (held-out folds, each served by a",
             "bundle whose error model and USS threshold were fitted without the fold), the",
             "error model's extrapolation on synthetic galleries, and what deciding this way",
             "costs a request. Targets: FPIR 1% for search, FAR 1% for verify against an identity.",
             "", "Pooled over the folds (the bars: FPIR within 0.5x-2x of 1%, FAR within 0.5x-1.5x):",
             "", "| gallery | stranger searches | FPIR | mated searches | TPIR |", "|---|---|---|---|---|"]
    for size in sorted({row["gallery"] for f in result["http"] for row in f["sizes"]}):
        rows = [row for f in result["http"] for row in f["sizes"] if row["gallery"] == size]
        lines.append(f"| {size} | " + " | ".join(_pooled(rows, n, r) for n, r in
                                                 (("strangers", "fpir"), ("mated", "tpir"))) + " |")
    lines += ["", "| templates | impostor trials | FAR | genuine trials | FRR |", "|---|---|---|---|---|"]
    for n in (1, 3, 5):
        rows = [row for f in result["http"] for row in f["identity"] if row["templates"] == n]
        lines.append(f"| {n} | " + " | ".join(_pooled(rows, c, r) for c, r in
                                              (("impostor_trials", "far"),
                                               ("genuine_trials", "frr"))) + " |")
    lines += ["", "Each fold:", "",
              "| fold | gallery | threshold | stranger searches | FPIR | mated searches | TPIR |",
              "|---|---|---|---|---|---|---|"]
    for fold in result["http"]:
        for row in fold["sizes"]:
            lines.append(f"| {fold['fold']} | {row['gallery']} | {row['threshold']:.4f} | "
                         f"{row['strangers']} | {_pct(row['fpir'])} | {row['mated']} | "
                         f"{_pct(row['tpir'])} |")
    lines += ["", "Largest gap between a response's threshold and the offline model's for the "
              "same gallery: " + ", ".join(f"{f['threshold_gap_max']:.1e}" for f in result["http"])
              + ".", "", "| fold | templates | threshold | FAR | FRR | impostor / genuine trials |",
              "|---|---|---|---|---|---|"]
    for fold in result["http"]:
        for row in fold["identity"]:
            lines.append(f"| {fold['fold']} | {row['templates']} | {row['threshold']:.4f} | "
                         f"{_pct(row['far'])} | {_pct(row['frr'])} | {row['impostor_trials']} / "
                         f"{row['genuine_trials']} |")
    lines += ["", "1:1 pairs at the fold's learned threshold: " + ", ".join(
        f"fold {f['fold']} FAR {_pct(f['pair']['far'])} ({f['pair']['impostor_pairs']} pairs)"
        for f in result["http"]) + ".", "",
        "Extrapolation (synthetic identities shaped like the real embeddings; model fitted on "
        "247 of them):", "", "| gallery identities | threshold | measured FPIR | strangers |",
        "|---|---|---|---|"]
    for row in result["extrapolation"]:
        lines.append(f"| {row['gallery']:,} | {row['threshold']:.4f} | {_pct(row['fpir'])} | "
                     f"{row['strangers']} |")
    cost = result["cost"]
    lines += ["", f"Added per request (p50, in-process): search {cost['search_us']:.0f} µs "
              f"(threshold for the gallery's composition from cache, 5 candidates' FPIR), verify "
              f"{cost['verify_us']:.0f} µs, verify against an identity "
              f"{cost['verify_identity_us']:.0f} µs; bar: under 1 ms."]
    return "\n".join(lines)
