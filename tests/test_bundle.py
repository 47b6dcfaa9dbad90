"""Model bundles: round trip, and refusal of tampered, missing or inconsistent bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from facegate.core.align import ARCFACE_112, DLIB_CHIP_150, Geometry
from facegate.core.bundle import add_file, load_bundle, sha256_file, write_bundle
from facegate.core.errors import BundleError
from facegate.core.manifest import MANIFEST_NAME
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx(
    path: Path, embedding_size: int = 16, output_name: str = "embedding", size: int = 112
) -> Path:
    """A real ONNX model: (N, 3, size, size) -> Flatten -> MatMul -> (N, embedding_size)."""
    weight = np.random.default_rng(0).standard_normal((3 * size * size, embedding_size))
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], [output_name]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", embedding_size])],
        [numpy_helper.from_array(weight.astype(np.float32), "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_bundle(tmp_path: Path, **overrides):
    source = tiny_onnx(tmp_path / "model.onnx")
    arguments = dict(
        onnx_file=source,
        name="tiny",
        version="1.0",
        embedding_size=16,
        threshold=0.42,
        threshold_source="manual",
        threshold_provenance="set by hand for a test",
        extra={"evaluation": {"lfw_accuracy": 0.5}},
    )
    arguments.update(overrides)
    return write_bundle(tmp_path / "bundle", **arguments)


def test_round_trip(tmp_path):
    written = make_bundle(tmp_path)
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded == written
    assert loaded.name == "tiny" and loaded.version == "1.0"
    assert loaded.embedding_size == 16
    assert loaded.threshold == 0.42 and loaded.threshold_source == "manual"
    assert loaded.threshold_provenance == "set by hand for a test"
    assert loaded.onnx_path == (tmp_path / "bundle" / "embedder.onnx").resolve()
    digest = sha256_file(tmp_path / "model.onnx")
    assert loaded.manifest["files"]["embedder.onnx"] == {"sha256": digest, "role": "embedder"}
    assert loaded.sealed and loaded.model_id == f"tiny@1.0#{loaded.manifest['seal']['digest'][:12]}"
    assert loaded.manifest["evaluation"] == {"lfw_accuracy": 0.5}
    assert loaded.input_spec["size"] == [112, 112] and loaded.output_name == "embedding"
    assert loaded.engines == []
    # The manifest on disk is plain JSON with the same content.
    on_disk = json.loads((tmp_path / "bundle" / MANIFEST_NAME).read_text())
    assert on_disk == loaded.manifest
    assert (tmp_path / "bundle" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644  # readable by all
    # Loading through the manifest path works too.
    assert load_bundle(tmp_path / "bundle" / MANIFEST_NAME) == loaded


def test_add_file_registers_engine_with_sha256(tmp_path):
    make_bundle(tmp_path)
    engine = tmp_path / "elsewhere.plan"
    engine.write_bytes(b"not really an engine, but bytes with a hash")
    bundle = add_file(tmp_path / "bundle", engine, gpu="NVIDIA H100", precision="fp16")
    assert [e["filename"] for e in bundle.engines] == ["elsewhere.plan"]
    entry = bundle.engines[0]
    assert entry["role"] == "engine" and entry["gpu"] == "NVIDIA H100"
    assert entry["sha256"] == sha256_file(engine)
    assert entry["path"] == (tmp_path / "bundle" / "elsewhere.plan").resolve()
    assert load_bundle(tmp_path / "bundle").engines == bundle.engines
    # No temp files are left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "elsewhere.plan",
        "embedder.onnx",
        MANIFEST_NAME,
    ]
    with pytest.raises(BundleError, match="embedder"):
        add_file(tmp_path / "bundle", "embedder.onnx")


def test_tampered_file_is_refused(tmp_path):
    make_bundle(tmp_path)
    onnx_path = tmp_path / "bundle" / "embedder.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"'embedder.onnx' sha256 is [0-9a-f]{64}, manifest says"):
        load_bundle(tmp_path / "bundle")
    # Without verification the bundle still loads (files exist, schema fine).
    assert load_bundle(tmp_path / "bundle", verify=False).name == "tiny"


def test_tampered_engine_is_refused(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "bundle" / "e.plan").write_bytes(b"engine bytes")
    add_file(tmp_path / "bundle", "e.plan")
    (tmp_path / "bundle" / "e.plan").write_bytes(b"engine bytez")
    with pytest.raises(BundleError, match="'e.plan' sha256"):
        load_bundle(tmp_path / "bundle")


def test_missing_file_is_refused(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "bundle" / "embedder.onnx").unlink()
    with pytest.raises(BundleError, match="'embedder.onnx' listed in the manifest is missing"):
        load_bundle(tmp_path / "bundle", verify=False)


def test_missing_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "empty")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_bad_json_is_refused(tmp_path):
    make_bundle(tmp_path)
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest_path.write_text(manifest_path.read_text()[:-10])
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "bundle")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("schema", 2, "'schema' must be 1"),
        ("threshold", 1.5, r"'threshold' must be a number in \(-1, 1\)"),
        ("threshold", "0.3", r"'threshold' must be a number"),
        ("embedding_size", "512", "'embedding_size' must be a positive integer"),
        ("name", "", "'name' must be a non-empty string"),
        ("training", [1, 2], "'training' must be an object"),
    ],
)
def test_bad_schema_is_refused(tmp_path, key, value, message):
    make_bundle(tmp_path)
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest[key] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "bundle")


def test_bad_input_spec_and_missing_key_are_refused(tmp_path):
    make_bundle(tmp_path)
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["input"]["size"] = [224, 224]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"input.size must be \[112, 112\]"):
        load_bundle(tmp_path / "bundle")
    del manifest["input"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'input' must be an object"):
        load_bundle(tmp_path / "bundle")


def test_wrong_embedding_size_is_refused(tmp_path):
    # Writing: the graph's output has 16 dimensions, the caller claims 512.
    with pytest.raises(BundleError, match="has 16 dimensions but the manifest says embedding_size 512"):
        make_bundle(tmp_path, embedding_size=512)
    assert not (tmp_path / "bundle" / MANIFEST_NAME).exists()
    # Loading: an (unsealed: the seal would refuse it first) manifest edited to disagree
    # with the graph.
    make_bundle(tmp_path)
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["embedding_size"] = 128
    del manifest["seal"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="embedding_size 128"):
        load_bundle(tmp_path / "bundle")


def test_wrong_output_name_is_refused(tmp_path):
    source = tiny_onnx(tmp_path / "other.onnx", output_name="features")
    with pytest.raises(BundleError, match="no graph output named 'embedding'"):
        make_bundle(tmp_path, onnx_file=source)


def test_extra_cannot_override_arguments(tmp_path):
    with pytest.raises(BundleError, match=r"extra may not set \['threshold'\]"):
        make_bundle(tmp_path, extra={"threshold": 0.9})


def test_geometry_defaults_to_arcface_and_old_manifests_stay_valid(tmp_path):
    bundle = make_bundle(tmp_path)
    assert bundle.geometry == ARCFACE_112
    assert bundle.manifest["geometry"] == {"method": "arcface_template", "size": 112}
    # A manifest written before the geometry section (and the seal) existed loads as the
    # ArcFace template.
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["geometry"], manifest["seal"]
    manifest_path.write_text(json.dumps(manifest))
    assert load_bundle(tmp_path / "bundle").geometry == ARCFACE_112


def test_dlib_chip_bundle_round_trip(tmp_path):
    source = tiny_onnx(tmp_path / "chip.onnx", size=150)
    spec = {"name": "input", "size": [150, 150], "color": "RGB", "layout": "NCHW",
            "mean": [122.8, 117.0, 104.1], "std": 256.0}
    written = make_bundle(tmp_path, onnx_file=source, geometry=DLIB_CHIP_150, extra={"input": spec})
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded == written and loaded.geometry == DLIB_CHIP_150
    assert loaded.manifest["geometry"] == {"method": "dlib_chip", "size": 150, "padding": 0.25}
    assert loaded.input_spec["mean"] == [122.8, 117.0, 104.1]  # per-channel mean
    # Without an input override, the default input takes the geometry's size.
    again = make_bundle(tmp_path, onnx_file=source, extra={"geometry": DLIB_CHIP_150.to_dict()})
    assert again.input_spec["size"] == [150, 150] and again.geometry == DLIB_CHIP_150


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        ("dlib_chip", r"'geometry' must be an object"),
        ({"method": "mtcnn", "size": 112}, r"'geometry' method must be one of"),
        ({"method": "dlib_chip", "size": 150}, r"'geometry' method 'dlib_chip' needs \['padding'\]"),
        ({"method": "arcface_template", "size": 112, "padding": 0.2}, r"'geometry' unknown keys \['padding'\]"),
        ({"method": "dlib_chip", "size": 150, "padding": -1}, "'geometry' dlib_chip needs a padding"),
        ({"method": "dlib_chip", "size": 150.0, "padding": 0.25}, "'geometry' size must be an integer"),
        # A valid geometry whose size is not the input's.
        ({"method": "dlib_chip", "size": 150, "padding": 0.25}, r"input.size must be \[150, 150\]"),
    ],
)
def test_bad_geometry_is_refused(tmp_path, geometry, message):
    make_bundle(tmp_path)
    manifest_path = tmp_path / "bundle" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["geometry"] = geometry
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "bundle", verify=False)


def test_write_bundle_checks_geometry(tmp_path):
    # The graph takes 112x112 crops; a 150 geometry contradicts it.
    with pytest.raises(BundleError, match=r"input 'input' is 112x112 but the manifest says input.size \[150, 150\]"):
        make_bundle(tmp_path, geometry=DLIB_CHIP_150)
    with pytest.raises(BundleError, match="either as argument or in extra"):
        make_bundle(tmp_path, geometry=ARCFACE_112, extra={"geometry": ARCFACE_112.to_dict()})
    with pytest.raises(BundleError, match="write_bundle: geometry"):
        make_bundle(tmp_path, geometry={"method": "dlib_chip", "size": 112})
    source = tiny_onnx(tmp_path / "chip.onnx", size=150)
    spec = {"name": "input", "size": [112, 112], "color": "RGB", "layout": "NCHW", "mean": 0, "std": 1}
    with pytest.raises(BundleError, match=r"input.size must be \[150, 150\]"):
        make_bundle(tmp_path, onnx_file=source, geometry=Geometry("dlib_chip", 150, 0.25), extra={"input": spec})
    assert not (tmp_path / "bundle" / MANIFEST_NAME).exists()
