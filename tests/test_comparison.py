"""The comparison table and overlaid ROC of docs/results.md, from hand-made run folders."""

from __future__ import annotations

import json

import numpy as np
from facegate.train.comparison import main, row


def make_run(root, name, accuracy, summary_seconds=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    metrics = {"accuracy": accuracy, "accuracy_std": 0.01, "tar@far=1e-2": 0.5,
               "threshold": 0.4, "threshold_source": "uss", "accuracy@t": 0.7,
               "identity_level": {"opis": 1.5e-3, "opis_10": 2e-2}}
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(0)
    same = np.arange(200) % 2 == 0
    np.savez(run / "eval" / "scores.npz", scores=rng.random(200) + same, same=same)
    if summary_seconds is not None:
        (run / "summary.json").write_text(json.dumps({"seconds": summary_seconds}))
    return run


def test_row_formats_figures_and_marks_missing_ones():
    cells = row("uss", {"accuracy": 0.8123, "accuracy_std": 0.0042, "tar@far=1e-2": 0.25,
                        "threshold": None, "accuracy@t": None}, {"seconds": 90})
    assert cells == ["uss", "81.23 ± 0.42%", "25.00%", "n/a", "none", "n/a",
                     "n/a", "n/a", "1.5 min"]


def test_table_and_roc_from_run_folders(tmp_path, capsys):
    runs = [make_run(tmp_path, "trained", 0.8, 120), make_run(tmp_path, "reference", 0.9)]
    assert main([str(r) for r in runs] + ["--roc", str(tmp_path / "roc.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| recipe |") and len(lines) == 4
    assert lines[2].startswith("| trained | 80.00 ± 1.00% | 50.00% | n/a | 0.400 (uss) | 70.00%")
    assert lines[2].endswith("| 2.0 min |") and lines[3].endswith("| pretrained |")
    assert (tmp_path / "roc.png").stat().st_size > 10_000
