"""Training data from a prepared crop folder: listing, loading, splits, P x K batches.

`facegate prepare` writes ``<identity>/<stem>.png`` crops (and optionally teacher
vectors); everything here reads that layout. Small sets (tens of thousands of
crops) fit in memory as one uint8 array, which removes decoding from the
training loop; the Dataset augments that array on the fly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.metrics import split_identities as split_identities  # the trainer's split rule
from facegate.core.preprocess import model_input
from facegate.train.teacher import load_vectors, teacher_filename
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

DEFAULT_CROP_SIZE = 112  # the ArcFace template crops; dlib chips are 150
CROP_SUFFIX = ".png"


class CropFolder:
    """The crops of a prepared folder, with a deterministic identity -> label mapping.

    Identities (sub-folders holding at least one crop) are sorted by name and
    labelled 0..C-1; crops are sorted by path.
    ``identities`` restricts the listing (e.g. to a training split) and the labels
    are then 0..len(identities)-1 over that subset.
    """

    def __init__(self, root: str | Path, identities: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no crop folder at {self.root}")
        present = sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and any(d.glob(f"*{CROP_SUFFIX}"))
        )
        if identities is not None:
            wanted = set(identities)
            missing = wanted - set(present)
            if missing:
                raise KeyError(f"identities not in {self.root}: {sorted(missing)[:5]}")
            present = [name for name in present if name in wanted]
        self.identities: list[str] = present
        self.label_of = {name: label for label, name in enumerate(self.identities)}
        paths, labels = [], []
        for name in self.identities:
            for path in sorted((self.root / name).glob(f"*{CROP_SUFFIX}")):
                if not path.name.startswith("."):
                    paths.append(path)
                    labels.append(self.label_of[name])
        self.paths: list[Path] = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def relative_paths(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def load(self, workers: int | None = None, progress: bool = False) -> np.ndarray:
        return load_crops(self.paths, workers=workers, progress=progress)

    def teacher(self, name: str = "dlib") -> np.ndarray | None:
        """Teacher vectors (N, D) float32 in crop order, or None if the folder has none."""
        path = self.root / teacher_filename(name)
        return load_vectors(path, self.relative_paths) if path.is_file() else None


def _read_crop(path: Path, size: int) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot read crop {path}")
    if image.shape[:2] != (size, size):
        raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, not a {size}x{size} crop "
                         "like the folder's first one")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def crop_size(path: str | Path) -> int:
    """Side of a square crop file: the geometry the folder was prepared with (112, 150...)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot read crop {path}")
    return int(image.shape[0])


def load_crops(
    paths: Sequence[str | Path], workers: int | None = None, progress: bool = False
) -> np.ndarray:
    """Read square crops, all the size of the first, into one (N, S, S, 3) uint8 RGB array
    (threads: cv2 releases the GIL)."""
    size = crop_size(paths[0]) if len(paths) else DEFAULT_CROP_SIZE
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        loaded = pool.map(lambda p: _read_crop(Path(p), size), paths)
        for i, image in enumerate(tqdm(loaded, total=len(paths), desc="load crops", disable=not progress)):
            out[i] = image
    return out


class PKSampler(Sampler[list[int]]):
    """Batches of P identities x K photos each (use as a DataLoader ``batch_sampler``).

    Metric and margin losses need several photos per identity in a batch. Identities
    are visited in a seeded shuffled order, cycling, so each is seen about equally
    often; photos are drawn without replacement, or with replacement for identities
    holding fewer than K. An epoch is about ``len(labels) / (P * K)`` batches in
    total, split over ``world_size`` ranks (every rank computes the same global
    sequence from ``seed`` and ``set_epoch`` and keeps every world_size-th batch).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.by_identity = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        if p < 1 or k < 1:
            raise ValueError("p and k must be positive")
        if p > len(self.by_identity):
            raise ValueError(f"p={p} exceeds the {len(self.by_identity)} identities")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        total = max(world_size, len(self.labels) // (p * k))
        self.batches_per_rank = total // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for step in range(self.batches_per_rank * self.world_size):
            while len(order) < self.p:
                # A new cycle over all identities; those still waiting go last so a batch
                # never holds one identity twice.
                cycle = [int(c) for c in rng.permutation(len(self.by_identity))]
                order += [c for c in cycle if c not in order] + [c for c in cycle if c in order]
            chosen, order = order[: self.p], order[self.p :]
            # Every rank draws every batch so all ranks stay on the same random sequence.
            batch = []
            for c in chosen:
                members = self.by_identity[c]
                replace = len(members) < self.k
                batch += [int(i) for i in rng.choice(members, self.k, replace=replace)]
            if step % self.world_size == self.rank:
                yield batch


def normalize(images: np.ndarray, input_spec: dict[str, Any] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) RGB -> the model's float32 NCHW / CHW input.

    The same ``core.preprocess.model_input`` the runtimes use, with the backbone's input
    spec (default: the 112x112 models' (x - 127.5) / 127.5), so training and serving feed
    alike.
    """
    single = images.ndim == 3
    x = model_input(images[None] if single else images, input_spec or DEFAULT_INPUT)
    return torch.from_numpy(x[0] if single else x)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """Zoom into a random square covering [min_scale, 1] of the area, resized back: scale + shift."""
    size = image.shape[0]
    side = size * math.sqrt(rng.uniform(min_scale, 1.0))
    x, y = rng.uniform(0, size - side, 2)
    matrix = np.array([[size / side, 0, -x * size / side], [0, size / side, -y * size / side]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    x = image.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - grey[..., None]) * saturation + grey[..., None]
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class CropDataset(Dataset):
    """In-memory uint8 crops -> augmented, normalised tensors ``(x, label[, teacher])``.

    Augmentation: horizontal flip (p=0.5, unless ``flip=False``), random resized crop of at least
    ``min_scale`` of the area (``min_scale=1`` disables it), optional colour jitter.
    Randomness comes from torch's generator, so ``torch.manual_seed`` reproduces it
    and each DataLoader worker draws differently.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        teacher: np.ndarray | None = None,
        *,
        augment: bool = True,
        flip: bool = True,
        min_scale: float = 0.85,
        jitter: float = 0.0,
        input_spec: dict[str, Any] | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("images must be (N, H, W, 3) uint8")
        if len(labels) != len(images) or (teacher is not None and len(teacher) != len(images)):
            raise ValueError("images, labels and teacher differ in length")
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.teacher = None if teacher is None else torch.as_tensor(teacher, dtype=torch.float32)
        self.augment, self.flip, self.min_scale, self.jitter = augment, flip, min_scale, jitter
        self.input_spec = input_spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image = self.images[index]
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
            if self.min_scale < 1.0:
                image = random_resized_crop(np.ascontiguousarray(image), rng, self.min_scale)
            if self.jitter > 0:
                image = color_jitter(image, rng, self.jitter)
        x = normalize(np.ascontiguousarray(image), self.input_spec)
        if self.teacher is None:
            return x, self.labels[index]
        return x, self.labels[index], self.teacher[index]
