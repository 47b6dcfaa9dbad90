"""A model bundle's manifest: what it must say and how it is checked, before any file is
trusted (``core.bundle`` reads, writes and loads bundles).

The manifest pins every file by sha256 and carries what a runtime must know to feed
the model (input size, colour order, normalisation), the geometry of its input crops
and the threshold to decide with. Every problem is a ``BundleError`` saying exactly
what is wrong.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from facegate.core.align import ARCFACE_112, Geometry
from facegate.core.error_model import ErrorModel, ErrorModelError
from facegate.core.errors import BundleError
from facegate.core.quality import QualityModel, QualityModelError

__all__ = [
    "DEFAULT_GEOMETRY",
    "DEFAULT_INPUT",
    "DEFAULT_OUTPUT",
    "EMBEDDER_FILENAME",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "check_onnx_graph",
    "is_number",
    "embedder_filename",
    "validate_manifest",
]

MANIFEST_NAME = "manifest.json"
EMBEDDER_FILENAME = "embedder.onnx"
SCHEMA_VERSION = 1
DEFAULT_INPUT: dict[str, Any] = {
    "name": "input",
    "size": [112, 112],
    "color": "RGB",
    "layout": "NCHW",
    "mean": 127.5,
    "std": 127.5,
}
DEFAULT_OUTPUT: dict[str, Any] = {"name": "embedding"}
OPTIONAL_SECTIONS = ("training", "evaluation", "parity")
# Optional sections that decide (core.error_model, core.quality), each parsed by its model.
DECISION_MODELS = {
    "error_model": (ErrorModel, ErrorModelError),
    "quality_model": (QualityModel, QualityModelError),
}
# What a manifest without a "geometry" section means (every bundle written before it existed).
DEFAULT_GEOMETRY = ARCFACE_112


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _nonempty_str(manifest: dict[str, Any], key: str, where: str = "manifest") -> str:
    value = manifest.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BundleError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _validate_normalisation(spec: dict[str, Any], key: str) -> None:
    value = spec.get(key)
    values: list[Any] = value if isinstance(value, list) else [value]
    if len(values) not in (1, 3) or not all(is_number(v) for v in values):
        raise BundleError(f"manifest: input.{key} must be a number or 3 numbers, got {value!r}")
    if key == "std" and not all(v > 0 for v in values):
        raise BundleError(f"manifest: input.std must be positive, got {value!r}")


def _validate_geometry(manifest: dict[str, Any]) -> Geometry:
    if "geometry" not in manifest:
        return DEFAULT_GEOMETRY
    try:
        return Geometry.from_dict(manifest["geometry"])
    except ValueError as exc:
        raise BundleError(f"manifest: 'geometry' {exc}") from exc


def _validate_input(spec: Any, geometry: Geometry) -> None:
    if not isinstance(spec, dict):
        raise BundleError(f"manifest: 'input' must be an object, got {spec!r}")
    _nonempty_str(spec, "name", "manifest input")
    if spec.get("size") != geometry.input_size:
        raise BundleError(
            f"manifest: input.size must be {geometry.input_size} (the crop size of geometry "
            f"{geometry}), got {spec.get('size')!r}"
        )
    if spec.get("color") not in ("RGB", "BGR"):
        raise BundleError(f"manifest: input.color must be 'RGB' or 'BGR', got {spec.get('color')!r}")
    if spec.get("layout") not in ("NCHW", "NHWC"):
        raise BundleError(
            f"manifest: input.layout must be 'NCHW' or 'NHWC', got {spec.get('layout')!r}"
        )
    _validate_normalisation(spec, "mean")
    _validate_normalisation(spec, "std")


def _validate_files(files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise BundleError("manifest: 'files' must be a non-empty object {filename: {sha256, role}}")
    embedders = []
    for filename, entry in files.items():
        if not filename or Path(filename).name != filename or filename in (".", ".."):
            raise BundleError(f"manifest: file name {filename!r} must be a plain name in the bundle")
        if not isinstance(entry, dict):
            raise BundleError(f"manifest: files[{filename!r}] must be an object, got {entry!r}")
        digest = entry.get("sha256")
        if not (
            isinstance(digest, str)
            and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
        ):
            raise BundleError(
                f"manifest: files[{filename!r}].sha256 must be 64 lowercase hex, got {digest!r}"
            )
        _nonempty_str(entry, "role", f"manifest files[{filename!r}]")
        if entry["role"] == "embedder":
            embedders.append(filename)
    if len(embedders) != 1:
        raise BundleError(
            f"manifest: exactly one file must have role 'embedder', found {len(embedders)}"
        )
    if not embedders[0].endswith(".onnx"):
        raise BundleError(f"manifest: the embedder file must be ONNX, got {embedders[0]!r}")


def validate_manifest(manifest: Any) -> None:
    """Check types and required keys of a manifest (not the files); raise ``BundleError``."""
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest: top level must be an object, got {type(manifest).__name__}")
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise BundleError(f"manifest: 'schema' must be {SCHEMA_VERSION}, got {schema!r}")
    _nonempty_str(manifest, "name")
    _nonempty_str(manifest, "version")
    size = manifest.get("embedding_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise BundleError(f"manifest: 'embedding_size' must be a positive integer, got {size!r}")
    _validate_input(manifest.get("input"), _validate_geometry(manifest))
    output = manifest.get("output")
    if not isinstance(output, dict):
        raise BundleError(f"manifest: 'output' must be an object, got {output!r}")
    _nonempty_str(output, "name", "manifest output")
    threshold: Any = manifest.get("threshold")
    if not is_number(threshold) or not -1.0 < threshold < 1.0:
        raise BundleError(f"manifest: 'threshold' must be a number in (-1, 1), got {threshold!r}")
    _nonempty_str(manifest, "threshold_source")
    if not isinstance(manifest.get("threshold_provenance"), str):
        raise BundleError(
            "manifest: 'threshold_provenance' must be a string saying how the threshold "
            f"was obtained, got {manifest.get('threshold_provenance')!r}"
        )
    _validate_files(manifest.get("files"))
    for section in OPTIONAL_SECTIONS:
        if section in manifest and not isinstance(manifest[section], dict):
            raise BundleError(f"manifest: '{section}' must be an object when present")
    for section, (model, error) in DECISION_MODELS.items():
        if section in manifest:
            try:
                model.from_manifest(manifest[section])
            except error as exc:
                raise BundleError(f"manifest: {exc}") from exc


def embedder_filename(manifest: dict[str, Any]) -> str:
    return next(n for n, e in manifest["files"].items() if e["role"] == "embedder")


def check_onnx_graph(onnx_path: Path, manifest: dict[str, Any]) -> None:
    """The graph must have the manifest's input/output names and a matching static output size."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends; report any as unreadable
        raise BundleError(f"{onnx_path.name}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    input_name = manifest["input"]["name"]
    if input_name not in inputs:
        raise BundleError(
            f"{onnx_path.name}: no graph input named {input_name!r} (inputs: {inputs})"
        )
    _check_input_dims(onnx_path, next(i for i in graph.input if i.name == input_name), manifest["input"])
    output_name = manifest["output"]["name"]
    outputs = {o.name: o for o in graph.output}
    if output_name not in outputs:
        raise BundleError(
            f"{onnx_path.name}: no graph output named {output_name!r} (outputs: {list(outputs)})"
        )
    dims = outputs[output_name].type.tensor_type.shape.dim
    if len(dims) != 2 and len(dims) != 0:
        raise BundleError(
            f"{onnx_path.name}: output {output_name!r} must be (N, D), has rank {len(dims)}"
        )
    if len(dims) == 2 and dims[1].HasField("dim_value"):
        if dims[1].dim_value != manifest["embedding_size"]:
            raise BundleError(
                f"{onnx_path.name}: output {output_name!r} has {dims[1].dim_value} dimensions "
                f"but the manifest says embedding_size {manifest['embedding_size']}"
            )


def _check_input_dims(onnx_path: Path, graph_input: Any, spec: dict[str, Any]) -> None:
    """A static (H, W) of a rank-4 graph input must be the manifest's input.size."""
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != 4:
        return
    axes = (2, 3) if spec["layout"] == "NCHW" else (1, 2)
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    height_width = [static[a] for a in axes]
    if None not in height_width and height_width != list(spec["size"]):
        raise BundleError(
            f"{onnx_path.name}: input {graph_input.name!r} is {height_width[0]}x{height_width[1]} "
            f"but the manifest says input.size {spec['size']}"
        )
