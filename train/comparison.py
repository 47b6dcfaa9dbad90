"""The loss comparison table of docs/results.md, from finished runs.

Each run folder holds ``summary.json`` (from ``facegate train``) and
``eval/metrics.json`` (from ``facegate evaluate`` on the run's held-out
identities); a reference folder may hold ``eval/metrics.json`` alone (e.g. dlib's
pretrained descriptors). ``python -m facegate.train.comparison RUN... > table.md``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("recipe", "10-fold acc.", "TAR@FAR1e-2", "TAR@FAR1e-3", "t (source)", "acc. at t",
           "OPIS", "10%-OPIS", "train time")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def row(name: str, metrics: dict[str, Any], summary: dict[str, Any] | None) -> list[str]:
    """One table row: figures on the held-out pairs, training time from the summary."""
    level = metrics.get("identity_level") or {}
    t = metrics.get("threshold")
    threshold = "none" if t is None else f"{t:.3f} ({metrics.get('threshold_source')})"
    seconds = summary.get("seconds") if summary else None
    opis, opis10 = level.get("opis"), level.get("opis_10")
    return [
        name,
        f"{100 * metrics['accuracy']:.2f} ± {100 * metrics['accuracy_std']:.2f}%",
        _pct(metrics.get("tar@far=1e-2")),
        _pct(metrics.get("tar@far=1e-3")),
        threshold,
        _pct(metrics.get("accuracy@t")),
        "n/a" if opis is None else f"{opis:.2e}",
        "n/a" if opis10 is None else f"{opis10:.2e}",
        "pretrained" if seconds is None else f"{seconds / 60:.1f} min",
    ]


def table(runs: list[Path]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        summary_path = run / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        lines.append("| " + " | ".join(row(run.name, metrics, summary)) + " |")
    return "\n".join(lines)


def plot_rocs(runs: list[Path], path: Path) -> None:
    """Every run's ROC (from its eval/scores.npz) on one log-FAR plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from facegate.core import metrics

    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        with np.load(run / "eval" / "scores.npz") as data:
            far, tar, _ = metrics.roc_curve(data["scores"], data["same"])
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=run.name)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC on the 48 held-out identities")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, in table order")
    parser.add_argument("--roc", type=Path, help="also write the overlaid ROC curves here")
    args = parser.parse_args(argv)
    print(table(args.runs))
    if args.roc:
        plot_rocs(args.runs, args.roc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
