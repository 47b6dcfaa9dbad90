"""Leave only the GPU builds' files where a CPU and a GPU build share a module (GPU image).

facegate's base dependencies are onnxruntime and faiss-cpu; the `gpu` extra adds
onnxruntime-gpu and faiss-gpu-cu12, which install into the same ``onnxruntime/`` and
``faiss/`` directories. After the GPU wheels are reinstalled last, files that only the CPU
build has are still there (faiss-cpu's ``_swigfaiss_avx2`` module, which faiss's loader
prefers and which has no GPU symbols), so they are deleted. Both distributions stay
recorded, so ``pip check`` still holds.
"""

from __future__ import annotations

from importlib.metadata import distribution

PAIRS = {"onnxruntime": "onnxruntime-gpu", "faiss-cpu": "faiss-gpu-cu12"}


def main() -> None:
    for cpu, gpu in PAIRS.items():
        keep = {str(path) for path in distribution(gpu).files or []}
        removed = 0
        for path in distribution(cpu).files or []:
            if ".dist-info/" in str(path) or str(path) in keep or str(path).startswith(".."):
                continue
            target = path.locate()
            if target.is_file():
                target.unlink()
                removed += 1
        print(f"{cpu}: removed {removed} files that {gpu} does not have")


if __name__ == "__main__":
    main()
