"""TensorRT runtime for a bundle's embedder engine (GPU servers).

``create_embedder`` tries ``TensorRTEmbedder.from_bundle`` first; any reason this
runtime cannot serve (no ``tensorrt`` package, no GPU, no engine built for this GPU
model and TensorRT version) is raised as ``TensorRTUnavailable`` so the caller falls
back to ONNX Runtime. ``tensorrt`` is imported lazily, so importing this module is
free on CPU machines.

CUDA memory and streams go through ``libcudart`` via ctypes: the ``tensorrt-cu12``
wheels depend on ``nvidia-cuda-runtime-cu12``, which ships ``libcudart.so.12``, so
this needs neither torch nor cuda-python. The GPU model name comes from the driver
API (``libcuda.so.1``), present wherever a GPU is.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.preprocess import check_crops, embed_with_flip, model_input

# Preferred engine precisions when a bundle holds several for this GPU: fp16 keeps
# parity >= 0.999 at twice fp32's speed; int8 only when it is the one built.
PRECISION_PREFERENCE = ("fp16", "fp32", "int8")
_H2D, _D2H = 1, 2


class TensorRTUnavailable(FacegateError):
    """This machine cannot run the bundle on TensorRT (the reason says why)."""

    code = "tensorrt_unavailable"
    status = 503


class CudaError(FacegateError):
    code = "cuda_error"
    status = 500


def gpu_slug(name: str) -> str:
    """File-name-safe GPU model: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def engine_filename(stem: str, gpu: str, tensorrt_version: str, precision: str) -> str:
    """``embedder.<gpu-slug>.trt<version>.<precision>.plan``: engines are per GPU and version."""
    return f"{stem}.{gpu}.trt{tensorrt_version}.{precision}.plan"


def matching_engine(
    engines: list[dict[str, Any]],
    gpu: str,
    tensorrt_version: str,
    *,
    role: str = "engine",
    precision: str | None = None,
) -> dict[str, Any] | None:
    """The bundle engine entry built for this GPU model and TensorRT version, best precision first."""
    found = [
        e
        for e in engines
        if e.get("role") == role
        and e.get("gpu") == gpu
        and str(e.get("tensorrt")) == tensorrt_version
        and (precision is None or e.get("precision") == precision)
    ]
    rank = {p: i for i, p in enumerate(PRECISION_PREFERENCE)}
    found.sort(key=lambda e: rank.get(str(e.get("precision")), len(rank)))
    return found[0] if found else None


def _load_library(names: list[str], extra_dirs: list[Path]) -> ctypes.CDLL:
    for directory in extra_dirs:
        for name in names:
            if (directory / name).exists():
                return ctypes.CDLL(str(directory / name))
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("; ".join(errors))


def _wheel_lib_dirs(package: str) -> list[Path]:
    """``lib`` folders of an ``nvidia.*`` wheel (e.g. ``nvidia.cuda_runtime``), if installed."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "lib" for p in spec.submodule_search_locations]


class CudaRuntime:
    """The few CUDA runtime calls TensorRT inference needs, via ctypes."""

    def __init__(self) -> None:
        try:
            self.lib = _load_library(
                ["libcudart.so.12", "libcudart.so"], _wheel_lib_dirs("nvidia.cuda_runtime")
            )
        except OSError as exc:
            raise TensorRTUnavailable(f"CUDA runtime library not found: {exc}") from exc
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMemcpy.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
        ]
        self.lib.cudaMemcpyAsync.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        for fn in ("cudaMalloc", "cudaMallocHost"):
            getattr(self.lib, fn).argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        for fn in ("cudaFree", "cudaFreeHost", "cudaStreamSynchronize", "cudaStreamDestroy"):
            getattr(self.lib, fn).argtypes = [ctypes.c_void_p]

    def check(self, status: int, what: str) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode()
            raise CudaError(f"{what} failed: {message} ({status})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        status = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        return count.value if status == 0 else 0

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(nbytes, 1)), "cudaMalloc")
        return int(ptr.value or 0)

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory, so copies to and from the GPU run asynchronously."""
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMallocHost(ctypes.byref(ptr), max(nbytes, 1)), "cudaMallocHost")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def free_host(self, ptr: int) -> None:
        self.lib.cudaFreeHost(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(handle)), "cudaStreamCreate")
        return int(handle.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def copy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        status = self.lib.cudaMemcpyAsync(dst, src, nbytes, kind, ctypes.c_void_p(stream))
        self.check(status, "cudaMemcpyAsync")

    def copy_to_device(self, dst: int, src: np.ndarray) -> None:
        """Blocking host -> device copy of a contiguous array."""
        data = np.ascontiguousarray(src)
        self.check(self.lib.cudaMemcpy(dst, data.ctypes.data, data.nbytes, _H2D), "cudaMemcpy")

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


def gpu_name(ordinal: int = 0) -> str:
    """The GPU model name from the driver (``cuDeviceGetName``); TensorRTUnavailable if none."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TensorRTUnavailable(f"no NVIDIA driver: {exc}") from exc
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        raise TensorRTUnavailable("no CUDA GPU visible")
    if lib.cuDeviceGetName(name, 256, device) != 0:
        raise TensorRTUnavailable("cannot read the GPU name")
    return name.value.decode()


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailable when it is not installed."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise TensorRTUnavailable(f"tensorrt is not installed ({exc})") from exc
    return trt


class PinnedArray:
    """A NumPy view of page-locked host memory (freed with ``close``)."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cuda = cuda
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = cuda.malloc_host(self.nbytes)
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(memoryview(raw), dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self.cuda.free_host(self.ptr)
            self.ptr = 0


class EngineSession:
    """One deserialised engine with device + pinned buffers sized for its largest profile shape.

    ``run`` takes named inputs whose leading dimensions may be anything within the
    engine's optimisation profile and returns the named outputs, copied out.
    """

    def __init__(self, engine_path: Path) -> None:
        trt = import_tensorrt()
        self.cuda = CudaRuntime()
        if self.cuda.device_count() == 0:
            raise TensorRTUnavailable("no CUDA GPU visible")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTUnavailable(f"engine {engine_path} does not deserialise on this GPU")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.max_shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for k in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(k)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
                self.max_shapes[name] = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
                self.context.set_input_shape(name, self.max_shapes[name])
            else:
                self.outputs.append(name)
        for name in self.outputs:  # resolved from the largest input shapes set above
            self.max_shapes[name] = tuple(self.context.get_tensor_shape(name))
        self.host = {
            n: PinnedArray(self.cuda, self.max_shapes[n], self.dtypes[n]) for n in self.max_shapes
        }
        self.device = {n: self.cuda.malloc(self.host[n].nbytes) for n in self.max_shapes}
        for name, ptr in self.device.items():
            self.context.set_tensor_address(name, ptr)
        self.lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return int(self.max_shapes[self.inputs[0]][0])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            for name in self.inputs:
                data = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                view = self.host[name].array.reshape(-1)[: data.size].reshape(data.shape)
                view[...] = data
                self.context.set_input_shape(name, data.shape)
                self.cuda.copy_async(
                    self.device[name], self.host[name].ptr, data.nbytes, _H2D, self.stream
                )
            if not self.context.execute_async_v3(self.stream):
                raise CudaError("TensorRT execute_async_v3 failed")
            shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.outputs}
            for name, shape in shapes.items():
                nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
                self.cuda.copy_async(
                    self.host[name].ptr, self.device[name], nbytes, _D2H, self.stream
                )
            self.cuda.synchronize(self.stream)
            return {
                name: self.host[name].array.reshape(-1)[: int(np.prod(s))].reshape(s).copy()
                for name, s in shapes.items()
            }

    def close(self) -> None:
        for ptr in self.device.values():
            self.cuda.free(ptr)
        for buffer in self.host.values():
            buffer.close()
        self.device, self.host = {}, {}
        if self.stream:
            self.cuda.destroy_stream(self.stream)
            self.stream = 0


class TensorRTEmbedder:
    """Embedder protocol on a TensorRT engine: dynamic batch, chunked above the engine's max.

    With ``flip`` the raw embeddings of each crop and its mirror are summed before
    normalising, as ``OnnxEmbedder`` does.
    """

    def __init__(
        self,
        engine_path: Path,
        *,
        precision: str,
        embedding_size: int,
        input_spec: dict[str, Any] | None = None,
        flip: bool = False,
    ) -> None:
        self.session = EngineSession(engine_path)
        self.precision = precision
        self.embedding_size = int(embedding_size)
        self.runtime = f"tensorrt-{precision}"
        self.engine_path = Path(engine_path)
        self.input_spec = dict(input_spec or DEFAULT_INPUT)
        self.flip = flip
        self.input_name = self.session.inputs[0]
        self.output_name = self.session.outputs[0]

    @classmethod
    def from_bundle(cls, bundle: Any, *, precision: str | None = None) -> TensorRTEmbedder:
        """The bundle's engine for this GPU model and TensorRT version, or TensorRTUnavailable."""
        trt = import_tensorrt()
        gpu = gpu_slug(gpu_name())
        entry = matching_engine(list(bundle.engines), gpu, trt.__version__, precision=precision)
        if entry is None:
            raise TensorRTUnavailable(
                f"bundle {bundle.path} has no {precision or 'embedder'} engine for {gpu} "
                f"with TensorRT {trt.__version__} (build one: facegate export tensorrt)"
            )
        return cls(
            Path(entry["path"]),
            precision=entry["precision"],
            embedding_size=bundle.embedding_size,
            input_spec=bundle.input_spec,
        )

    @property
    def max_batch(self) -> int:
        return self.session.max_batch

    def raw(self, crops: np.ndarray) -> np.ndarray:
        """Un-normalised engine output (N, D) float32."""
        check_crops(crops, tuple(self.input_spec["size"]))
        out = np.empty((len(crops), self.embedding_size), dtype=np.float32)
        step = self.max_batch
        for start in range(0, len(crops), step):
            chunk = model_input(crops[start : start + step], self.input_spec)
            raw = self.session.run({self.input_name: chunk})[self.output_name]
            out[start : start + len(chunk)] = raw
        return out

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return embed_with_flip(self.raw, crops, self.flip)

    def close(self) -> None:
        self.session.close()
