# Trainer image: the project with its `train` extra. PyPI's torch wheel for Linux brings its own CUDA
# libraries, so a slim Python base is enough; the host provides the NVIDIA driver.
# Build from the project root:  docker build -f docker/trainer.Dockerfile -t brats-seg-trainer .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# The versions of requirements/lock.txt (`make lock`) as constraints; PyPI's torch of that release brings its
# CUDA libraries.
COPY requirements/lock.txt ./requirements/lock.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip install -c requirements/lock.txt ".[train]" \
    && useradd --create-home --uid 10001 trainer
USER trainer

ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]
