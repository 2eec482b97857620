"""init_distributed(): one process group from torchrun's, mpiexec's or srun's launch, or a single process.

The launcher's environment is the standard contract between launcher and program, so it is read
here and in launch_env.py (which launcher started this process, without importing torch) only:
  * torchrun: RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, rendezvous from MASTER_ADDR/PORT;
  * mpiexec / mpirun (MPICH: PMI_RANK, Open MPI: OMPI_COMM_WORLD_RANK, PMIx: PMIX_RANK) and srun
    (SLURM_PROCID): mpi4py (the `mpi` extra) gives rank, size and the local rank (a shared-memory
    split of COMM_WORLD), and rank 0 broadcasts its host name and a free port, so nobody sets
    MASTER_ADDR/PORT. Under Open MPI with MASTER_ADDR and MASTER_PORT set, its variables suffice and
    mpi4py is not needed.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import CommSite, guard
from c2r_comm.launch_env import MPI_RANK_VARIABLES, launched, launcher_rank, launcher_size, mpi_launcher  # noqa: F401


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    init_method: str
    local_world_size: int = 1  # ranks on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpi_rendezvous(launcher: str, env: Mapping[str, str]) -> LaunchEnv:
    """Rank, size and local rank from mpi4py; rank 0's host and a free port broadcast to all.

    mpi4py must use the launcher's MPI library: an mpi4py that loads MPICH (the `mpi` extra's wheel)
    under Open MPI's mpirun, or the reverse, initialises every process as a world of one, and each
    would run alone. That is refused here before any collective: on every rank where the launcher
    announces the process count, and where it announces none (a bare PMIx launcher) on every rank
    but the one its world of one agrees with (rank 0)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ValueError(f"started by {launcher}: install the mpi extra (pip install 'c2r-comm[mpi]', mpi4py) so "
                         "ranks can find each other, or set MASTER_ADDR and MASTER_PORT (Open MPI only)") from exc
    comm = MPI.COMM_WORLD
    announced, announced_rank = launcher_size(env), launcher_rank(env)
    if (announced is not None and announced != comm.Get_size()) or (
            announced_rank is not None and announced_rank != comm.Get_rank()):
        library = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
        told = f"as rank {announced_rank}" + (f" of {announced} processes" if announced is not None else "")
        raise ValueError(f"started by {launcher} {told}, but mpi4py's MPI library ({library}) sees rank "
                         f"{comm.Get_rank()} of a world of {comm.Get_size()}: mpi4py loaded a different MPI than the "
                         "launcher's. Point it at the launcher's library (MPI4PY_LIBMPI=/path/to/libmpi.so, e.g. "
                         "Open MPI's libmpi.so.40) or launch with the matching mpiexec (the mpi extra's mpich wheel "
                         "brings .venv/bin/mpiexec)")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    address = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    host, port = comm.bcast(address, root=0)
    return LaunchEnv(comm.Get_rank(), comm.Get_size(), local_rank, f"tcp://{host}:{port}", local_size)


def read_launch_env(env: Mapping[str, str]) -> Optional[LaunchEnv]:
    """The launch this process belongs to (see the module doc); None when no launcher started it.
    Under an MPI launcher without MASTER_ADDR/PORT this is a collective (mpi4py broadcast)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://",
                         int(env.get("LOCAL_WORLD_SIZE", 1)))
    launcher = mpi_launcher(env)
    if launcher is None:
        return None
    if "OMPI_COMM_WORLD_RANK" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                         int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
    return mpi_rendezvous(launcher, env)


def pick_device(requested: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """'cuda': one GPU per local rank, or an error; 'auto': that if there are enough GPUs, else CPU
    (gloo), e.g. the 4-rank CPU demo on a 1-GPU box; 'cpu': CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    enough = gpus >= local_world_size >= 1
    if requested == "cuda" and not enough:
        raise ValueError(f"run.device = 'cuda' needs one GPU per local rank: {local_world_size} local ranks, "
                         f"{gpus} GPUs; allowed 'cpu' or 'auto' (CPU when GPUs are short)")
    if requested == "cuda" or (requested == "auto" and enough):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s: float, device: str = "auto") -> DistContext:
    """Join (or create) the default process group; NCCL on CUDA devices, gloo on CPU."""
    launch = read_launch_env(os.environ)
    if launch is None:  # a plain `python -m c2r_comm ...`: a world of one
        launch = LaunchEnv(0, 1, 0, f"tcp://127.0.0.1:{_free_port()}")
    dev = pick_device(device, launch.local_rank, launch.local_world_size)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():  # a peer that dies meanwhile: one CommError naming the rendezvous
        with guard(CommSite(phase="set-up", stage="rendezvous", group_peers=tuple(range(launch.world_size))),
                   rank=launch.rank):
            dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                                    world_size=launch.world_size, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def report_to_launcher(exc: BaseException) -> None:
    """Hand a fatal error (e.g. a CommError) to torchrun, whose end-of-run summary then shows its
    message instead of "To enable traceback see ...": torchrun names a per-rank error file in
    TORCHELASTIC_ERROR_FILE. Under other launchers this does nothing (the rank prints the error)."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(exc)
    except OSError:
        pass  # the summary falls back to the exit code; the rank has printed the error itself
