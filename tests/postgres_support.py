"""One real, throwaway PostgreSQL server per test process (bench/pg_cluster.py), started
on first use and removed at exit; one fresh database per test. Without a server binary
the tests skip, saying how to install one."""

from __future__ import annotations

import atexit
import sys
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
