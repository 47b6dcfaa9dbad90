# facegate, GPU production image: TensorRT engines for the embedder, onnxruntime-gpu as
# fallback, faiss-gpu for search. Needs the NVIDIA Container Toolkit on the host:
#   docker build -t facegate:gpu .
#   docker run --gpus all -p 8000:8000 -v facegate-data:/data facegate:gpu
# 25.01 is the first TensorRT release image on Ubuntu 24.04 with Python 3.12 (facegate
# needs >= 3.11); TensorRT 10.x, CUDA 12.x.
ARG TENSORRT_TAG=25.01
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv --system-site-packages $VIRTUAL_ENV
WORKDIR /app
COPY pyproject.toml README.md ./
COPY facegate facegate
COPY core core
COPY gallery gallery
COPY server server
COPY export export
COPY train train
# The CPU builds of onnxruntime and faiss (base dependencies) share a module name with
# their GPU builds: keep only the GPU ones.
RUN pip install ".[gpu]" \
 && pip uninstall -y onnxruntime faiss-cpu \
 && pip install --force-reinstall --no-deps onnxruntime-gpu faiss-gpu-cu12

COPY models/default models/default

RUN useradd --create-home --uid 10001 facegate && mkdir -p /data && chown facegate /data
USER facegate
VOLUME ["/data"]
EXPOSE 8000
ENV FACEGATE_BUNDLE=/app/models/default \
    FACEGATE_GALLERY=/data/gallery.sqlite \
    FACEGATE_RUNTIME=auto
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
CMD ["facegate", "serve", "--host", "0.0.0.0", "--port", "8000"]
