"""What a launcher and the ranks it starts agree on, readable without torch: the launcher's rank
variables (is this process a rank of a launched world?) and the exit statuses and report wait of
a failing run. The launching side of a command (argument checks, then the local launch) imports
only this, so it starts the ranks without importing torch first; bootstrap.py and
comm_failures.py use the same names.
"""
from __future__ import annotations

from typing import Mapping, Optional

REPORT_WAIT_S = 2.0  # how long a failing rank waits for its peers' reports (failure path only)
EXIT_COMM_ERROR = 3  # exit status of a command that ended on a CommError (2: bad input or config)

MPI_RANK_VARIABLES = {"PMI_RANK": "MPICH (mpiexec)", "OMPI_COMM_WORLD_RANK": "Open MPI (mpirun)",
                      "PMIX_RANK": "a PMIx launcher", "SLURM_PROCID": "Slurm (srun)"}
# The process count each launcher announces beside its rank variable (PMIx alone announces none;
# Slurm's step size, not SLURM_NTASKS, which inside an allocation can be the allocation's).
MPI_SIZE_VARIABLES = {"PMI_RANK": "PMI_SIZE", "OMPI_COMM_WORLD_RANK": "OMPI_COMM_WORLD_SIZE", "PMIX_RANK": None,
                      "SLURM_PROCID": "SLURM_STEP_NUM_TASKS"}


def mpi_launcher(env: Mapping[str, str]) -> Optional[str]:
    """Which MPI-style launcher started this process (from its rank variable), or None."""
    return next((name for var, name in MPI_RANK_VARIABLES.items() if var in env), None)


def launched(env: Mapping[str, str]) -> bool:
    """Whether a launcher (torchrun, MPI, srun) started this process; cheap, no rendezvous."""
    return ("RANK" in env and "WORLD_SIZE" in env) or mpi_launcher(env) is not None


def launcher_size(env: Mapping[str, str]) -> Optional[int]:
    """The number of processes the launcher announces (None: it announces none): the detected
    launcher's size variable. PMIx announces none; under srun --mpi=pmix (Slurm's PMIx namespace,
    `slurm.pmix.<job>.<step>`) Slurm's step size is this launch's. Elsewhere Slurm's variables may
    be inherited, e.g. from an `srun --pty` shell (step size 1), and are not used."""
    rank_var = next((var for var in MPI_RANK_VARIABLES if var in env), None)
    size_var = MPI_SIZE_VARIABLES.get(rank_var) if rank_var else None
    if rank_var == "PMIX_RANK" and env.get("PMIX_NAMESPACE", "").startswith("slurm.pmix."):
        size_var = MPI_SIZE_VARIABLES["SLURM_PROCID"]
    value = env.get(size_var, "") if size_var else ""
    return int(value) if value.isdigit() else None


def launcher_rank(env: Mapping[str, str]) -> Optional[int]:
    """This process's rank as the detected launcher announces it (None: no launcher variable)."""
    value = next((env[var] for var in MPI_RANK_VARIABLES if var in env), "")
    return int(value) if value.isdigit() else None
