"""Shared test fixtures: real photos from ../shared, never copied into the repo."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import faiss
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
CELEBA = SHARED / "data" / "celeba-subset"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests cleanly where no NVIDIA GPU is visible."""
    if _has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_cuda_gpu() -> bool:
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def celeba_root() -> Path:
    assert CELEBA.is_dir(), f"shared data missing at {CELEBA}"
    return CELEBA


@pytest.fixture(scope="session")
def celeba_index(celeba_root) -> list[tuple[Path, str]]:
    """(photo path, identity) for every photo, in the CSV's order."""
    with open(celeba_root / "identities.csv", newline="") as f:
        return [(celeba_root / row["path"], row["identity"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def insightface_group_photo() -> Path:
    """insightface's bundled 6-face group photo `t1.jpg`, located without importing insightface."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("insightface is not installed (make test installs it with --no-deps)")
    root = Path(next(iter(spec.submodule_search_locations)))
    matches = sorted(root.glob("data/images/t1.*"))
    assert matches, f"t1 photo not found under {root}"
    return matches[0]


@pytest.fixture
def single_threaded_faiss():
    """One OpenMP thread: single-query searches on a shared 2-core box are far faster."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
