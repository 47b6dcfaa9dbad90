"""The crops a run trains and validates on, in memory as uint8: a crop folder or a RecordIO pack,
split by identity (seeded) into training and held-out identities.

``data.format: folder`` reads ``facegate prepare``'s ``<identity>/<stem>.png`` layout (with
its ``geometry.json`` and optional teacher vectors); ``data.format: recordio`` reads an
insightface pack, ``data.root/train.rec`` + ``train.idx`` (identities are its integer
labels). Either way the crops must be the backbone's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facegate.core.align import Geometry, as_geometry
from facegate.core.face import read_geometry_file
from facegate.train import data as train_data
from facegate.train.backbones import geometry_of, get_backbone
from facegate.train.config import Config, ConfigError
from facegate.train.recordio import RecordIODataset, RecordIOError
from torch import nn
from tqdm import tqdm

RECORDIO_PREFIX = "train"  # insightface's pack name: data.root/train.rec and train.idx


@dataclass
class Crops:
    """Crops of some identities: labels 0..C-1 index ``identities`` (sorted names)."""

    identities: list[str]
    labels: np.ndarray
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    relative_paths: list[str] | None  # crop paths in the folder (teacher keys); None for packs

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Split:
    """Crops of the training identities and of the held-out ones (None without holdout)."""

    train: Crops
    test: Crops | None


def prepare_command(cfg: Config, geometry: Geometry) -> str:
    """The ``facegate prepare`` call that makes ``data.root`` as ``cfg`` needs it, for errors
    that find the data missing or made for another model."""
    flags = f"--geometry {geometry.method} --size {geometry.size}"
    if geometry.padding is not None:
        flags += f" --padding {geometry.padding}"
    if cfg.data.teacher is not None:
        flags += " --teacher dlib"
    return (f"`facegate prepare PHOTOS {cfg.data.root} {flags}` (PHOTOS: identity folders or an "
            "identities.csv, e.g. ../shared/data/celeba-subset/identities.csv)")


def load_split(cfg: Config, progress: bool) -> Split:
    """Split identities (seeded) and load both sides' crops into memory as uint8."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, width=cfg.model.width)
        geometry = as_geometry(geometry_of(backbone))
        made_by = ("an insightface pack (train.rec, train.idx)" if cfg.data.format == "recordio"
                   else prepare_command(cfg, geometry))
        raise ConfigError(f"data.root {cfg.data.root} does not exist: make it with {made_by}")
    if cfg.data.format == "recordio":
        return _split_pack(cfg, progress)
    try:
        everything = train_data.CropFolder(root)
        train_ids, test_ids = train_data.split_identities(
            everything.identities, cfg.data.holdout, cfg.data.split_seed
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err

    def folder_crops(identities: list[str]) -> Crops:
        folder = train_data.CropFolder(root, identities)
        return Crops(folder.identities, folder.labels, folder.load(progress=progress),
                     folder.relative_paths)

    return Split(train=folder_crops(train_ids),
                 test=folder_crops(test_ids) if test_ids else None)


def _split_pack(cfg: Config, progress: bool) -> Split:
    """Decode every image of ``data.root/train.rec`` and split its labels as identities."""
    if cfg.data.teacher is not None:
        raise ConfigError("data.teacher (vectors keyed by crop path) needs data.format folder")
    prefix = Path(cfg.data.root) / RECORDIO_PREFIX
    try:
        pack = RecordIODataset(prefix)
        labels = pack.labels()
        images = np.stack([image for image, _ in tqdm(pack, total=len(pack), desc="load pack",
                                                      disable=not progress)])
        names = np.asarray([str(label) for label in labels])
        train_ids, test_ids = train_data.split_identities(names, cfg.data.holdout,
                                                          cfg.data.split_seed)
    except (OSError, RecordIOError, ValueError) as err:
        raise ConfigError(f"data: {prefix}.rec/.idx: {err}") from err
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ConfigError(f"data: {prefix}.rec holds images of shape {images.shape[1:]}, "
                          "not square crops of one size")

    def pack_crops(identities: list[str]) -> Crops:
        keep = np.isin(names, identities)
        label_of = {name: label for label, name in enumerate(identities)}
        return Crops(identities, np.asarray([label_of[n] for n in names[keep]], dtype=np.int64),
                     images[keep], None)

    return Split(train=pack_crops(train_ids), test=pack_crops(test_ids) if test_ids else None)


def check_geometry(cfg: Config, backbone: nn.Module, crop_side: int) -> None:
    """Refuse crops made for another model: the geometry ``facegate prepare`` recorded
    (geometry.json) or, for folders from before it and for packs, the crop size, must be
    the backbone's."""
    expected = as_geometry(geometry_of(backbone))
    recorded = read_geometry_file(Path(cfg.data.root))
    if recorded is not None and recorded != expected:
        raise ConfigError(f"data: {cfg.data.root} holds {recorded} crops, {cfg.model.backbone} "
                          f"takes {expected}: prepare the photos with that geometry, "
                          f"{prepare_command(cfg, expected)}")
    if crop_side != expected.size:
        raise ConfigError(f"data: {cfg.data.root} holds {crop_side}x{crop_side} crops, "
                          f"{cfg.model.backbone} takes {expected}")
