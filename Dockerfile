# syntax=docker/dockerfile:1
# facegate, GPU image: onnxruntime-gpu (CUDA 12, cuDNN 9) and faiss-gpu from the `gpu`
# extra's pip wheels on a plain Debian 12 Python base; no vendor base image. CUDA and
# cuDNN come as NVIDIA's pip wheels inside the venv (core/ort_session.py preloads them),
# so the host needs only the NVIDIA driver and the NVIDIA Container Toolkit:
#   make image-gpu                 (scripts/image.sh gpu; docs/deploy.md)
#   docker run --gpus all -p 8000:8000 -v facegate-data:/data facegate:gpu
# Without a GPU the same image serves on the CPU (FACEGATE_RUNTIME=auto falls back).
# TENSORRT=1 adds the `tensorrt` extra, whose libraries come only from NVIDIA's own
# package index: the build's pip.conf must name it (PIP_EXTRA_INDEX_URL for
# scripts/image.sh, docs/deploy.md).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG TENSORRT=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY facegate facegate
COPY core core
COPY gallery gallery
COPY server server
COPY export export
COPY train train
# The CPU builds of onnxruntime and faiss (base dependencies) share their module names
# with the GPU builds: the GPU wheels are reinstalled last and the CPU builds' own files
# removed (deploy/keep_gpu_builds.py); both stay recorded so `pip check` holds. Then the check:
# one consistent set, the CUDA build of ONNX Runtime, CUDA and cuDNN found by the preload.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca.crt,target=/run/secrets/ca.crt \
    extras=gpu; [ "$TENSORRT" != 1 ] || extras=gpu,tensorrt; \
    /opt/venv/bin/pip install --quiet ".[$extras]" \
 && /opt/venv/bin/pip install --quiet --force-reinstall --no-deps \
        $(/opt/venv/bin/pip list --format freeze | grep -E '^(onnxruntime-gpu|faiss-gpu-cu12)==')
COPY deploy/keep_gpu_builds.py /tmp/
RUN /opt/venv/bin/python /tmp/keep_gpu_builds.py && rm /tmp/keep_gpu_builds.py

WORKDIR /
RUN /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import faiss, onnxruntime as ort; \
from facegate.core.ort_session import default_providers, preload_cuda_libraries; \
assert default_providers()[0] == 'CUDAExecutionProvider', ort.get_available_providers(); \
assert preload_cuda_libraries(); maps = open('/proc/self/maps').read(); \
assert 'libcudart.so.12' in maps and 'libcudnn.so.9' in maps; \
print('gpu stack:', ort.__version__, ort.get_device(), 'faiss', faiss.__version__)" \
 && if [ "$TENSORRT" = 1 ]; then /opt/venv/bin/python -c "import tensorrt; print('tensorrt', tensorrt.__version__)"; fi \
 && /opt/venv/bin/pip uninstall --quiet -y pip setuptools \
 && find /opt/venv/lib -depth -type d -name tests -path '*/numpy/*' -exec rm -rf {} + \
 && find /opt/venv -name '*.a' -delete

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY models/default models/default

RUN useradd --create-home --uid 10001 facegate && mkdir -p /data && chown facegate /data
USER facegate
VOLUME ["/data"]
EXPOSE 8000
ENV FACEGATE_BUNDLE=/app/models/default \
    FACEGATE_GALLERY=/data/gallery.sqlite \
    FACEGATE_RUNTIME=auto
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
CMD ["facegate", "serve", "--host", "0.0.0.0", "--port", "8000"]
