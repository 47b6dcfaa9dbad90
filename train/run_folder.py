"""What a run writes at its start and as it goes: ``config.yaml``, ``split.json`` and
``log.jsonl`` (its checkpoint is ``train.checkpoint``'s). Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from facegate.train.config import Config
from facegate.train.split import Split


class RunLog:
    """Append-only JSONL log (rank 0 only); also kept in memory for the plots."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []
        if enabled and path.is_file():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line]

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past a resumed checkpoint's step, so the log has no duplicate steps."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def last_validation(self) -> dict[str, Any] | None:
        vals = [r for r in self.records if r.get("kind") == "val"]
        return vals[-1] if vals else None

    def last_speed(self) -> float | None:
        """imgs/s of the last step or epoch record."""
        speeds = [r for r in self.records if r.get("kind") in ("epoch", "step")]
        return speeds[-1]["imgs_per_s"] if speeds else None


def write_run_start(out: Path, cfg: Config, split: Split) -> None:
    """``config.yaml`` (the resolved config) and ``split.json`` (which identities trained)."""
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "split.json").write_text(json.dumps(
        {"holdout": cfg.data.holdout, "split_seed": cfg.data.split_seed,
         "train": split.train.identities,
         "test": split.test.identities if split.test is not None else []}, indent=1) + "\n")

