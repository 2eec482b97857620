#!/usr/bin/env bash
# Run a c2r-comm command under Open MPI: launch/mpirun.sh NPROC bench --config ... [extra mpirun flags via MPIRUN_ARGS]
# Ranks read OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}; the rendezvous address is the first host.
set -euo pipefail
nproc="$1"; shift
cd "$(dirname "$0")/.."
master="${MASTER_ADDR:-$(hostname)}"
port="${MASTER_PORT:-29511}"
exec mpirun -np "$nproc" ${MPIRUN_ARGS:-} -x MASTER_ADDR="$master" -x MASTER_PORT="$port" -x OMP_NUM_THREADS=1 \
  .venv/bin/python -m c2r_comm "$@"
