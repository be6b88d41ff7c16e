# syntax=docker/dockerfile:1
# R-LPIPS similarity service. Two images from one file:
#   docker build -t rlpips:gpu .                 # default target: CUDA torch wheels, RLPIPS_DEVICE=cuda
#   docker build --target cpu -t rlpips:cpu .    # CPU-only torch wheels
# Stages: base (OS, venv, user, runtime settings) → deps-cpu / deps-gpu (torch from its index, then every
# other dependency from pyproject.toml) → cpu / gpu (the code). Dependencies come before the code, so a
# code change rebuilds one small layer. The GPU image carries CUDA once: the libraries that torch's CUDA
# wheels bring (the host needs only the NVIDIA driver and the container toolkit), no CUDA base image.
# Versions are pinned: torch and torchvision by pyproject.toml (==), everything else by constraints.txt
# (`make lock` regenerates it from .venv; tests/unit/test_docker.py checks it against pyproject.toml).
# torch and torchvision come from the PyTorch index without their dependencies; the second pip
# resolves those (the CUDA libraries as that torch build names them: exact versions, or a narrow range for
# triton and cuda-bindings) and the service's own dependencies from the package index, all under the
# constraints, and `pip check` verifies the result.
# Weights are never baked in unverified: mount a folder holding them and point RLPIPS_WEIGHTS_DIR at it
# (docker-compose.yml mounts it at /weights), or fill the cache volume with
# `docker compose run --rm rlpips-gpu rlpips store pull MODEL`, which checks every file's hash. For a
# self-contained image, pass --build-arg PULL_MODELS="lpips-alex ..." (downloads verified by the store).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RLPIPS_MODEL_STORE=/srv/rlpips/model_store \
    RLPIPS_CACHE_DIR=/var/lib/rlpips/files \
    RLPIPS_DATA_DIR=/var/lib/rlpips/data

RUN python -m venv /opt/venv \
    && groupadd --system --gid 10001 rlpips \
    && useradd --system --uid 10001 --gid 10001 --home-dir /srv/rlpips --shell /usr/sbin/nologin rlpips \
    && mkdir -p /var/lib/rlpips/files \
    && chown -R 10001:10001 /var/lib/rlpips
WORKDIR /srv/rlpips
COPY pyproject.toml constraints.txt ./
# The runtime dependencies of pyproject.toml except torch and torchvision (installed first, per flavour).
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch==', 'torchvision=='))))" > /tmp/requirements.txt

VOLUME ["/var/lib/rlpips"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["rlpips", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"]

# ---------------------------------------------------------------------------------------------------
FROM base AS deps-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip check

FROM base AS deps-gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip check

# ---------------------------------------------------------------------------------------------------
FROM deps-cpu AS cpu
ARG PULL_MODELS=""
ENV RLPIPS_DEVICE=cpu
COPY app ./app
COPY model_store ./model_store
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /srv/rlpips/app /srv/rlpips/build \
    && for m in ${PULL_MODELS}; do rlpips store pull "$m"; done \
    && chown -R 10001:10001 /var/lib/rlpips
USER 10001:10001

FROM deps-gpu AS gpu
ARG PULL_MODELS=""
ENV RLPIPS_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY app ./app
COPY model_store ./model_store
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /srv/rlpips/app /srv/rlpips/build \
    && for m in ${PULL_MODELS}; do rlpips store pull "$m"; done \
    && chown -R 10001:10001 /var/lib/rlpips
USER 10001:10001
