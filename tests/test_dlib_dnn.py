"""dlib's DNN file reader and the PyTorch/ONNX rebuild of its face recognition ResNet.

Parity is checked against dlib itself (a project dependency) on real CelebA chips made
the way dlib's face_recognition pipeline makes them: HOG detection, 5-point landmarks,
``get_face_chip(img, shape, 150, 0.25)``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from facegate.core.detect import dlib_model_file
from facegate.core.dlib_dnn import DlibFormatError, read_dlib_dnn
from facegate.core.preprocess import model_input
from facegate.train.backbones import (
    DLIB_MODEL_FILE,
    DlibResNet,
    UnknownBackbone,
    add_prev,
    count_parameters,
    get_backbone,
    input_spec_of,
)

MIN_CHIPS = 30
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def model_path():
    return dlib_model_file(DLIB_MODEL_FILE)


@pytest.fixture(scope="module")
def pretrained(model_path) -> DlibResNet:
    return get_backbone("dlib_resnet", 128, path=model_path).eval()


@pytest.fixture(scope="module")
def chips_and_descriptors(celeba_index, model_path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 150, 150, 3) uint8 RGB chips and dlib's (N, 128) descriptors of them, N >= 30."""
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    recognizer = dlib.face_recognition_model_v1(str(model_path))
    chips = []
    for photo, _ in celeba_index:  # the CSV lists photos identity by identity
        image = dlib.load_rgb_image(str(photo))
        faces = detector(image, 1)
        if faces:
            chips.append(dlib.get_face_chip(image, predictor(image, faces[0]), 150, 0.25))
        if len(chips) == MIN_CHIPS + 2:
            break
    assert len(chips) >= MIN_CHIPS
    descriptors = [np.array(recognizer.compute_face_descriptor(chip)) for chip in chips]
    return np.stack(chips), np.stack(descriptors)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ---------------------------------------------------------------- reader


def test_reads_the_face_recognition_resnet(model_path) -> None:
    net = read_dlib_dnn(model_path)  # raises on any missing or left-over byte
    kinds = [layer.kind for layer in net.layers]
    assert (net.loss, net.input) == ("loss_metric_2", "input_rgb_image_sized")
    assert net.input_size == (150, 150)
    assert net.loss_attrs == pytest.approx({"margin": 0.04, "dist_thresh": 0.6})
    assert net.mean_rgb == pytest.approx((122.782, 117.001, 104.298))
    assert len(kinds) == 108 and kinds.count("con") == 29 and kinds.count("add_prev") == 14
    assert sum(layer.params.size for layer in net.layers) == 5_614_592
    assert sum(layer.wrappers for layer in net.layers) == 22  # 18 tags + 4 skips
    assert (kinds[0], kinds[-1]) == ("con", "fc")


def test_reads_the_mmod_detector_with_the_same_reader() -> None:
    net = read_dlib_dnn(dlib_model_file("mmod_human_face_detector.dat"))
    assert net.loss == "loss_mmod_" and net.loss_attrs["detector_width"] == 80
    assert [layer.kind for layer in net.layers].count("con") == 7


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda data: data[:-1], "truncated"),
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data + b"\0", "1 trailing bytes"),
    ],
)
def test_wrong_length_is_a_format_error(model_path, tmp_path, cut, message) -> None:
    broken = tmp_path / "broken.dat"
    broken.write_bytes(cut(model_path.read_bytes()))
    with pytest.raises(DlibFormatError, match=message) as err:
        read_dlib_dnn(broken)
    assert "at byte" in str(err.value)


def test_foreign_files_are_format_errors(tmp_path) -> None:
    png = tmp_path / "face.png"
    png.write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    with pytest.raises(DlibFormatError, match=r"loss layer format version at byte 0.*0x89"):
        read_dlib_dnn(png)
    with pytest.raises(DlibFormatError, match="loss layer name at byte 2"):
        read_dlib_dnn(dlib_model_file("shape_predictor_5_face_landmarks.dat"))


# ---------------------------------------------------------------- backbone


def test_add_prev_zero_extends_both_inputs_at_the_end() -> None:
    a = torch.ones(1, 1, 2, 2)
    b = torch.full((1, 2, 1, 3), 2.0)
    out = add_prev(a, b)
    expected = torch.zeros(1, 2, 2, 3)
    expected[:, :1, :2, :2] += 1
    expected[:, :, :1, :] += 2
    assert torch.equal(out, expected)


def test_uninitialised_build_is_trainable_and_fixed_at_128() -> None:
    model = get_backbone("dlib_resnet", 128)
    assert 5.6e6 < count_parameters(model, trainable_only=True) == count_parameters(model) < 5.7e6
    assert input_spec_of(model)["size"] == [150, 150] and input_spec_of(model)["std"] == 256.0
    out = model(torch.randn(2, 3, 150, 150))
    assert out.shape == (2, 128)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(UnknownBackbone, match="128"):
        get_backbone("dlib_resnet", 512)


def test_other_dlib_networks_do_not_load() -> None:
    with pytest.raises(DlibFormatError, match="not dlib's face recognition ResNet"):
        get_backbone("dlib_resnet", 128, path=dlib_model_file("mmod_human_face_detector.dat"))


def test_torch_port_matches_dlib(pretrained, chips_and_descriptors) -> None:
    chips, reference = chips_and_descriptors
    with torch.inference_mode():
        out = pretrained(torch.from_numpy(model_input(chips, input_spec_of(pretrained)))).numpy()
    assert _min_cosine(out, reference) >= MIN_COSINE
    assert np.abs(out - reference).max() < 1e-4  # same scale: dlib's 0.6 distance still holds


def test_onnx_export_matches_dlib(pretrained, chips_and_descriptors, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    chips, reference = chips_and_descriptors
    path = tmp_path / "dlib_resnet.onnx"
    torch.onnx.export(
        pretrained, (torch.zeros(1, 3, 150, 150),), str(path), input_names=["input"],
        output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["embedding"], {"input": model_input(chips, input_spec_of(pretrained))})[0]
    assert _min_cosine(out, reference) >= MIN_COSINE
