"""The `gpu` and `tensorrt` extras install one CUDA major; CUDA from pip wheels is preloaded.

onnxruntime-gpu 1.27 and later are CUDA 13 builds while faiss-gpu-cu12 and tensorrt-cu12
are CUDA 12: a loose pin mixed two majors. The CUDA major of a package is read from its
name (``-cu12``) and from the names it requires (onnxruntime-gpu's ``cuda`` extra needs
``nvidia-cuda-runtime-cu12`` or ``-cu13``), after pip resolves the extra against the index.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from facegate.core import ort_session
from packaging.requirements import Requirement
from server_support import REPO

CU = re.compile(r"[-_]cu(\d+)\b")


def extra(name: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["optional-dependencies"][name]]


def cuda_majors(names: list[str]) -> set[int]:
    """The CUDA majors that package or requirement names declare (``nvidia-cublas-cu12`` -> 12)."""
    return {int(m.group(1)) for name in names for m in CU.finditer(name.lower())}


def test_cuda_majors_reads_names():
    assert cuda_majors(["faiss-gpu-cu12", "nvidia_cudnn_cu12", "numpy", "tensorrt-cu12"]) == {12}
    assert cuda_majors(["nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13"]) == {12, 13}
    assert cuda_majors(["onnxruntime-gpu", "cuda-python"]) == set()


def test_gpu_and_tensorrt_extras_are_pinned_to_one_cuda_major():
    gpu, tensorrt = extra("gpu"), extra("tensorrt")
    for req in gpu + tensorrt:
        assert str(req.specifier).startswith("=="), f"{req} is not pinned"
    ort = next(req for req in gpu if req.name == "onnxruntime-gpu")
    # Without [cuda,cudnn] its CUDA comes from wherever the host has one, unchecked here.
    assert {"cuda", "cudnn"} <= ort.extras
    assert cuda_majors([req.name for req in gpu + tensorrt]) == {12}


@pytest.mark.slow
def test_gpu_extra_resolves_to_one_cuda_major(tmp_path):
    """pip resolves the `gpu` extra against the package index (metadata only, nothing installed)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), *[str(req) for req in extra("gpu")]],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = json.loads(report.read_text())["install"]
    names = [item["metadata"]["name"] for item in installed]
    required = [Requirement(line).name for item in installed
                for line in item["metadata"].get("requires_dist") or []]
    assert {"onnxruntime-gpu", "faiss-gpu-cu12", "nvidia-cudnn-cu12"} <= set(names)
    assert cuda_majors(names + required) == {12}, sorted(n for n in names + required if CU.search(n))


def test_cuda_preload_only_where_pip_cuda_and_a_cuda_build_meet():
    cuda = [ort_session.CUDA, ort_session.CPU]
    assert ort_session.needs_cuda_preload(cuda, has_nvidia_wheels=True, can_preload=True)
    assert not ort_session.needs_cuda_preload([ort_session.CPU], True, True)  # CPU build
    assert not ort_session.needs_cuda_preload(cuda, False, True)  # system CUDA, no wheels
    assert not ort_session.needs_cuda_preload(cuda, True, False)  # ONNX Runtime < 1.21


def test_cpu_build_preloads_nothing_and_keeps_the_cpu_provider():
    import onnxruntime as ort

    if ort_session.CUDA in ort.get_available_providers():
        pytest.skip("this ONNX Runtime is a CUDA build")
    ort_session.preload_cuda_libraries.cache_clear()
    assert ort_session.default_providers() == [ort_session.CPU]
    assert ort_session.preload_cuda_libraries() is False
    maps = Path("/proc/self/maps").read_text()
    assert "libcudart" not in maps and "libcudnn" not in maps
