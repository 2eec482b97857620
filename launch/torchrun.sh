#!/usr/bin/env bash
# Run any c2r-comm command under torchrun on this machine: launch/torchrun.sh NPROC bench --config ...
# (`c2r-comm bench` also starts torchrun by itself when run plainly.) Multi-node: use torchrun's
# --nnodes/--rdzv-endpoint flags directly with `-m c2r_comm`.
set -euo pipefail
nproc="$1"; shift
cd "$(dirname "$0")/.."
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m c2r_comm "$@"
