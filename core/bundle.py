"""Model bundles: a folder with ``manifest.json``, ``embedder.onnx`` and optional engines.

The bundle is the unit export writes and the server loads. The manifest pins every
file by sha256 and carries what a runtime must know to feed the model (input
size, colour order, normalisation), the geometry of its input crops (an optional
``geometry`` section, e.g. ``{"method": "dlib_chip", "size": 150, "padding": 0.25}``;
absent means the ArcFace 112x112 template, what every bundle before it used) and the
threshold to decide with, so a server never runs a model whose files, crops or
preprocessing differ from what was evaluated (the rules: ``core.manifest``). Every
writer here seals the manifest's decision settings (``core.seal``) and ``model_id``
derives from that seal, so an edited threshold is refused and a re-sealed one is another
model. Every problem is a ``BundleError`` saying exactly what is wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from facegate.core.align import Geometry, as_geometry
from facegate.core.error_model import ErrorModel
from facegate.core.errors import BundleError
from facegate.core.manifest import (
    DEFAULT_GEOMETRY,
    DEFAULT_INPUT,
    DEFAULT_OUTPUT,
    EMBEDDER_FILENAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    check_onnx_graph,
    embedder_filename,
    is_number,
    validate_manifest,
)
from facegate.core.quality import QualityModel
from facegate.core.seal import (
    SEAL_KEY,
    SIGNATURE_KEY,
    BundleSealError,
    check_seal,
    make_seal,
    seal_digest,
)

__all__ = [
    "Bundle",
    "add_file",
    "load_bundle",
    "seal_bundle",
    "sha256_file",
    "sign_bundle",
    "write_bundle",
]

log = logging.getLogger(__name__)

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

    @cached_property
    def digest(self) -> str:
        """The seal digest of the decision settings as loaded (``core.seal``); computed once
        (model_id is read per request), the manifest of a Bundle is not edited in place."""
        return seal_digest(self.manifest)

    @property
    def sealed(self) -> bool:
        """Whether the manifest carries a seal (``load_bundle`` checked that it matches)."""
        return SEAL_KEY in self.manifest

    @property
    def signature(self) -> dict[str, Any] | None:
        return self.manifest.get(SIGNATURE_KEY)

    @property
    def model_id(self) -> str:
        """``name@version#<first 12 hex of the seal digest>``: what galleries tie templates
        to; other decision settings (threshold, geometry, files...) give another id."""
        return f"{self.name}@{self.version}#{self.digest[:12]}"

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
    def error_model(self) -> ErrorModel | None:
        """What a score means for a pair, an identity and a gallery (``core.error_model``);
        None for a bundle calibrated before error models existed."""
        section = self.manifest.get("error_model")
        return None if section is None else ErrorModel.from_manifest(section)

    @property
    def quality_model(self) -> QualityModel | None:
        """How likely a face photo is to be falsely rejected (``core.quality``); None for a
        bundle calibrated before quality models existed."""
        section = self.manifest.get("quality_model")
        return None if section is None else QualityModel.from_manifest(section)

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
        onnx_path=root / embedder_filename(manifest),
        engines=engines,
    )


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Load and check a bundle folder (or its manifest.json).

    Always checks the manifest schema and that every listed file exists; with
    ``verify`` also every file's sha256, the seal (``BundleSealError`` names the changed
    fields; a bundle without a seal loads, ``Bundle.sealed`` is False: callers decide)
    and the ONNX graph's names and output size.
    """
    root = Path(path).resolve()
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder does not exist")
    manifest = _read_manifest(root)
    _check_files(root, manifest, verify)
    if verify:
        check_seal(manifest, str(root / MANIFEST_NAME))
        check_onnx_graph(root / embedder_filename(manifest), manifest)
    log.debug("loaded bundle %s from %s (verify=%s)", manifest["name"], root, verify)
    return _to_bundle(root, manifest)


def _write_manifest(
    root: Path, manifest: dict[str, Any], signature: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Seal ``manifest`` and write it atomically (temp file in the same folder, fsync,
    os.replace); returns what was written. An old signature is over an old seal, so it
    is dropped unless ``signature`` (made for this seal) is given."""
    if SIGNATURE_KEY in manifest and signature is None:
        log.warning("%s: signature dropped by the rewrite; sign the bundle again", root)
    manifest = {k: v for k, v in manifest.items() if k not in (SEAL_KEY, SIGNATURE_KEY)}
    manifest[SEAL_KEY] = make_seal(manifest)
    if signature is not None:
        manifest[SIGNATURE_KEY] = signature
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
    return manifest


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
    ``input``/``output`` (an ``input`` must state the geometry's size); a ``seal`` or
    ``signature`` in it (copied from another manifest) is replaced by the new seal.
    Engines are registered afterwards with ``add_file``. Nothing is written
    if the manifest or the ONNX graph does not check out.
    """
    extra = {k: v for k, v in (extra or {}).items() if k not in (SEAL_KEY, SIGNATURE_KEY)}
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
        "threshold": float(threshold) if is_number(threshold) else threshold,
        "threshold_source": threshold_source,
        "threshold_provenance": threshold_provenance,
        "files": {filename: {"sha256": "0" * 64, "role": "embedder"}},
        **extra,
    }
    validate_manifest(manifest)
    if not source.is_file():
        raise BundleError(f"{source}: ONNX file does not exist")
    check_onnx_graph(source, manifest)
    target = _place_file(root, source, filename)
    manifest["files"][filename]["sha256"] = sha256_file(target)
    manifest = _write_manifest(root, manifest)
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
    check_seal(manifest, str(root / MANIFEST_NAME))  # never seal someone's edit in passing
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
    manifest = _write_manifest(root, manifest)
    log.info("registered %s (%s) in bundle %s", name, meta["role"], root)
    return _to_bundle(root, manifest)


def seal_bundle(bundle_path: str | os.PathLike[str]) -> tuple[Bundle, list[str]]:
    """Seal a bundle's current decision settings, edits included: ``facegate bundle seal``,
    the deliberate way to make an edited or unsealed bundle a (new) model. Files are
    verified first. Returns the bundle and the fields that differ from the old seal (all
    of them for a bundle that had none)."""
    root = Path(bundle_path).resolve()
    manifest = _read_manifest(root)
    _check_files(root, manifest, verify=True)
    check_onnx_graph(root / embedder_filename(manifest), manifest)
    old = manifest.get(SEAL_KEY)
    old_fields = old.get("fields") if isinstance(old, dict) else None
    new_fields = make_seal(manifest)["fields"]
    changed = [n for n, d in new_fields.items()
               if not isinstance(old_fields, dict) or old_fields.get(n) != d]
    manifest = _write_manifest(root, manifest)
    return _to_bundle(root, manifest), changed


def sign_bundle(bundle_path: str | os.PathLike[str], private_key: str | os.PathLike[str]) -> Bundle:
    """Add an Ed25519 signature over the (checked) seal digest of a sealed bundle."""
    from facegate.core.signing import load_private_key, sign_digest

    bundle = load_bundle(bundle_path)
    if not bundle.sealed:
        raise BundleSealError(
            f"{bundle.path}: not sealed; seal it first (`facegate bundle seal`) or rewrite it"
        )
    signature = sign_digest(load_private_key(Path(private_key)), bundle.digest)
    manifest = _write_manifest(bundle.path, bundle.manifest, signature=signature)
    return _to_bundle(bundle.path, manifest)
