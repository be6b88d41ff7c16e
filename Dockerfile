# syntax=docker/dockerfile:1
# R-LPIPS similarity service. Two images from one file:
#   docker build -t rlpips:gpu .                 # default target: CUDA runtime base, RLPIPS_DEVICE=cuda
#   docker build --target cpu -t rlpips:cpu .    # CPU-only torch wheels on python:3.11-slim
# Weights are never baked in unverified: mount a folder holding them and point RLPIPS_WEIGHTS_DIR at it
# (docker-compose.yml mounts it at /weights), or fill the cache volume with
# `docker compose run --rm rlpips-gpu rlpips store pull MODEL`, which checks every file's hash. For a
# self-contained image, pass --build-arg PULL_MODELS="lpips-alex ..." (downloads verified by the store).

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PULL_MODELS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RLPIPS_MODEL_STORE=/srv/rlpips/model_store \
    RLPIPS_CACHE_DIR=/var/lib/rlpips/files \
    RLPIPS_DEVICE=cpu

RUN python -m venv /opt/venv \
    && groupadd --system --gid 10001 rlpips \
    && useradd --system --uid 10001 --gid 10001 --home-dir /srv/rlpips --shell /usr/sbin/nologin rlpips
WORKDIR /srv/rlpips
COPY pyproject.toml ./
COPY app ./app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir . \
    && rm -rf /srv/rlpips/app /srv/rlpips/build
COPY model_store ./model_store
RUN mkdir -p /var/lib/rlpips/files \
    && for m in ${PULL_MODELS}; do rlpips store pull "$m"; done \
    && chown -R 10001:10001 /var/lib/rlpips

USER 10001:10001
VOLUME ["/var/lib/rlpips"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["rlpips", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"]

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PULL_MODELS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RLPIPS_MODEL_STORE=/srv/rlpips/model_store \
    RLPIPS_CACHE_DIR=/var/lib/rlpips/files \
    RLPIPS_DEVICE=cuda

# Ubuntu's python3.11 is whatever the base release ships; pinning it would break on every base bump.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && groupadd --system --gid 10001 rlpips \
    && useradd --system --uid 10001 --gid 10001 --home-dir /srv/rlpips --shell /usr/sbin/nologin rlpips
WORKDIR /srv/rlpips
COPY pyproject.toml ./
COPY app ./app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir . \
    && rm -rf /srv/rlpips/app /srv/rlpips/build
COPY model_store ./model_store
RUN mkdir -p /var/lib/rlpips/files \
    && for m in ${PULL_MODELS}; do rlpips store pull "$m"; done \
    && chown -R 10001:10001 /var/lib/rlpips

USER 10001:10001
VOLUME ["/var/lib/rlpips"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["rlpips", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"]
