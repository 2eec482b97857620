#!/usr/bin/env bash
# Set up ./.venv with the test extras, then run the whole test suite (multi-process tests spawn gloo ranks).
# Tests that read the shared DeepSeek-V2-Lite trace expect it at ../shared/traces/ beside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,plan,plot,hf,mpi,megatron
exec .venv/bin/python -m pytest -q "$@"
