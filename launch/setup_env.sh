#!/usr/bin/env bash
# Idempotent set-up of ./.venv with c2r-comm and the given extras (e.g. `test,plan,plot,hf`).
#  - The venv sees system site-packages, so a torch that is already installed (a GPU box's CUDA
#    build) is kept. Only when no torch is importable do we install torch==2.13.0, which on the
#    project's CPU machines pip takes from local disk (the CPU build), never a multi-GB CUDA build.
#  - Re-running does nothing when pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv --system-site-packages .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  "${pip[@]}" "torch==2.13.0"
fi
stamp=".venv/.c2r-installed-$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  # The `peers` extra builds DeepSpeed from its sdist: without its C++/CUDA ops (DS_BUILD_OPS=0 is
  # DeepSpeed's own build switch), so it installs next to a CPU torch and never pulls another torch.
  DS_BUILD_OPS="${DS_BUILD_OPS:-0}" "${pip[@]}" -e "$spec"
  touch "$stamp"
fi
