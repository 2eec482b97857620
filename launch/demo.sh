#!/usr/bin/env bash
# Main job: set up ./.venv, then benchmark every dispatcher on the CPU demo config (4 gloo ranks).
# Extra arguments go to `c2r-comm bench` (e.g. --trace ../shared/traces/deepseek_v2_lite_prefill_dev.npz --layer 12).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/c2r-comm bench --config configs/cpu_demo.yaml "$@"
