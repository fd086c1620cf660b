# syntax=docker/dockerfile:1
# Shared CPU base: Python, a virtualenv on PATH, CPU-only torch, the project's pinned dependencies, a numeric
# non-root user. Built by images/build.sh as rlhf-base-python:<tag>; PYTHON_BASE is the public slim image
# (images/bases.env) or, where no registry is reachable, a Debian rootfs bootstrapped with python3 + python3-venv
# (images/build.sh local). The two heavy layers (torch, then the dependencies) are shared by every CPU image.
ARG PYTHON_BASE
FROM ${PYTHON_BASE}

ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
# Directories of local wheels (bind-mounted by build.sh local) pip reads during the build; not in the image.
ARG PIP_FIND_LINKS
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
# `python3`, not `python`: Debian's python3 package has no `python` (KFP runs `python3 -m ...` anyway).
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" \
 && useradd --uid "${RLHF_UID}" --gid 0 --create-home --home-dir /home/rlhf --shell /usr/sbin/nologin rlhf

# The project's own requirements (build.sh extracts them from pyproject.toml), pinned by constraints.txt: one
# layer every step image shares, rebuilt only when a dependency changes, never when the project's code does.
COPY requirements.txt constraints.txt /opt/rlhf-deps/
RUN pip install --no-cache-dir --constraint /opt/rlhf-deps/constraints.txt --requirement /opt/rlhf-deps/requirements.txt

WORKDIR /home/rlhf
USER ${RLHF_UID}
