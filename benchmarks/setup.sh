#!/usr/bin/env bash
# Creates one virtual environment per implementation under benchmarks/.venvs/ (git-ignored):
#   ours   this repository's requirements.txt (JAX on CPU)
#   trl    TRL 1.12.0 (the last release with PPOTrainer) + CPU torch 2.13.0
#   tunix  google-tunix 0.1.7 + CPU JAX
# Nothing here downloads a model: the runner builds tiny random models itself.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
mkvenv() {  # mkvenv NAME PIP-ARGS...
  local name=$1; shift
  if [[ ! -x .venvs/$name/bin/python ]]; then
    "$PY" -m venv ".venvs/$name"
  fi
  ".venvs/$name/bin/python" -m pip install -q --upgrade pip
  ".venvs/$name/bin/python" -m pip install -q "$@"
}
which=${1:-all}
if [[ $which == all || $which == ours ]]; then
  mkvenv ours -r ../requirements.txt psutil
fi
if [[ $which == all || $which == trl ]]; then
  # torch first and pinned, so that TRL's dependency on torch does not pull a CUDA build.
  mkvenv trl torch==2.13.0 
  mkvenv trl torch==2.13.0 trl==1.12.0 safetensors psutil
fi
if [[ $which == all || $which == tunix ]]; then
  mkvenv tunix "jax[cpu]" google-tunix==0.1.7 safetensors psutil
fi
echo "benchmark environments ready under benchmarks/.venvs/"
