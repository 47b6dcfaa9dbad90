"""ONNX Runtime sessions: one rule for the embedder and both detectors.

Providers: CUDA where this ONNX Runtime has it (``onnxruntime-gpu`` on a GPU host), then
CPU, so a GPU host runs every network on the GPU without a setting, and a laptop on its
CPU. Options: full graph optimisation and ONNX Runtime's own thread count unless the
caller sets one. (Idle threads that sleep instead of spinning,
``session.intra_op.allow_spinning=0``, cut the server's CPU per request by 10-30% but
lost ~15% of latency at concurrency 1 and won or lost at 16 by the noise of a shared
machine, so ONNX Runtime's default stays.)
"""

from __future__ import annotations

from typing import Any

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def session_options(intra_op_threads: int | None = None) -> Any:
    """``ort.SessionOptions`` for every facegate session (``None``: ONNX Runtime's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return options
