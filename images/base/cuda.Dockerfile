# syntax=docker/dockerfile:1
# Shared GPU base: CUDA 13.0 user space, Python 3.12 in a virtualenv on PATH, torch with its CUDA 13.0
# wheels, the project's pinned dependencies, a numeric non-root user. Built by images/build.sh as rlhf-base-cuda:<tag>; the base image
# comes from images/bases.env.
ARG CUDA_BASE
FROM ${CUDA_BASE}

ARG TORCH_VERSION
ARG RLHF_UID

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/rlhf \
    HF_HOME=/tmp/hf \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's Python is 3.12.3; the "-*" keeps that upstream version while still taking the
# distribution's security rebuilds. `python3` must exist on PATH: KFP runs lightweight components
# with `python3 -m kfp.dsl.executor_main`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" \
 && useradd --uid "${RLHF_UID}" --gid 0 --create-home --home-dir /home/rlhf --shell /usr/sbin/nologin rlhf

# The project's own requirements (build.sh extracts them from pyproject.toml), pinned by constraints.txt: one
# layer every GPU step image shares, rebuilt only when a dependency changes.
COPY requirements.txt constraints.txt /opt/rlhf-deps/
RUN pip install --no-cache-dir --constraint /opt/rlhf-deps/constraints.txt --requirement /opt/rlhf-deps/requirements.txt

WORKDIR /home/rlhf
USER ${RLHF_UID}
