"""Teacher vectors: one per crop, in an .npz keyed by the crop's path relative to its folder.

``facegate prepare --teacher dlib`` writes them next to the crops (resumably: it reads
the whole table, adds the new crops' vectors and writes it back); distillation reads
them in crop order, centred (``load_teacher``); ``facegate evaluate`` scores such a file
as precomputed embeddings (``load_vectors``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from facegate.train.config import ConfigError

TEACHERS = ("dlib",)


def teacher_filename(name: str) -> str:
    """The file a crops folder keeps teacher ``name``'s vectors in."""
    return f"teacher_{name}.npz"


class MissingVectors(KeyError):
    """Some crops have no vector in an .npz keyed by crop path."""

    def __init__(self, path: str | Path, missing: list[str]) -> None:
        super().__init__(f"{path}: no vector for {len(missing)} crops, e.g. {missing[0]}")
        self.missing = missing


def load_vectors(path: str | Path, keys: list[str]) -> np.ndarray:
    """Vectors (N, D) float32 of ``keys`` (crop paths relative to a crops folder), in that
    order; ``MissingVectors`` when some key has none."""
    with np.load(path) as table:
        stored = set(table.files)
        missing = [key for key in keys if key not in stored]
        if missing:
            raise MissingVectors(path, missing)
        return np.stack([table[key] for key in keys]).astype(np.float32)


def load_teacher(path: str | Path, crop_paths: list[str]) -> np.ndarray:
    """Distillation targets: teacher vectors (N, d_t) float32 in crop order, centred on
    their mean.

    Every training crop needs one. Centring matters: dlib's descriptors lie in a
    narrow cone (on the CelebA crops, cosine 0.83 between different people and 0.95
    within one); centred, those are 0.00 and 0.68, a geometry that a cosine-margin
    head and USS's unified threshold can share. Uncentred, USS learned t > 1.
    """
    try:
        vectors = load_vectors(path, crop_paths)
    except FileNotFoundError:
        raise ConfigError(f"data.teacher {path} does not exist: prepare the crops with "
                          "--teacher dlib") from None
    except MissingVectors as err:
        raise ConfigError(f"{path}: no teacher embedding for {len(err.missing)} crops "
                          f"(e.g. {err.missing[0]}); rerun prepare --teacher") from None
    return vectors - vectors.mean(axis=0)


def read_table(path: Path) -> dict[str, np.ndarray]:
    """Every vector of a teacher file by crop path; empty when there is no file yet."""
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def write_table(path: Path, vectors: dict[str, np.ndarray]) -> None:
    """Replace the teacher file atomically (a partial file never shadows a good one)."""
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez(partial, **dict(sorted(vectors.items())))  # type: ignore[arg-type]  # keys are paths
    partial.replace(path)
