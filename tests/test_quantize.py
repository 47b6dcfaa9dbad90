"""`facegate export int8`: the default model's fp32 source (dlib's ResNet port, exported
here) quantised (QDQ int8) on real CelebA chips of training identities, in a process where
torch cannot be imported; the result is a sealed bundle ONNX Runtime loads, with int8
Quantize/DequantizeLinear nodes, whose embeddings of other people's crops stay within a
cosine a broken quantisation does not reach. The shipped default is such a bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from facegate.core.bundle import load_bundle
from facegate.core.embed import create_embedder
from facegate.core.metrics import split_identities
from facegate.export.onnx import export_bundle
from facegate.export.parity import row_cosines, sample_crops
from facegate.export.quantize import QuantizeError, qdq_nodes, quantize_bundle, training_crops
from facegate.train.checkpoint import PRETRAINED_DLIB

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default"
HOLDOUT = 4
# Runs the CLI as on a server install: torch (and sympy, which only torch brings) cannot
# be imported (a None in sys.modules makes `import` fail and find_spec say "absent").
NO_TORCH_CLI = (
    "import sys\n"
    "sys.modules.update(torch=None, sympy=None)\n"
    "from facegate.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def chips(tmp_path_factory, celeba_root):
    """A crop folder of real dlib chips, 2 photos of each of 12 people (facegate prepare's
    layout), and the identities the split holds out of calibration."""
    crops, identities = sample_crops(celeba_root, 24, per_identity=2, seed=1,
                                     geometry=load_bundle(DEFAULT).geometry)
    root = tmp_path_factory.mktemp("chips")
    for k, (crop, identity) in enumerate(zip(crops, identities, strict=True)):
        (root / identity).mkdir(exist_ok=True)
        cv2.imwrite(str(root / identity / f"{k}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    _, held_out = split_identities(identities, HOLDOUT, 0)
    return root, held_out


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, chips):
    """The default model's fp32 source: dlib's ResNet ported and exported to ONNX."""
    crops = held_out_crops(chips)
    return export_bundle(Path(PRETRAINED_DLIB), tmp_path_factory.mktemp("fp32") / "bundle",
                         parity_crops=crops, name="facegate-default", version="test",
                         threshold=0.9)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, chips, fp32):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CLI, "export", "int8", str(fp32.path), str(out),
         "--calibration", str(chips[0]), "--holdout", str(HOLDOUT),
         "--calibration-crops", "16", "--parity-crops", "8"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_bundle(out)


def held_out_crops(chips) -> np.ndarray:
    root, held_out = chips
    paths = sorted(p for name in held_out for p in (root / name).glob("*.png"))
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])


def test_int8_bundle_is_sealed_another_model_with_int8_qdq_nodes(int8_bundle, fp32):
    source = fp32
    assert int8_bundle.sealed and int8_bundle.model_id != source.model_id
    assert int8_bundle.version == f"{source.version}-int8"
    assert list(int8_bundle.manifest["files"]) == ["embedder.onnx"]
    assert int8_bundle.threshold == source.threshold
    assert source.model_id in int8_bundle.threshold_provenance
    section = int8_bundle.manifest["quantization"]
    assert section["format"] == "QDQ" and section["source_model_id"] == source.model_id
    assert "16 crops of " in section["calibration_data"]
    assert "training identities" in section["calibration_data"]

    model = onnx.load(str(int8_bundle.onnx_path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 29 and ops.count("DequantizeLinear") >= 29 + 29
    types = {t.name: t.data_type for t in model.graph.initializer}
    stored = [types[n.input[0]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in types]
    assert stored.count(onnx.TensorProto.INT8) == 29 + 1  # every Conv's weights and the fc's
    assert set(stored) == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}  # int32: biases
    activation_points = {types[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert activation_points == {onnx.TensorProto.UINT8}
    session = ort.InferenceSession(str(int8_bundle.onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[-1] == 128


def test_int8_embeddings_of_held_out_people_stay_close_to_fp32(int8_bundle, chips, fp32):
    crops = held_out_crops(chips)
    assert len(crops) >= HOLDOUT
    for flip in (True, False):
        reference = create_embedder(fp32, runtime="onnxruntime-cpu", flip=flip)
        int8 = create_embedder(int8_bundle, runtime="onnxruntime-cpu", flip=flip)
        cosines = row_cosines(reference.embed(crops), int8.embed(crops))
        assert cosines.min() >= 0.995, cosines  # flat-range calibration gives ~0.90 (below)
    assert int8_bundle.manifest["parity"]["min_cosine"] >= 0.995


def test_calibration_keeps_to_training_identities(chips):
    root, held_out = chips
    calibration, parity, where = training_crops(root, (150, 150), holdout=HOLDOUT, seed=0,
                                                calibration=100, parity=100)
    held = held_out_crops(chips)
    assert len(calibration) == 24 - len(held) and len(parity) == len(held)
    assert not any((c == h).all() for c in calibration for h in held)
    assert {p.tobytes() for p in parity} == {h.tobytes() for h in held}
    trained = {p.parent.name for p in root.glob("*/*.png")} - set(held_out)
    assert where.startswith(f"{len(calibration)} crops of {len(trained)} training identities")


def test_a_quantisation_that_drifts_is_refused_and_writes_nothing(tmp_path, chips, fp32):
    flat = np.full((8, 150, 150, 3), 120, np.uint8)  # no face: activation ranges collapse
    with pytest.raises(QuantizeError, match="drift from fp32"):
        quantize_bundle(fp32.path, tmp_path / "bad", flat, held_out_crops(chips),
                        calibration_source="flat grey")
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_the_default_is_int8_calibrated_on_training_identities_and_not_quantised_twice(
        tmp_path, chips):
    default = load_bundle(DEFAULT)
    section = default.manifest["quantization"]
    assert default.version.endswith("-int8") and section["format"] == "QDQ"
    assert "of 199 training identities" in section["calibration_data"]
    assert "48 held out, seed 0" in section["calibration_data"]
    nodes = qdq_nodes(default.onnx_path)
    assert nodes["quantize_linear"] >= 29 and nodes["int8_initializers"] >= 29 + 1
    assert default.manifest["parity"]["min_cosine"] >= 0.999
    # its decision settings were learned on its own embeddings, not carried from fp32
    assert "carried unchanged" not in default.threshold_provenance
    assert default.manifest["calibration"]["previous_threshold"] != default.threshold
    with pytest.raises(QuantizeError, match="quantised already"):
        quantize_bundle(DEFAULT, tmp_path / "twice", held_out_crops(chips),
                        held_out_crops(chips), calibration_source="the default's chips")
