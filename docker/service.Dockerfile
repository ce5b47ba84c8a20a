# Segmentation service image: FastAPI + ONNX Runtime on CUDA 12 / cuDNN 9 (what onnxruntime-gpu needs).
# With a GPU (docker run --gpus all, or the compose reservation) the sessions use CUDAExecutionProvider;
# without one, onnxruntime-gpu falls back to CPUExecutionProvider: GET /models shows which one each model uses.
# Build from the project root:  docker build -f docker/service.Dockerfile -t brats-seg-service .
# Run:                          docker run --rm --gpus all -p 8000:8000 brats-seg-service
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app
# The service's dependencies at the exact versions of requirements/service.txt (`make lock`), with onnxruntime
# swapped for onnxruntime-gpu of exactly the locked version (both provide the `onnxruntime` module; the GPU
# build also runs on CPU); then the project itself, with nothing more resolved (--no-deps). (`pip check` would
# object that the project asks for `onnxruntime`, which the GPU build provides under another name.)
COPY requirements/service.txt ./requirements/service.txt
RUN grep -q '^onnxruntime==' requirements/service.txt \
    && sed 's/^onnxruntime==/onnxruntime-gpu==/' requirements/service.txt > /tmp/service-gpu.txt \
    && pip install -r /tmp/service-gpu.txt \
    && rm /tmp/service-gpu.txt
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-deps . \
    && python -c "import onnxruntime, service.client; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

# The shipped models as a default; docker-compose.yml mounts ./models over them, read-only. Copied as root and
# made read-only, so that the service's user cannot change them.
COPY models ./models
RUN chmod -R a-w /app/models

RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin segmenter
USER 10001

# Settings (env prefix BRATS_, see service/settings.py and the README); uploads go to /tmp (a tmpfs in compose).
ENV BRATS_MODELS_DIR=/app/models \
    BRATS_TMP_DIR=/tmp

EXPOSE 8000
# Ready = every configured model loaded (/readyz answers 503 until then, and urlopen raises on it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
