"""The FAISS side of a gallery store: the index plus the row id -> (identity, template)
map and identity names that turn index hits into candidates.

Both stores keep one :class:`IndexCache` as a cache of their database (SQLite updates it
after each commit; each PostgreSQL replica from the change sequence), so search
answers the same way whichever backend holds the gallery. A rebuild reuses the IVF
centroids it already has, or those of its `IndexFile`, where they still fit
(`gallery.index.reusable`), and persists fresh ones.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
from facegate.gallery.index import TemplateIndex
from facegate.gallery.index_file import IndexFile
from facegate.gallery.records import Candidate


class IndexCache:
    """Current-model templates, searchable; every method is safe from any thread."""

    def __init__(self, embedding_size: int, kind: str = "flat", *, gpu: bool | None = None,
                 index_file: IndexFile | None = None) -> None:
        """``index_file``: where trained IVF centroids persist, so a restart skips k-means."""
        self.index = TemplateIndex(embedding_size, kind, gpu=gpu)
        self.index_file = index_file
        self.embedding_size = embedding_size
        self._lock = threading.Lock()  # guards the two dicts (the index has its own lock)
        self._rows: dict[int, tuple[str, str]] = {}  # index id -> (identity_id, template_id)
        self._names: dict[str, str | None] = {}
        self._counts: Counter[str] = Counter()  # identity id -> indexed templates
        self._composition: Counter[int] = Counter()  # templates -> identities with that many

    def __len__(self) -> int:
        return len(self.index)

    def build(
        self,
        names: dict[str, str | None],
        rows: list[tuple[int, str, str]],
        vectors: np.ndarray,
    ) -> None:
        """Replace everything: `rows` are (row id, identity id, template id) of `vectors`."""
        with self._lock:
            self._names = dict(names)
            self._rows = {r: (i, t) for r, i, t in rows}
            self._counts = Counter(i for _, i, _ in rows)
            self._composition = Counter(self._counts.values())
        trained = self.index.trained
        if trained is None and self.index_file is not None:
            trained = self.index_file.load()
        self.index.build(np.array([r for r, _, _ in rows], dtype=np.int64), vectors, trained)
        if self.index_file is not None and self.index.trained and self.index.unsaved:
            self.index_file.save(self.index.trained)

    def set_name(self, identity_id: str, name: str | None) -> None:
        with self._lock:
            self._names[identity_id] = name

    def drop_identity(self, identity_id: str) -> None:
        with self._lock:
            self._names.pop(identity_id, None)

    def add(self, rows: list[tuple[int, str, str]], vectors: np.ndarray) -> bool:
        """Index new templates; True when the index asks to be rebuilt from the database."""
        with self._lock:
            fresh = [i for i, (r, _, _) in enumerate(rows) if r not in self._rows]
            for i in fresh:
                r, identity_id, template_id = rows[i]
                self._rows[r] = (identity_id, template_id)
                self._count(identity_id, +1)
        if fresh:
            ids = np.array([rows[i][0] for i in fresh], dtype=np.int64)
            self.index.add(ids, np.asarray(vectors)[fresh])
        return self.index.needs_rebuild

    def remove(self, row_ids: list[int]) -> bool:
        """Drop templates (unknown row ids are ignored); True when a rebuild is due."""
        with self._lock:
            current = []
            for r in row_ids:
                hit = self._rows.pop(r, None)
                if hit is not None:
                    current.append(r)
                    self._count(hit[0], -1)
        self.index.remove(np.array(current, dtype=np.int64))
        return self.index.needs_rebuild

    def composition(self) -> dict[int, int]:
        """How many identities have n searchable templates, for each n: what an open-set
        search's false-positive rate depends on (``core.error_model``)."""
        with self._lock:
            return {n: c for n, c in self._composition.items() if c > 0}

    def _count(self, identity_id: str, change: int) -> None:
        """Move one identity between composition bins (caller holds the lock)."""
        before = self._counts[identity_id]
        after = before + change
        if before:
            self._composition[before] -= 1
        if after:
            self._composition[after] += 1
            self._counts[identity_id] = after
        else:
            del self._counts[identity_id]

    def search(self, query: np.ndarray, k: int) -> list[Candidate]:
        """The `k` identities whose best template is most similar to `query`, best first."""
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.embedding_size:
            raise ValueError(f"query has {query.shape[1]} dims, expected {self.embedding_size}")
        fetch = max(4 * k, 16)
        while True:
            sims, ids = self.index.search(query, fetch)
            best: dict[str, Candidate] = {}
            for sim, row_id in zip(sims[0], ids[0], strict=True):
                hit = self._rows.get(int(row_id)) if row_id >= 0 else None
                if hit is None or hit[0] in best:
                    continue
                identity_id, template_id = hit
                best[identity_id] = Candidate(
                    identity_id, self._names.get(identity_id), float(sim), template_id
                )
                if len(best) == k:
                    return list(best.values())
            if fetch >= len(self.index):
                return list(best.values())
            fetch *= 4
