# syntax=docker/dockerfile:1
# Shared CPU base: slim Python, a virtualenv on PATH, CPU-only torch, a numeric non-root user.
# Built by images/build.sh as rlhf-base-python:<tag>; the base image comes from images/bases.env.
ARG PYTHON_BASE
FROM ${PYTHON_BASE}

ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
ARG RLHF_UID

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/rlhf \
    HF_HOME=/tmp/hf

# The venv is owned by root: the runtime user can read and run it but not modify installed code.
RUN python -m venv /opt/venv \
 && pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" \
 && useradd --uid "${RLHF_UID}" --gid 0 --create-home --home-dir /home/rlhf --shell /usr/sbin/nologin rlhf

WORKDIR /home/rlhf
USER ${RLHF_UID}
