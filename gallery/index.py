"""FAISS vector index over the current model's templates, keyed by SQLite row id.

The index is a cache: `facegate.gallery.store` rebuilds it from SQLite at open and
after deletions it cannot apply in place. It is thread-safe: searches share a read
lock, changes take the write lock, so many searches run at once and a change waits
only for the searches in flight.

Kinds:
- ``flat``: exact inner-product search (``IndexIDMap2`` over ``IndexFlatIP``).
- ``hnsw``: ``IndexHNSWFlat`` (inner product, M=32). HNSW cannot remove vectors, so
  deletions are tombstoned, filtered out of results, and the owner rebuilds the index
  once the tombstoned share passes `REBUILD_DELETED_SHARE`.
- ``ivf``: ``IndexIVFFlat`` with ``nlist = 4 sqrt(n)`` lists (at most 4096), or fewer
  where there are not `IVF_TRAIN_PER_LIST` vectors a list to train them; below
  `IVF_MIN_LISTS` lists it falls back to flat. It probes ``nlist ** 0.72`` lists, 15% of
  them at 50k and 10% at 1M: on the default model's real embeddings (a narrow cone, not a
  uniform sphere) the share R@1 0.99 needs falls as the gallery grows (docs/gallery.md).
  k-means is spherical (unit centroids: plain k-means' centroids of a narrow cone differ in
  norm, and inner-product assignment then piled up to 34x the mean list size into the
  longest lists at 1M) and runs 10 iterations (FAISS's default: 25) on 64 points a list,
  for a build 2.5x shorter; its centroids and each row's list can be handed back to `build`
  (`TrainedLists`, persisted by ``gallery.index_file``), so a restart skips both k-means
  and assignment. The owner rebuilds (and retrains) once the index has doubled since
  training.
- ``auto``: `auto_kind` of the gallery size at each build: flat while exact search is
  fast enough, then IVF (thresholds measured on real embeddings, docs/gallery.md). The
  owner rebuilds when the size crosses to another kind.
A GPU copy (``faiss.index_cpu_to_all_gpus``) is used for flat and IVF when FAISS has
GPU support and ``gpu`` is not False; GPU indexes tombstone deletions like HNSW.

A search of fewer than `BATCH_QUERIES` queries runs on one OpenMP thread: FAISS's
threads only wait for each other on one query (measured: flat 2-30x slower with the
default threads on a busy 2-core machine). The thread count is set for the calling
thread only (OpenMP keeps it per thread), so a process-wide setting made elsewhere,
e.g. in the thread that started the server, never reached the threads that search.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf", "auto")
HNSW_M = 32
HNSW_EF_SEARCH = 128
IVF_TRAIN_PER_LIST = 39
IVF_TRAIN_SAMPLE_PER_LIST = 64  # k-means on 64 points a list: half the build time of 256, same recall
IVF_TRAIN_ITERATIONS = 10
IVF_LISTS_PER_SQRT = 4
IVF_MIN_LISTS = 4
IVF_MAX_LISTS = 4096
IVF_PROBE_EXPONENT = 0.72
IVF_TRAINING = "spherical k-means"  # what a persisted index's centroids must come from
REBUILD_DELETED_SHARE = 0.2
UNSAVED_SHARE = 0.1
AUTO_FLAT_MAX = 50_000
BATCH_QUERIES = 16


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and hasattr(faiss, "index_cpu_to_all_gpus") and get_num_gpus() > 0)


def ivf_lists(n: int) -> int:
    """Number of IVF lists for `n` vectors, or 0 when `n` is too few to train (flat fallback)."""
    nlist = min(IVF_MAX_LISTS, int(min(IVF_LISTS_PER_SQRT * math.sqrt(n), n / IVF_TRAIN_PER_LIST)))
    return nlist if nlist >= IVF_MIN_LISTS else 0


def ivf_probes(nlist: int) -> int:
    """Lists an IVF search visits: ``nlist ** IVF_PROBE_EXPONENT`` (a shrinking share)."""
    return max(1, min(nlist, round(nlist**IVF_PROBE_EXPONENT)))


def auto_kind(n: int) -> str:
    """The kind ``auto`` serves `n` vectors with: exact flat up to `AUTO_FLAT_MAX`, then IVF."""
    return "flat" if n <= AUTO_FLAT_MAX or not ivf_lists(n) else "ivf"


@dataclass(frozen=True)
class TrainedLists:
    """An IVF's coarse centroids (nlist, dim), the gallery size they were trained at, and
    optionally the list of each row id (`ids`, sorted, and `lists`), so a rebuild adds the
    rows it knows without assigning them (at 1M, assignment is as long as k-means' share)."""

    centroids: np.ndarray
    size: int
    ids: np.ndarray | None = None
    lists: np.ndarray | None = None


def reusable(trained: TrainedLists, n: int, dim: int) -> bool:
    """Whether centroids trained at ``trained.size`` vectors serve `n` as a retrain would:
    the same dimension, and `n` within the factor of 2 of the size that triggers a
    retrain anyway (``needs_rebuild``), so a restart keeps what a running server keeps."""
    nlist, d = trained.centroids.shape
    return (d == dim and nlist >= IVF_MIN_LISTS and trained.size / 2 <= n <= 2 * trained.size
            and bool(np.isfinite(trained.centroids).all()))


@contextmanager
def search_threads(queries: int) -> Iterator[None]:
    """One OpenMP thread for fewer than `BATCH_QUERIES` queries, in this thread only."""
    if queries >= BATCH_QUERIES:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class TemplateIndex:
    """Inner-product index of L2-normalised vectors with int64 ids (template row ids)."""

    def __init__(self, dim: int, kind: str = "flat", *, gpu: bool | None = None) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
        if gpu and not gpu_available():
            raise ValueError("gpu=True but FAISS has no GPU support or sees no GPU")
        self.dim = dim
        self.kind = kind
        self.on_gpu = kind != "hnsw" and gpu is not False and gpu_available()
        self._lock = ReadWriteLock()
        self._deleted: set[int] = set()
        self._trained_size = 0
        self._built_kind = "flat" if kind == "auto" else kind
        self.trainings = 0  # k-means runs, so a test can see a build that reused centroids
        self.trained: TrainedLists | None = None
        self.unsaved = False  # `trained` differs from what its owner last persisted
        self._index = self._placed(self._empty(np.empty((0, dim), dtype=np.float32),
                                               self._built_kind)[0])
        self._flat_view: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def backend(self) -> str:
        """What actually serves searches, e.g. ``ivf`` or ``flat`` (the IVF fallback)."""
        if self._built_kind == "ivf" and not self._trained_size:
            return "flat"
        return self._built_kind

    def __len__(self) -> int:
        """Number of live (not tombstoned) vectors."""
        return self._index.ntotal - len(self._deleted)

    @property
    def needs_rebuild(self) -> bool:
        """True when tombstones or IVF growth call for `build` from the source of truth."""
        total = self._index.ntotal
        if self._deleted and len(self._deleted) > REBUILD_DELETED_SHARE * total:
            return True
        if self.kind == "auto" and auto_kind(total) != self.backend:
            return True
        if self._built_kind != "ivf":
            return False
        if not self._trained_size:
            return ivf_lists(total) > 0
        return total > 2 * self._trained_size

    def build(self, ids: np.ndarray, vectors: np.ndarray,
              trained: TrainedLists | None = None) -> None:
        """Replace the whole index with `vectors` (N, dim) under `ids` (N,).

        `trained`: coarse centroids from an earlier training (``gallery.index_file``),
        used instead of k-means when this build is IVF and `reusable` says they fit."""
        ids, vectors = _as_ids(ids), _as_vectors(vectors, self.dim)
        kind = auto_kind(len(ids)) if self.kind == "auto" else self.kind
        if kind != "ivf" or trained is None or not reusable(trained, len(ids), self.dim):
            trained = None
        index, lists = self._empty(vectors, kind, trained)
        self.unsaved = False
        if lists is not None and len(ids):
            known = _known_lists(trained, ids) if trained is not None else None
            assign = np.full(len(ids), -1, dtype=np.int64) if known is None else known
            fresh = assign < 0
            if fresh.any():
                _, found = faiss.downcast_index(index).quantizer.search(vectors[fresh], 1)
                assign[fresh] = found[:, 0]
            faiss.downcast_index(index).add_core(len(ids), faiss.swig_ptr(vectors),
                                                 faiss.swig_ptr(ids), faiss.swig_ptr(assign))
            order = np.argsort(ids)
            # persist again when k-means ran or a tenth of the rows had no known list
            self.unsaved = trained is None or fresh.mean() > UNSAVED_SHARE
            lists = TrainedLists(lists.centroids, lists.size, ids[order], assign[order])
        elif len(ids):
            index.add_with_ids(vectors, ids)
        index = self._placed(index)
        with self._lock.write():
            self._index = index
            self._flat_view = None
            self._built_kind = kind
            self._deleted = set()
            self._trained_size = lists.size if lists else 0
            self.trained = lists

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _as_ids(ids), _as_vectors(vectors, self.dim)
        if len(ids):
            with self._lock.write():
                self._index.add_with_ids(vectors, ids)
                self._flat_view = None

    def remove(self, ids: np.ndarray) -> None:
        """Remove `ids`; kinds that cannot remove in place tombstone them instead."""
        ids = _as_ids(ids)
        if not len(ids):
            return
        with self._lock.write():
            self._flat_view = None
            if self._tombstones:
                self._deleted.update(int(i) for i in ids)
            else:
                self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` (similarities, ids) per query row, best first; missing slots have id -1."""
        queries = _as_vectors(queries, self.dim)
        with self._lock.read():
            deleted = self._deleted
            fetch = min(k + len(deleted), self._index.ntotal)
            if fetch <= 0:
                empty = np.empty((len(queries), 0))
                return empty.astype(np.float32), empty.astype(np.int64)
            if self.backend == "flat" and not self.on_gpu and len(queries) < BATCH_QUERIES:
                if self._flat_view is None:  # readers may race here: they build the same views
                    self._flat_view = _flat_view(self._index)
                sims, ids = _numpy_flat_search(*self._flat_view, queries, fetch)
            else:
                with search_threads(len(queries)):
                    sims, ids = self._index.search(queries, fetch)
            if not deleted:
                return sims[:, :k], ids[:, :k]
            out_sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
            out_ids = np.full((len(queries), k), -1, dtype=np.int64)
            for row in range(len(queries)):
                keep = [j for j, i in enumerate(ids[row]) if i >= 0 and int(i) not in deleted]
                keep = keep[:k]
                out_sims[row, : len(keep)] = sims[row, keep]
                out_ids[row, : len(keep)] = ids[row, keep]
            return out_sims, out_ids

    @property
    def _tombstones(self) -> bool:
        return self._built_kind == "hnsw" or self.on_gpu

    def _empty(self, vectors: np.ndarray, kind: str = "flat",
               trained: TrainedLists | None = None) -> tuple[faiss.Index, TrainedLists | None]:
        """A fresh, empty CPU index of `kind` for `vectors` and its coarse centroids (IVF:
        `trained`'s, else k-means on `vectors`, counted in `trainings`)."""
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = HNSW_EF_SEARCH
            return faiss.IndexIDMap2(hnsw), None
        nlist = ivf_lists(len(vectors)) if kind == "ivf" else 0
        if trained is not None:
            nlist = len(trained.centroids)
        index: faiss.Index
        lists = None
        if nlist:
            quantizer = faiss.IndexFlatIP(self.dim)
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if trained is None:
                ivf.cp.max_points_per_centroid = IVF_TRAIN_SAMPLE_PER_LIST
                ivf.cp.niter = IVF_TRAIN_ITERATIONS
                ivf.cp.spherical = True  # unit centroids: lists balanced under inner product
                ivf.train(vectors)
                self.trainings += 1
                lists = TrainedLists(quantizer.reconstruct_n(0, nlist), len(vectors))
            else:
                quantizer.add(trained.centroids)
                ivf.is_trained = True
                lists = TrainedLists(trained.centroids, trained.size)
            ivf.nprobe = ivf_probes(nlist)
            index = ivf
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        return index, lists

    def _placed(self, index: faiss.Index) -> faiss.Index:
        """`index` itself, or its GPU copy where this index runs on the GPU."""
        return faiss.index_cpu_to_all_gpus(index) if self.on_gpu else index


def _flat_view(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy NumPy views of a flat ``IndexIDMap2``'s (vectors, row ids).

    Valid until the index changes: the owner drops them on every write.
    """
    index = faiss.downcast_index(index)
    flat = faiss.downcast_index(index.index)
    n = flat.ntotal
    vectors = faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d)
    return vectors, faiss.rev_swig_ptr(index.id_map.data(), n)


def _numpy_flat_search(vectors: np.ndarray, row_ids: np.ndarray, queries: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k`, one BLAS matrix-vector product per query over the flat index's views.

    FAISS's own single-query flat scan measured 1.1-3x slower than NumPy's matrix-vector
    product on the same vectors (docs/gallery.md); a (1, d) x (d, n) product measured
    slower than (n, d) x (d,) too, hence one product a query.
    """
    n = len(vectors)
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for row, query in enumerate(queries):
        scores = vectors @ query
        top = np.argpartition(scores, n - k)[n - k:]
        top = top[np.argsort(-scores[top], kind="stable")]
        sims[row] = scores[top]
        ids[row] = row_ids[top]
    return sims, ids


def _known_lists(trained: TrainedLists, ids: np.ndarray) -> np.ndarray | None:
    """The list `trained` recorded for each of `ids`, -1 where it has none."""
    if trained.ids is None or trained.lists is None or not len(trained.ids):
        return None
    at = np.minimum(np.searchsorted(trained.ids, ids), len(trained.ids) - 1)
    known = trained.ids[at] == ids
    out = np.where(known, trained.lists[at], -1).astype(np.int64)
    out[(out >= len(trained.centroids))] = -1
    return out


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (N, {dim}), got {vectors.shape}")
    return vectors
