"""The figures of docs/results.md's decisions section, from ``train.decision_eval``'s run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_all(result: dict[str, Any], tables: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    _det(axes[0], result)
    _open_set(axes[1], tables)
    _calibration(axes[2], tables)
    fig.tight_layout()
    path = out / "decisions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _det(ax, result: dict[str, Any]) -> None:
    """1:1 DET (FNMR against FMR), pooled held-out folds, with the served operating point."""
    genuine = np.concatenate([p["genuine"] for p in result["pair"]])
    impostor = np.concatenate([p["impostor"] for p in result["pair"]])
    ts = np.linspace(0.85, 0.99, 300)
    fmr = np.array([np.mean(impostor >= t) for t in ts])
    fnmr = np.array([np.mean(genuine < t) for t in ts])
    keep = fmr > 0
    ax.loglog(fmr[keep], fnmr[keep], label="held-out pairs")
    served = [(np.mean(p["impostor"] >= p["threshold"]), np.mean(p["genuine"] < p["threshold"]))
              for p in result["pair"]]
    ax.scatter(*zip(*served, strict=True), color="C3", s=14, label="learned t, per fold")
    ax.set(xlabel="FMR", ylabel="FNMR", title="1:1 pairs (DET)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _open_set(ax, tables: dict[str, Any]) -> None:
    """FPIR and FNIR by gallery size at the served thresholds; FPIR at the pair threshold."""
    rows = tables["open_set"]
    x = [r["identities"] for r in rows]
    fpir = np.array([r["fpir"] for r in rows])
    lo = fpir - np.array([r["fpir_95"][0] for r in rows])
    hi = np.array([r["fpir_95"][1] for r in rows]) - fpir
    ax.errorbar(x, fpir, yerr=[lo, hi], marker="o", capsize=3, label="FPIR, served threshold")
    ax.plot(x, [r["fnir"] for r in rows], marker="s", label="FNIR, served threshold")
    ax.plot(x, [r["pair_threshold_fpir"] for r in rows], marker="^", ls="--",
            label="FPIR at the pair threshold (before)")
    ax.axhline(rows[0]["target_fpir"], color="k", lw=0.8, ls=":", label="target FPIR")
    ax.set(xscale="log", yscale="log", xlabel="gallery identities (3 photos each)",
           ylabel="rate", title="open-set search, held-out strangers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _calibration(ax, tables: dict[str, Any]) -> None:
    """Estimated against measured rates: within the band, estimates are within 2x."""
    points = tables["calibration"]
    for kind, marker in (("pair", "o"), ("identity", "s"), ("open_set", "^")):
        sel = [p for p in points if p["kind"] == kind]
        if sel:
            ax.scatter([p["measured"] for p in sel], [p["estimated"] for p in sel], s=10,
                       marker=marker, alpha=0.6, label=kind.replace("_", "-"))
    lim = [1e-4, 1]
    ax.plot(lim, lim, "k", lw=0.8)
    ax.fill_between(lim, [v / 2 for v in lim], [v * 2 for v in lim], color="k", alpha=0.08,
                    label="within 2x")
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="measured rate (held-out)",
           ylabel="estimated rate (error model)", title="calibration of the estimates")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
