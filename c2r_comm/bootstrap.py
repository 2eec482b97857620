"""init_distributed(): one process group from torchrun's or mpirun's environment, or a single process.

The launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK from torchrun, OMPI_COMM_WORLD_* from Open
MPI) is the standard contract between launcher and program, so it is read here and nowhere else.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist


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


def read_launch_env(env: Mapping[str, str]) -> Optional[LaunchEnv]:
    """torchrun (RANK...) or Open MPI (OMPI_COMM_WORLD_*) with MASTER_ADDR/MASTER_PORT; None if neither."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://",
                         int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "OMPI_COMM_WORLD_RANK" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ValueError("under mpirun, set MASTER_ADDR and MASTER_PORT (launch/mpirun.sh does this)")
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                         int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
    return None


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
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                                world_size=launch.world_size, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
