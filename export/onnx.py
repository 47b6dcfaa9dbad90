"""Checkpoint -> ONNX model bundle, checked for parity against PyTorch on real faces.

The bundle is what the server loads, so everything a reader needs to trust it goes
in its manifest: the threshold and where it came from, the training recipe, the
evaluation figures of the run, how the ONNX was produced, and the measured parity.
torch is imported here only; nothing on the serving path imports this module.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from facegate.core.bundle import Bundle, sha256_file, write_bundle
from facegate.core.errors import BundleError
from facegate.core.preprocess import model_input
from facegate.export.parity import ParityError, parity_report
from facegate.train.backbones import geometry_of, input_spec_of
from facegate.train.checkpoint import PRETRAINED_DLIB, build_backbone, load_checkpoint
from facegate.train.embed import raw_embeddings

MIN_OPSET = 17
FP32_MIN_COSINE = 0.9999
EXPORTER = "torch.onnx.export(dynamo=False): TorchScript exporter (the dynamo one needs onnxscript)"


def onnx_embed(onnx_path: Path, crops: np.ndarray, input_spec: dict[str, Any]) -> np.ndarray:
    """Raw embeddings from ONNX Runtime on CPU (the reference runtime of a bundle)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"input": model_input(np.asarray(crops), input_spec)})[0]


def export_onnx(model: torch.nn.Module, path: Path, *, opset: int = MIN_OPSET) -> Path:
    """Write ``model`` as ONNX: input ``input`` (N, 3, S, S) at the backbone's input size,
    output ``embedding``, dynamic N."""
    if opset < MIN_OPSET:
        raise BundleError(f"opset {opset} < {MIN_OPSET}: the runtimes expect opset >= {MIN_OPSET}")
    height, width = input_spec_of(model)["size"]
    dummy = torch.zeros(2, 3, height, width)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_legacy(model, dummy, path, opset)
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


def _export_legacy(model: torch.nn.Module, dummy: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def simplify_onnx(src: Path, dst: Path) -> bool:
    """Simplify with onnxslim when it is installed; False when it is not."""
    try:
        import onnxslim
    except ImportError:
        return False
    slim = onnxslim.slim(onnx.load(str(src)))
    onnx.save(slim, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return True


def threshold_from(
    checkpoint: dict[str, Any], checkpoint_path: Path, override: float | None
) -> tuple[float, str, str]:
    """(threshold, source, provenance): the checkpoint's (USS t or calibrated) unless overridden."""
    learned = checkpoint.get("threshold")
    learned_source = checkpoint.get("threshold_source") or "checkpoint"
    where = (
        f"checkpoint {Path(checkpoint_path).name} "
        f"(epoch {checkpoint.get('epoch')}, step {checkpoint.get('step')})"
    )
    if override is not None:
        before = "none" if learned is None else f"{float(learned):.6f} ({learned_source})"
        return float(override), "operator", f"set at export by the operator; {where} had {before}"
    if learned is None:
        raise BundleError(
            f"checkpoint {checkpoint_path} has no threshold (not USS-trained nor calibrated): "
            "pass --threshold"
        )
    provenance = checkpoint.get("threshold_provenance")
    detail = f": {provenance}" if isinstance(provenance, str) and provenance else ""
    return float(learned), str(learned_source), f"{learned_source} threshold from {where}{detail}"


def run_evaluation(run_dir: Path) -> dict[str, Any]:
    """Evaluation figures the trainer left beside the checkpoint (summary.json, metrics*.json)."""
    figures: dict[str, Any] = {}
    for path in sorted(run_dir.glob("summary.json")) + sorted(run_dir.glob("metrics*.json")):
        try:
            figures[path.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return figures


def export_bundle(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    parity_crops: np.ndarray,
    name: str | None = None,
    version: str | None = None,
    opset: int = MIN_OPSET,
    simplify: bool = False,
    threshold: float | None = None,
    min_cosine: float = FP32_MIN_COSINE,
) -> Bundle:
    """Export a checkpoint into a bundle folder; raises ``ParityError`` if ONNX drifts from torch.

    ``parity_crops`` are real crops (N, S, S, 3) uint8 made with the backbone's geometry
    (``geometry_of(model)``, also written to the manifest). With ``simplify`` the
    onnxslim-simplified graph replaces the plain one only when it also passes parity.
    """
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_backbone(checkpoint)
    value, source, provenance = threshold_from(checkpoint, checkpoint_path, threshold)
    reference = raw_embeddings(model, parity_crops)

    with tempfile.TemporaryDirectory(prefix="facegate-export-") as tmp:
        plain = export_onnx(model, Path(tmp) / "plain.onnx", opset=opset)
        spec = input_spec_of(model)
        parity = parity_report(reference, onnx_embed(plain, parity_crops, spec),
                               min_cosine=min_cosine)
        if not parity["passed"]:
            raise ParityError(
                f"ONNX vs PyTorch min cosine {parity['min_cosine']:.6f} < {min_cosine} "
                f"over {parity['crops']} crops"
            )
        chosen = plain
        simplification: dict[str, Any] = {"requested": simplify, "applied": False}
        if simplify:
            slim = Path(tmp) / "slim.onnx"
            if not simplify_onnx(plain, slim):
                simplification["reason"] = "onnxslim is not installed"
            else:
                slim_parity = parity_report(
                    reference, onnx_embed(slim, parity_crops, spec), min_cosine=min_cosine
                )
                simplification.update(tool="onnxslim", parity=slim_parity)
                if slim_parity["passed"]:
                    chosen, parity = slim, slim_parity
                    simplification["applied"] = True
                else:
                    simplification["reason"] = "simplified graph failed parity; kept the plain one"

        onnx_model = onnx.load(str(chosen))
        extra = {
            "input": spec,
            "geometry": geometry_of(model),
            "training": {
                "backbone": checkpoint["backbone"],
                "config": checkpoint.get("config"),
                "epoch": checkpoint.get("epoch"),
                "step": checkpoint.get("step"),
                "checkpoint": checkpoint.get("source", checkpoint_path.name),
                "checkpoint_sha256": checkpoint.get("source_sha256") or sha256_file(checkpoint_path),
            },
            "evaluation": {} if str(checkpoint_path) == PRETRAINED_DLIB
            else run_evaluation(checkpoint_path.parent),
            "export": {
                "exporter": EXPORTER,
                "opset": max(
                    op.version for op in onnx_model.opset_import if op.domain in ("", "ai.onnx")
                ),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "simplification": simplification,
            },
            "parity": {"reference": "pytorch fp32", "candidate": "onnxruntime cpu", **parity},
        }
        return write_bundle(
            out_dir,
            onnx_file=chosen,
            name=name or checkpoint_path.parent.name or checkpoint_path.stem,
            version=version or f"step{checkpoint.get('step', 0)}",
            embedding_size=int(checkpoint["embedding_size"]),
            threshold=value,
            threshold_source=source,
            threshold_provenance=provenance,
            extra=extra,
        )
