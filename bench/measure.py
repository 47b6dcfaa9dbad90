"""Timing statistics and the record of where a benchmark ran (hardware, versions, date)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

VERSIONED = {
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
    "faiss": "faiss-cpu",
    "torch": "torch",
    "dlib": "dlib-bin",
    "opencv": "opencv-python-headless",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
}


def summarise(seconds: Sequence[float]) -> dict[str, float]:
    """n, mean and p50/p95/p99 in milliseconds of a list of durations in seconds."""
    if not len(seconds):
        return {"n": 0, "mean_ms": float("nan"), "p50_ms": float("nan"),
                "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": int(ms.size), "mean_ms": float(ms.mean()), "p50_ms": float(p50),
            "p95_ms": float(p95), "p99_ms": float(p99)}


def time_calls(fn: Callable[[], object], *, count: int, budget_s: float, warmup: int = 1) -> list[float]:
    """Durations of up to `count` calls of `fn`, stopping early once `budget_s` is spent (>= 1 call)."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(out) < count and (not out or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident set size of a process (``VmHWM``: its peak so far), from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its live descendants, from /proc (Linux).

    Descendants are found through each thread's ``children`` list, so worker processes
    that have not exited (and so are not in the parent's ``cutime``) count too.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Hardware, library versions and the date, stored with every result."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(_memory_bytes() / 2**30, 1),
        "load_average_at_start": load,
        "gpu": "none lent to this task",
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in VERSIONED.items()},
    }
