"""PNG plots of a training run and of an evaluation (matplotlib, Agg backend, no display).

Training plots read the run's JSONL log records, so they can be redrawn from any
run folder after the fact; evaluation plots take the arrays evaluate computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write loss.png, threshold.png (when t was logged) and validation.png (when validated)."""
    out_dir = Path(out_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    vals = [r for r in records if r.get("kind") == "val"]
    written: list[Path] = []
    if steps:
        terms = sorted({k for r in steps for k in r if k.startswith("loss")})
        fig, ax = plt.subplots(figsize=(7, 4))
        for term in terms:
            xs = [r["step"] for r in steps if term in r]
            ax.plot(xs, [r[term] for r in steps if term in r], label=term)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training losses")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "loss.png"))
        with_t = [r for r in steps if r.get("threshold") is not None]
        if with_t:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot([r["step"] for r in with_t], [r["threshold"] for r in with_t])
            ax.set_xlabel("step")
            ax.set_ylabel("t = b / s")
            ax.set_title("learned unified threshold t")
            ax.grid(alpha=0.3)
            written.append(_save(fig, out_dir / "threshold.png"))
    if vals:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [r["epoch"] for r in vals]
        for key in sorted({k for r in vals for k in r if k.startswith(("tar@", "accuracy"))}):
            ax.plot(epochs, [r.get(key, np.nan) for r in vals], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.set_title("validation on held-out identities")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "validation.png"))
    return written


def plot_roc(far: np.ndarray, tar: np.ndarray, out: str | Path, *, title: str = "ROC") -> Path:
    """TAR against FAR on a log-FAR axis (points with FAR = 0 cannot be drawn and are left out)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    keep = far > 0
    ax.plot(far[keep], tar[keep])
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, Path(out))


def plot_threshold_histogram(
    thresholds: Sequence[float], unified: float | None, out: str | Path
) -> Path:
    """Histogram of per-identity best thresholds, with the model's unified t marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.asarray(thresholds, dtype=float), bins=30, color="tab:blue", alpha=0.8)
    if unified is not None:
        ax.axvline(unified, color="tab:red", linestyle="--", label=f"unified t = {unified:.3f}")
        ax.legend()
    ax.set_xlabel("best-accuracy threshold of one identity")
    ax.set_ylabel("identities")
    ax.set_title("per-identity thresholds")
    return _save(fig, Path(out))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
