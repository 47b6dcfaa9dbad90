"""Pure-numpy reader for dlib's DNN model files (a ``net_type`` written by ``dlib::serialize``).

It lets facegate rebuild dlib's networks (the face recognition ResNet, later the MMOD
detector) in PyTorch/ONNX without importing dlib. The format, from dlib's
``serialize.h``, ``cuda/tensor.h`` and ``dnn/{core,layers,input,loss}.h``:

* int: a control byte (0x80 = negative, low 4 bits = byte count 1..8), then |value|
  little-endian; bool: ASCII ``'1'``/``'0'``; float: int mantissa, int exponent
  (value = mantissa * 2**exponent); string: int length, bytes.
* tensor: int version 2, ints (num_samples, k, nr, nc), raw little-endian float32 in C
  order; alias tensor: int version 1 and the four ints only.
* The file is the network written outside-in: the loss layer (int 1, its name and
  fields), then one header int per wrapper, outermost first (2 = a computational
  ``add_layer``, 1 = a tag or skip layer, 2 or 3 = the innermost ``add_layer``), then
  the input layer, then each computational layer's details plus a trailer, input side
  first.

Tag and skip layers store no id, so which tag an ``add_prev`` or ``skip`` refers to is
not in the file: each layer records how many tag/skip wrappers sit between it and its
input-side neighbour (``wrappers``) and the code that knows the network (the backbone)
rebuilds the wiring. The reader is table-driven: a layer kind it has no table for is a
clear error, and supporting one is a table entry.

Model files read with it: ``dlib_face_recognition_resnet_model_v1.dat`` and
``mmod_human_face_detector.dat`` from dlib-models (public domain / CC0 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError

__all__ = ["DlibFormatError", "DlibLayer", "DlibNet", "read_dlib_dnn"]


class DlibFormatError(FacegateError):
    """A file that is not a (complete) dlib DNN model this reader understands."""

    code = "dlib_format_invalid"
    status = 500


@dataclass(frozen=True)
class DlibLayer:
    """One computational layer: its kind ("con", "affine", ...) and on-disk name ("con_4").

    ``attrs`` holds the scalar fields (alias tensors as their 4-tuple shape),
    ``tensors`` the float32 arrays in dlib's (num_samples, k, nr, nc) shape;
    ``wrappers`` counts the tag/skip layers between this layer and its input side.
    """

    kind: str
    name: str
    attrs: dict[str, Any]
    tensors: dict[str, np.ndarray]
    wrappers: int

    @property
    def params(self) -> np.ndarray:
        """The learned parameters (an empty array for layers without any)."""
        return self.tensors.get("params", np.zeros((0, 0, 0, 0), np.float32))


@dataclass(frozen=True)
class DlibNet:
    """A whole file: loss header, input layer and the layers from the input side outwards."""

    loss: str
    loss_attrs: dict[str, Any]
    input: str
    input_attrs: dict[str, Any]
    layers: tuple[DlibLayer, ...]
    top_wrappers: int  # tag/skip layers between the loss and the outermost layer

    @property
    def mean_rgb(self) -> tuple[float, float, float]:
        """Per-channel mean the input layer subtracts (dlib then divides by 256)."""
        a = self.input_attrs
        return (a["avg_red"], a["avg_green"], a["avg_blue"])

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(rows, cols) of a sized input layer; None where any size is accepted."""
        a = self.input_attrs
        return (a["nr"], a["nc"]) if "nr" in a else None


Fields = tuple[tuple[str, str], ...]

_MULTS: Fields = (
    ("learning_rate_mult", "float"),
    ("weight_decay_mult", "float"),
    ("bias_learning_rate_mult", "float"),
    ("bias_weight_decay_mult", "float"),
)
_WINDOW: Fields = tuple(
    (name, "int") for name in ("nr", "nc", "stride_y", "stride_x", "pad_y", "pad_x")
)
_CON: Fields = (
    ("params", "tensor"), ("num_filters", "int"), *_WINDOW,
    ("filters", "alias"), ("biases", "alias"), *_MULTS,
)
_AFFINE: Fields = (("params", "tensor"), ("gamma", "alias"), ("beta", "alias"), ("mode", "int"))
_FC: Fields = (
    ("num_outputs", "int"), ("num_inputs", "int"), ("params", "tensor"),
    ("weights", "alias"), ("biases", "alias"), ("bias_mode", "int"), *_MULTS,
)
_BN: Fields = (
    ("params", "tensor"), ("gamma", "alias"), ("beta", "alias"),
    ("means", "tensor"), ("invstds", "tensor"),
    ("running_means", "tensor"), ("running_variances", "tensor"),
    ("num_updates", "int"), ("running_stats_window_size", "int"), *_MULTS, ("eps", "float"),
)
_MEANS: Fields = (("avg_red", "float"), ("avg_green", "float"), ("avg_blue", "float"))

# on-disk name -> (kind, fields), one entry per version dlib writes or has written.
LAYERS: dict[str, tuple[str, Fields]] = {
    "con_4": ("con", _CON),
    "con_5": ("con", (*_CON, ("use_bias", "bool"))),
    "con_6": ("con", (*_CON, ("use_bias", "bool"), ("use_relu", "bool"))),
    "affine_": ("affine", _AFFINE),
    "affine_2": ("affine", (*_AFFINE, ("disabled", "bool"))),
    "bn_con2": ("bn_con", _BN),
    "bn_fc2": ("bn_fc", _BN),
    "fc_2": ("fc", _FC),
    "fc_3": ("fc", (*_FC, ("use_bias", "bool"))),
    "relu_": ("relu", ()),
    "add_prev_": ("add_prev", ()),
    "max_pool_2": ("max_pool", _WINDOW),
    "avg_pool_2": ("avg_pool", _WINDOW),
}
INPUTS: dict[str, Fields] = {
    "input_rgb_image": _MEANS,
    "input_rgb_image_sized": (*_MEANS, ("nr", "int"), ("nc", "int")),
    "input_rgb_image_pyramid": _MEANS,
    "input_rgb_image_pyramid2": (
        *_MEANS, ("pyramid_padding", "int"), ("pyramid_outer_padding", "int"),
    ),
}
LOSSES: dict[str, Fields] = {
    "loss_metric_": (),
    "loss_metric_2": (("margin", "float"), ("dist_thresh", "float")),
    # mmod_options version 1: a single detector window.
    "loss_mmod_": (
        ("options_version", "version1"),
        ("detector_width", "int"), ("detector_height", "int"),
        ("loss_per_false_alarm", "float"), ("loss_per_missed_target", "float"),
        ("truth_match_iou_threshold", "float"),
        ("nms_iou_thresh", "float"), ("nms_percent_covered_thresh", "float"),
        ("ignore_iou_thresh", "float"), ("ignore_percent_covered_thresh", "float"),
    ),
}
_FLOAT_SPECIALS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class _Stream:
    """A cursor over the file's bytes whose every read names what it expected and where."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def fail(self, what: str, problem: str, at: int | None = None) -> DlibFormatError:
        at = self.pos if at is None else at
        return DlibFormatError(
            f"{self.source}: not a dlib DNN model this reader understands: "
            f"expected {what} at byte {at} (of {len(self.data)}): {problem}"
        )

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            raise self.fail(what, f"needs {n} bytes, only {left} left (truncated?)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int_(self, what: str) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= 8:
            raise self.fail(what, f"byte 0x{control:02x} is not a dlib int control byte", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def count(self, what: str) -> int:
        start, value = self.pos, self.int_(what)
        if value < 0:
            raise self.fail(what, f"found {value}, a size cannot be negative", start)
        return value

    def bool_(self, what: str) -> bool:
        char = self.take(1, what)
        if char not in (b"0", b"1"):
            raise self.fail(what, f"found byte 0x{char[0]:02x}, not '0' or '1'", self.pos - 1)
        return char == b"1"

    def float_(self, what: str) -> float:
        mantissa = self.int_(f"{what} (mantissa)")
        exponent = self.int_(f"{what} (exponent)")
        if exponent in _FLOAT_SPECIALS:
            return _FLOAT_SPECIALS[exponent]
        return math.ldexp(mantissa, exponent)

    def string(self, what: str) -> str:
        start, length = self.pos, self.int_(f"{what} (length)")
        if not 0 <= length <= len(self.data) - self.pos:
            raise self.fail(what, f"string length {length} is impossible here", start)
        return self.take(length, what).decode("latin-1")

    def version(self, what: str, expected: tuple[int, ...]) -> int:
        start, value = self.pos, self.int_(what)
        if value not in expected:
            raise self.fail(what, f"found {value}, expected one of {expected}", start)
        return value

    def tensor(self, what: str) -> np.ndarray:
        self.version(f"{what} tensor version", (2,))
        shape = tuple(self.count(f"{what} tensor dimension") for _ in range(4))
        n = math.prod(shape)
        raw = self.take(4 * n, f"{what}: {n} float32 values of shape {shape}")
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, ...]:
        self.version(f"{what} alias tensor version", (1,))
        return tuple(self.count(f"{what} alias tensor dimension") for _ in range(4))

    def peek_string(self) -> str | None:
        """The string starting here, or None where the bytes cannot be one; the cursor stays."""
        start = self.pos
        try:
            return self.string("")
        except DlibFormatError:
            return None
        finally:
            self.pos = start


def _fields(s: _Stream, name: str, fields: Fields) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    attrs: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    for field, kind in fields:
        what = f"{name}.{field}"
        if kind == "tensor":
            tensors[field] = s.tensor(what)
        elif kind == "alias":
            attrs[field] = s.alias(what)
        elif kind == "version1":
            attrs[field] = s.version(what, (1,))
        else:
            attrs[field] = getattr(s, f"{kind}_")(what)
    return attrs, tensors


def _named(s: _Stream, role: str, table: dict[str, Any]) -> str:
    start, name = s.pos, s.string(f"{role} name")
    if name not in table:
        shown = name if name.isprintable() and len(name) <= 40 else f"{name[:40]!r}"
        raise s.fail(f"{role} name", f"unknown {role} {shown!r} (known: {', '.join(table)})", start)
    return name


def _header(s: _Stream) -> list[int]:
    """The wrapper versions, outermost first, up to the input layer's name."""
    versions: list[int] = []
    while s.peek_string() not in INPUTS:
        what = "layer header (2 = layer, 1 = tag/skip) or input layer"
        versions.append(s.version(what, (1, 2, 3)))
    if not versions or versions[-1] == 1:
        raise s.fail("input layer", "the innermost wrapper must be a layer (version 2 or 3)")
    if 3 in versions[:-1]:
        raise s.fail("input layer", "version 3 is only valid for the innermost layer")
    return versions


def _layer(s: _Stream, wrappers: int, innermost_version: int | None) -> DlibLayer:
    name = _named(s, "layer", LAYERS)
    kind, fields = LAYERS[name]
    attrs, tensors = _fields(s, name, fields)
    for flag in ("setup_called", "gradient_input_is_stale", "output_and_gradient_disabled"):
        s.bool_(f"{name} trailer {flag}")
    s.tensor(f"{name} x_grad")
    s.tensor(f"{name} cached_output")
    if innermost_version is None:
        s.tensor(f"{name} params_grad")
    else:
        s.tensor(f"{name} grad_final")
        if innermost_version == 3:
            s.int_(f"{name} sample_expansion_factor")
    return DlibLayer(kind, name, attrs, tensors, wrappers)


def _parse(s: _Stream) -> DlibNet:
    s.version("loss layer format version", (1,))
    loss = _named(s, "loss layer", LOSSES)
    loss_attrs, _ = _fields(s, loss, LOSSES[loss])
    versions = _header(s)
    inp = _named(s, "input layer", INPUTS)
    input_attrs, _ = _fields(s, inp, INPUTS[inp])
    # wrappers[i] = tag/skip count just inside layer i (outermost first); the innermost has none.
    wrappers: list[int] = []
    top = 0
    for v in versions[:-1]:
        if v == 2:
            wrappers.append(0)
        elif wrappers:
            wrappers[-1] += 1
        else:
            top += 1
    wrappers.append(0)
    inside_out = wrappers[::-1]
    layers = [_layer(s, inside_out[0], versions[-1])]
    layers += [_layer(s, w, None) for w in inside_out[1:]]
    if s.pos != len(s.data):
        raise s.fail("end of file", f"{len(s.data) - s.pos} trailing bytes after the last layer")
    return DlibNet(loss, loss_attrs, inp, input_attrs, tuple(layers), top)


def read_dlib_dnn(path: str | Path) -> DlibNet:
    """Read a dlib DNN model file, consuming every byte; ``DlibFormatError`` if it is not one."""
    path = Path(path)
    return _parse(_Stream(path.read_bytes(), str(path)))
