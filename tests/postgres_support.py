"""One real, throwaway PostgreSQL server per test process (bench/pg_cluster.py), started
on first use and removed at exit; one fresh database per test. Without a server binary
the tests skip, saying how to install one."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is a top-level folder
from bench.pg_cluster import INSTALL_HINT, Cluster, server_bin_dir  # noqa: E402

_cluster: Cluster | None = None


def cluster() -> Cluster:
    """The process's one cluster, started on first use."""
    global _cluster
    if _cluster is None:
        if server_bin_dir() is None:
            pytest.skip(INSTALL_HINT)
        _cluster = Cluster()
        atexit.register(_cluster.remove)
    return _cluster


def postmaster_pid(c: Cluster) -> int:
    return int((c.data / "postmaster.pid").read_text().split()[0])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:  # exited meanwhile
            continue
        if stat and int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


@contextmanager
def paused() -> Iterator[None]:
    """The test cluster frozen (SIGSTOP to all its processes) inside the block: its host
    still accepts connections and acknowledges bytes, but nothing answers, as with a
    hung or swapped-out server. Resumed (SIGCONT) on leaving. The postmaster stops first,
    so no backend it forks escapes."""
    postmaster = postmaster_pid(cluster())
    os.kill(postmaster, signal.SIGSTOP)
    pids = [postmaster, *children(postmaster)]
    for pid in pids[1:]:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            os.kill(pid, signal.SIGCONT)
