"""Model bundles: a folder with ``manifest.json``, ``embedder.onnx`` and optional engines.

The bundle is the unit export writes and the server loads. The manifest pins every
file by sha256 and carries what a runtime must know to feed the model (input
size, colour order, normalisation), the geometry of its input crops (an optional
``geometry`` section, e.g. ``{"method": "dlib_chip", "size": 150, "padding": 0.25}``;
absent means the ArcFace 112x112 template, what every bundle before it used) and the
threshold to decide with, so a server never runs a model whose files, crops or
preprocessing differ from what was evaluated. Every problem is a ``BundleError``
saying exactly what is wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facegate.core.align import ARCFACE_112, Geometry, as_geometry
from facegate.core.errors import BundleError

__all__ = [
    "DEFAULT_GEOMETRY",
    "DEFAULT_INPUT",
    "DEFAULT_OUTPUT",
    "EMBEDDER_FILENAME",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "Bundle",
    "add_file",
    "load_bundle",
    "sha256_file",
    "validate_manifest",
    "write_bundle",
]

log = logging.getLogger(__name__)

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
# What a manifest without a "geometry" section means (every bundle written before it existed).
DEFAULT_GEOMETRY = ARCFACE_112
# Keys write_bundle sets from its own arguments; `extra` may not override them.
_ARGUMENT_KEYS = frozenset(
    {
        "schema",
        "name",
        "version",
        "embedding_size",
        "threshold",
        "threshold_source",
        "threshold_provenance",
        "files",
    }
)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle; ``engines`` are the files with role "engine" (with their meta)."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    name: str
    version: str
    embedding_size: int
    threshold: float
    threshold_source: str
    onnx_path: Path
    engines: list[dict[str, Any]] = field(repr=False)

    @property
    def onnx_sha256(self) -> str:
        return self.manifest["files"][self.onnx_path.name]["sha256"]

    @property
    def model_id(self) -> str:
        """``name@version#<first 12 hex of the ONNX sha256>``: what galleries tie templates to."""
        return f"{self.name}@{self.version}#{self.onnx_sha256[:12]}"

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest["input"]

    @property
    def output_name(self) -> str:
        return self.manifest["output"]["name"]

    @property
    def threshold_provenance(self) -> str:
        return self.manifest["threshold_provenance"]

    @property
    def geometry(self) -> Geometry:
        """How this model's input crops are made (manifest ``geometry``; absent: ArcFace 112)."""
        return as_geometry(self.manifest.get("geometry"), DEFAULT_GEOMETRY)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _nonempty_str(manifest: dict[str, Any], key: str, where: str = "manifest") -> str:
    value = manifest.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BundleError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _validate_normalisation(spec: dict[str, Any], key: str) -> None:
    value = spec.get(key)
    values: list[Any] = value if isinstance(value, list) else [value]
    if len(values) not in (1, 3) or not all(_is_number(v) for v in values):
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
    if not _is_number(threshold) or not -1.0 < threshold < 1.0:
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


def _embedder_filename(manifest: dict[str, Any]) -> str:
    return next(n for n, e in manifest["files"].items() if e["role"] == "embedder")


def _check_onnx_graph(onnx_path: Path, manifest: dict[str, Any]) -> None:
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


def _read_manifest(root: Path) -> dict[str, Any]:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME} (not a model bundle)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    validate_manifest(manifest)
    return manifest


def _check_files(root: Path, manifest: dict[str, Any], verify: bool) -> None:
    for filename, entry in manifest["files"].items():
        path = root / filename
        if not path.is_file():
            raise BundleError(f"{root}: file {filename!r} listed in the manifest is missing")
        if verify:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"{root}: {filename!r} sha256 is {actual}, manifest says {entry['sha256']} "
                    "(file changed or corrupted)"
                )


def _to_bundle(root: Path, manifest: dict[str, Any]) -> Bundle:
    engines = [
        {"filename": name, "path": root / name, **entry}
        for name, entry in sorted(manifest["files"].items())
        if entry["role"] == "engine"
    ]
    return Bundle(
        path=root,
        manifest=manifest,
        name=manifest["name"],
        version=manifest["version"],
        embedding_size=manifest["embedding_size"],
        threshold=float(manifest["threshold"]),
        threshold_source=manifest["threshold_source"],
        onnx_path=root / _embedder_filename(manifest),
        engines=engines,
    )


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Load and check a bundle folder (or its manifest.json).

    Always checks the manifest schema and that every listed file exists; with
    ``verify`` also every file's sha256 and the ONNX graph's names and output size.
    """
    root = Path(path).resolve()
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder does not exist")
    manifest = _read_manifest(root)
    _check_files(root, manifest, verify)
    if verify:
        _check_onnx_graph(root / _embedder_filename(manifest), manifest)
    log.debug("loaded bundle %s from %s (verify=%s)", manifest["name"], root, verify)
    return _to_bundle(root, manifest)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Atomic: write a temp file in the same folder, fsync, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: the server may run as another user
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _place_file(root: Path, source: Path, filename: str) -> Path:
    """Copy ``source`` into the bundle as ``filename`` unless it already is that file."""
    target = root / filename
    if not source.is_file():
        raise BundleError(f"{source}: file to add to the bundle does not exist")
    if source.resolve() != target.resolve():
        tmp = target.with_name(f".{filename}.part")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return target


def write_bundle(
    path: str | os.PathLike[str],
    *,
    onnx_file: str | os.PathLike[str],
    name: str,
    version: str,
    embedding_size: int,
    threshold: float,
    threshold_source: str,
    threshold_provenance: str,
    extra: dict[str, Any] | None = None,
    geometry: Geometry | dict[str, Any] | None = None,
) -> Bundle:
    """Create (or overwrite) a bundle with a fresh manifest holding just the embedder.

    ``onnx_file`` is copied in as ``embedder.onnx`` unless it already lies in the
    bundle folder (then it keeps its name). ``geometry`` (a ``Geometry`` or its dict
    form; or ``extra["geometry"]``, not both; default the ArcFace 112 template) is
    written to the manifest, and the default ``input`` gets its crop size. ``extra``
    adds sections such as ``training``, ``evaluation``, ``parity``, or overrides
    ``input``/``output`` (an ``input`` must state the geometry's size).
    Engines are registered afterwards with ``add_file``. Nothing is written
    if the manifest or the ONNX graph does not check out.
    """
    extra = dict(extra or {})
    clashing = sorted(_ARGUMENT_KEYS & extra.keys())
    if clashing:
        raise BundleError(f"write_bundle: extra may not set {clashing}; pass them as arguments")
    if geometry is not None and "geometry" in extra:
        raise BundleError("write_bundle: pass the geometry either as argument or in extra, not both")
    try:
        chosen = as_geometry(extra.pop("geometry", geometry), DEFAULT_GEOMETRY)
    except ValueError as exc:
        raise BundleError(f"write_bundle: geometry {exc}") from exc
    root = Path(path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    source = Path(onnx_file).resolve()
    filename = source.name if source.parent == root else EMBEDDER_FILENAME
    manifest: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "embedding_size": embedding_size,
        "input": {**copy.deepcopy(DEFAULT_INPUT), "size": chosen.input_size},
        "geometry": chosen.to_dict(),
        "output": copy.deepcopy(DEFAULT_OUTPUT),
        "threshold": float(threshold) if _is_number(threshold) else threshold,
        "threshold_source": threshold_source,
        "threshold_provenance": threshold_provenance,
        "files": {filename: {"sha256": "0" * 64, "role": "embedder"}},
        **extra,
    }
    validate_manifest(manifest)
    if not source.is_file():
        raise BundleError(f"{source}: ONNX file does not exist")
    _check_onnx_graph(source, manifest)
    target = _place_file(root, source, filename)
    manifest["files"][filename]["sha256"] = sha256_file(target)
    _write_manifest(root, manifest)
    log.info("wrote bundle %s@%s to %s", name, version, root)
    return _to_bundle(root, manifest)


def add_file(bundle_path: str | os.PathLike[str], filename: str | os.PathLike[str], **meta: Any) -> Bundle:
    """Register a file (by default an engine) in the manifest with its sha256.

    ``filename`` is a name inside the bundle, or a path to a file elsewhere that is
    copied in under its own name. ``meta`` (e.g. ``role="engine"``, ``gpu``,
    ``tensorrt``, ``precision``, ``max_batch``) is stored with it; registering a
    name again replaces its entry. The embedder itself cannot be replaced here.
    """
    root = Path(bundle_path).resolve()
    manifest = _read_manifest(root)
    candidate = Path(filename)
    name = candidate.name
    source = candidate if candidate.is_absolute() or len(candidate.parts) > 1 else root / name
    if manifest["files"].get(name, {}).get("role") == "embedder":
        raise BundleError(f"add_file: {name!r} is the bundle's embedder; use write_bundle")
    meta.setdefault("role", "engine")
    if "sha256" in meta:
        raise BundleError("add_file: sha256 is computed, not passed")
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise BundleError(f"add_file: meta for {name!r} is not JSON-serialisable ({exc})") from exc
    target = _place_file(root, source, name)
    manifest["files"][name] = {"sha256": sha256_file(target), **meta}
    validate_manifest(manifest)
    _write_manifest(root, manifest)
    log.info("registered %s (%s) in bundle %s", name, meta["role"], root)
    return _to_bundle(root, manifest)
