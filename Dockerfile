# One image for every step of simclr-kubeflow: the `simclr` CLI (prepare, pretrain,
# linear-eval, finetune, transfer, env), torchrun for multi-node pretraining in a
# PyTorchJob, and kfp for the Kubeflow lightweight components that run in it
# (`python3 -m kfp.dsl.executor_main`).
#
#   CPU (default):  docker build -t ghcr.io/simclr-kubeflow/simclr:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#                       -t ghcr.io/simclr-kubeflow/simclr:0.1.0-cuda .
#                   (PyPI's Linux torch wheels are CUDA builds; a download.pytorch.org/whl/cuXYZ
#                   index picks another CUDA release)
#
# Build arguments:
#   BASE_IMAGE           a Debian-based image with python3 and venv (tests pass a local
#                        debootstrap base, so the build needs no registry)
#   TORCH_INDEX_URL      where torch + torchvision come from (the CPU-only index by default)
#   TORCH_VERSION, TORCHVISION_VERSION   the pins of pyproject.toml (a test checks they agree)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT   optional pip settings
#                        for the build stage only (a mirror, a local wheel directory, a CA
#                        bundle for a TLS-intercepting proxy); unset = PyPI
#   SIMCLR_UID           the numeric user the image runs as (the manifests' runAsUser)
#   WITH_COMPILER        "true" adds g++ (with gcc) and, where missing, Python's headers: what
#                        pretrain.compile (torch.compile) builds its kernels with; "false"
#                        (default) keeps the image smaller
# checkov:skip=CKV_DOCKER_7:FROM names the BASE_IMAGE build argument, whose default python:3.11-slim is a fixed tag (checkov does not resolve ARG defaults)
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build stage
# A virtual environment under /opt/venv with torch, the project and its dependencies; only
# the environment is copied into the runtime stage (no source tree, no build files).
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/sh", "-eu", "-c"]

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from its own index (CPU or CUDA); `pip install .` then finds the pins of
# pyproject.toml satisfied (2.14.1+cpu satisfies torch==2.14.1) and leaves them alone.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Only what .dockerignore lets through: pyproject.toml, README.md and the packages
# (simclr_core, components, pipelines); no tests, data, runs or virtual environments.
COPY . /src
# A regular (not editable) install: the package and its `simclr` console script live in
# /opt/venv/lib and /opt/venv/bin; the source tree stays behind in this stage.
RUN pip install --no-cache-dir /src \
    && python3 -c "import simclr_core, torch, torchvision, kfp.dsl.executor_main" \
    && simclr --version

# -------------------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}

ARG SIMCLR_UID=10001
ARG WITH_COMPILER=false

LABEL org.opencontainers.image.title="simclr-kubeflow" \
      org.opencontainers.image.description="SimCLR pretraining and evaluation: the simclr CLI, torchrun and the kfp executor" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# A fixed numeric, non-root user and group (Kubernetes' runAsNonRoot can only verify a
# numeric USER). Its home is writable for caches (torch, matplotlib) when the root
# filesystem is writable; with a read-only root filesystem the manifests set HOME=/tmp.
RUN groupadd --gid "${SIMCLR_UID}" simclr \
    && useradd --uid "${SIMCLR_UID}" --gid "${SIMCLR_UID}" --create-home --home-dir /home/simclr \
        --shell /usr/sbin/nologin simclr \
    && mkdir -p /workspace \
    && chown "${SIMCLR_UID}:${SIMCLR_UID}" /workspace

# Real Fashion-MNIST from Debian (30 MB under /usr/share/datasets/fashion-mnist): the
# pipeline's default run (source=fashion-mnist, no source_uri) then works in a cluster that
# reaches no dataset mirror. The version is the one Debian's release carries (it has not
# changed since 2020), so it is not pinned: a pin would break on the next Debian release.
# With WITH_COMPILER=true, g++ too, and Python's C headers where the base lacks them (python:*
# images have them; Debian's python3 does not): torch.compile's kernels include Python.h.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && if [ "${WITH_COMPILER}" = "true" ]; then apt-get install -y --no-install-recommends g++ \
        && { python3 -c 'import os, sysconfig; raise SystemExit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
             || apt-get install -y --no-install-recommends python3-dev; }; fi \
    && rm -rf /var/lib/apt/lists/* \
    && test -s /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# Owned by root and read-only for the user: the running steps cannot change the code.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/simclr \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /workspace
USER ${SIMCLR_UID}:${SIMCLR_UID}

# A batch image (each step runs once and exits), so there is nothing for a HEALTHCHECK to
# probe; Kubernetes, Kubeflow and the Training Operator watch the process's exit code.
# checkov:skip=CKV_DOCKER_2:batch CLI image, every step runs to completion; no long-running service to probe
ENTRYPOINT ["simclr"]
CMD ["--help"]
