"""ONNX Runtime sessions: one rule for the embedder and both detectors.

Providers: CUDA where this ONNX Runtime has it (``onnxruntime-gpu`` on a GPU host), then
CPU, so a GPU host runs every network on the GPU without a setting, and a laptop on its
CPU. Options: full graph optimisation and ONNX Runtime's own thread count unless the
caller sets one. (Idle threads that sleep instead of spinning,
``session.intra_op.allow_spinning=0``, cut the server's CPU per request by 10-30% but
lost ~15% of latency at concurrency 1 and won or lost at 16 by the noise of a shared
machine, so ONNX Runtime's default stays.)

CUDA libraries: the ``gpu`` extra takes CUDA and cuDNN from NVIDIA's pip wheels
(``onnxruntime-gpu[cuda,cudnn]``), which are on no library path, so the CUDA provider
fails to load unless ``onnxruntime.preload_dlls()`` has loaded them first; done once,
before the first session that may use CUDA, and only where it applies (a CUDA build with
those wheels installed): the CPU build and a system-wide CUDA are left as they are.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return [CPU]
    preload_cuda_libraries()
    return [CUDA, CPU]


def needs_cuda_preload(available_providers: list[str], has_nvidia_wheels: bool, can_preload: bool) -> bool:
    """Whether ONNX Runtime must be told to load CUDA from pip's ``nvidia-*`` wheels."""
    return CUDA in available_providers and has_nvidia_wheels and can_preload


@functools.cache
def preload_cuda_libraries() -> bool:
    """Load the pip-installed CUDA and cuDNN libraries once, if they are needed (see above)."""
    import onnxruntime as ort

    if not needs_cuda_preload(
        ort.get_available_providers(),
        importlib.util.find_spec("nvidia") is not None,
        hasattr(ort, "preload_dlls"),
    ):
        return False
    ort.preload_dlls(directory="")  # "": the nvidia-* wheels first, then the system's paths
    return True


def session_options(intra_op_threads: int | None = None) -> Any:
    """``ort.SessionOptions`` for every facegate session (``None``: ONNX Runtime's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    return options
