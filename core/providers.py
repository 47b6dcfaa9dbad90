"""ONNX Runtime execution providers: one rule for the embedder and both detectors.

CUDA where this ONNX Runtime has it (``onnxruntime-gpu`` on a GPU host), then CPU, so
a GPU host runs every network on the GPU without a setting, and a laptop on its CPU.
"""

from __future__ import annotations

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
