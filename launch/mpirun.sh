#!/usr/bin/env bash
# Run a c2r-comm command under MPI: launch/mpirun.sh NPROC bench --config ... (extra launcher flags via MPIRUN_ARGS)
# Uses the venv's mpiexec (the `mpi` extra: mpi4py + the mpich wheel) if there is one, else mpiexec / mpirun
# on PATH (MPICH or Open MPI; Open MPI as root also needs MPIRUN_ARGS=--allow-run-as-root). mpi4py must load
# that launcher's MPI library: for a system Open MPI beside the mpich wheel, export MPI4PY_LIBMPI=<its libmpi.so.40>.
# Ranks find each other through mpi4py (c2r_comm/bootstrap.py): rank 0 broadcasts its host and a free port,
# so no MASTER_ADDR / MASTER_PORT is needed.
set -euo pipefail
nproc="$1"; shift
cd "$(dirname "$0")/.."
launcher=.venv/bin/mpiexec
[ -x "$launcher" ] || launcher="$(command -v mpiexec || command -v mpirun || true)"
if [ -z "$launcher" ]; then
  echo "launch/mpirun.sh: no mpiexec: bash launch/setup_env.sh mpi (mpi4py + the mpich wheel), or install an MPI" >&2
  exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # ranks share the machine's cores
exec "$launcher" -n "$nproc" ${MPIRUN_ARGS:-} .venv/bin/python -m c2r_comm "$@"
