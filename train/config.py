"""Training configuration: YAML on disk, nested dataclasses in memory.

A run is described by one YAML file (see ``configs/``) plus optional
``--set section.key=value`` overrides, so every comparison recipe is plain data
that is stored next to its checkpoint. Unknown keys and out-of-range values are
rejected at load time, not halfway through a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from facegate.core.errors import FacegateError


class ConfigError(FacegateError):
    """A training config file or override is malformed or out of range."""

    code = "config_invalid"
    status = 400


@dataclass
class DataConfig:
    root: str = "data/celeba-crops"  # prepared crops folder (`facegate prepare`), or a pack's
    format: str = "folder"  # folder (identity sub-folders of crops) | recordio (root/train.rec)
    holdout: int = 0  # identities held out for validation (0 = train on all)
    split_seed: int = 0
    teacher: str | None = None  # .npz of teacher embeddings keyed by crop path


@dataclass
class ModelConfig:
    backbone: str = "mobilefacenet"
    width: float = 0.5
    embedding_size: int = 128
    # Start from pretrained weights: "dlib" (the port of dlib's ResNet, backbone dlib_resnet)
    # or a training checkpoint .pt of the same backbone. None trains from scratch.
    init: str | None = None


@dataclass
class USSConfig:
    enabled: bool = False
    s: float = 64.0
    m: float = 0.1
    start_epoch: int = 1  # UniTSFace: epoch 0 fills the memory with sample-to-class alone
    weight: float = 1.0
    variant: str = "uss"  # a key of train.losses.SAMPLE_TO_SAMPLE: uss | s2s_softmax | s2s_bce
    # USS negative side (variant "uss"): "sum" over the other classes (the paper) or
    # "mean" over them (verification form), times negative_weight (lambda; see USSLoss).
    negatives: str = "sum"
    negative_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.negatives not in ("sum", "mean"):
            raise ConfigError(f"loss.uss.negatives must be sum or mean, got {self.negatives!r}")
        if not self.negative_weight > 0:
            raise ConfigError(f"loss.uss.negative_weight must be > 0, got {self.negative_weight}")


@dataclass
class DiscFaceConfig:
    enabled: bool = False
    weight: float = 0.2
    clip: float = 0.05


@dataclass
class TCMConfig:
    enabled: bool = False
    pos_margin: float = 0.6
    neg_margin: float = 0.3
    pos_weight: float = 1.0
    neg_weight: float = 1.0


@dataclass
class DistillConfig:
    enabled: bool = False
    weight: float = 1.0  # relational term: pairwise cosines match the teacher's
    direct: float = 0.0  # 1 - cos(student, teacher) per sample; needs equal dimensions


@dataclass
class LossConfig:
    head: str = "cosface"  # a key of train.losses.HEADS: cosface | arcface | softmax
    head_weight: float = 1.0  # multiplier of the sample-to-class loss (< 1 when distilling)
    s: float = 64.0
    margin: float = 0.4
    uss: USSConfig = field(default_factory=USSConfig)
    discface: DiscFaceConfig = field(default_factory=DiscFaceConfig)
    tcm: TCMConfig = field(default_factory=TCMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # poly | step | cosine
    milestones: list[int] = field(default_factory=list)  # epochs, for "step" (x0.1 each)
    # Learning-rate multipliers by parameter-name prefix (longest prefix wins), e.g.
    # {"backbone.": 0.1, "backbone.fc": 1.0}; 0 freezes those parameters.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 10
    p: int = 16  # identities per batch
    k: int = 4  # samples per identity
    amp: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | on (GPU required) | off
    log_every: int = 10
    eval_every: int = 1


@dataclass
class AugmentConfig:
    flip: bool = True  # random horizontal flip, p = 0.5
    min_scale: float = 0.85  # random resized crop of >= this area: scale + shift (1 = off)
    color: float = 0.0  # brightness/contrast/saturation jitter amplitude (0 = off)


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.format": ("folder", "recordio"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("poly", "step", "cosine"),
    "train.amp": ("auto", "on", "off"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values by key; the loss names are the registry's (``train.losses``), imported
    here rather than at module level so that config readers without torch stay without it."""
    from facegate.train.losses import HEADS, SAMPLE_TO_SAMPLE

    return {"loss.head": tuple(HEADS), "loss.uss.variant": tuple(SAMPLE_TO_SAMPLE), **_CHOICES}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + u for u in unknown)}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if key == "train.amp" and isinstance(value, bool):  # YAML 1.1 reads bare on/off as booleans
        return "on" if value else "off"
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Reject values the trainer cannot run with."""
    flat = _flatten(cfg.to_dict())
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {flat[key]!r}")
    positive = ("model.embedding_size", "model.width", "loss.s", "optim.lr", "train.epochs",
                "train.p", "train.k", "train.log_every", "train.eval_every")
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]}")
    non_negative = ("data.holdout", "loss.margin", "optim.weight_decay", "optim.warmup_epochs",
                    "loss.uss.start_epoch", "augment.color")
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    if cfg.train.p < 2:
        raise ConfigError("train.p must be >= 2 (a batch needs negative pairs)")
    if cfg.loss.distill.enabled and not cfg.data.teacher:
        raise ConfigError("loss.distill.enabled needs data.teacher (an .npz of teacher embeddings)")
    for prefix, mult in cfg.optim.lr_mult.items():
        if mult < 0:
            raise ConfigError(f"optim.lr_mult.{prefix} must be >= 0, got {mult}")
    if cfg.model.init is not None and cfg.model.init != "dlib" and not cfg.model.init.endswith(".pt"):
        raise ConfigError(f"model.init must be 'dlib' or a checkpoint .pt, got {cfg.model.init!r}")
    if cfg.model.init == "dlib" and cfg.model.backbone != "dlib_resnet":
        raise ConfigError("model.init 'dlib' needs model.backbone dlib_resnet")
    if not 0 < cfg.augment.min_scale <= 1:
        raise ConfigError(f"augment.min_scale must be in (0, 1], got {cfg.augment.min_scale}")
    if cfg.loss.tcm.enabled and cfg.train.k < 2:
        raise ConfigError("loss.tcm needs train.k >= 2 so a batch holds positive pairs")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
