"""Launcher environments and the device rule (no GPU here: the CUDA branches are checked as errors)."""
from __future__ import annotations

import sys

import pytest
import torch

from c2r_comm.bootstrap import MPI_RANK_VARIABLES, launched, pick_device, read_launch_env


def test_torchrun_and_mpirun_environments():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.init_method) == (3, 8, 1, 4, "env://")
    env = read_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29511"})
    assert (env.rank, env.world_size, env.local_world_size, env.init_method) == (2, 4, 2, "tcp://h0:29511")
    assert read_launch_env({}) is None


@pytest.mark.parametrize("var", ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"])
def test_mpi_launch_without_mpi4py_names_the_launcher_and_the_fix(var, monkeypatch):
    """Under an MPI launcher without MASTER_ADDR/PORT the ranks meet through mpi4py; without it, a
    clear error (tests/test_mpi_launch.py runs the real thing under mpiexec)."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` raises ImportError
    assert launched({var: "0"})
    with pytest.raises(ValueError, match=r"install the mpi extra .*MASTER_ADDR") as info:
        read_launch_env({var: "0"})
    assert MPI_RANK_VARIABLES[var] in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU rule")
def test_device_rule_without_gpus():
    assert pick_device("auto", 0, 4) == torch.device("cpu")
    assert pick_device("cpu", 0, 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="one GPU per local rank: 4 local ranks, 0 GPUs"):
        pick_device("cuda", 0, 4)


def test_launcher_size_reads_the_detected_launchers_own_variable():
    from c2r_comm.bootstrap import launcher_size

    assert launcher_size({"PMI_RANK": "0", "PMI_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == 4
    assert launcher_size({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "1"}) == 2
    # srun with PMIx: the step's size, never the allocation's task count
    assert launcher_size({"PMIX_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) is None
    # srun --mpi=pmix (Slurm's PMIx namespace): PMIx announces no size, Slurm's step size is this launch's
    assert launcher_size({"PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.42.0", "SLURM_PROCID": "1",
                          "SLURM_STEP_NUM_TASKS": "4"}) == 4
    # another PMIx launcher inside an `srun --pty bash` shell: Slurm's variables are the shell's
    assert launcher_size({"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-host-1234@1", "SLURM_PROCID": "0",
                          "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert launcher_size({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16"}) == 8
    assert launcher_size({"SLURM_PROCID": "0"}) is None and launcher_size({}) is None


def test_launcher_rank_reads_the_detected_launchers_rank():
    """A bare PMIx launcher announces no size; its rank still shows an mpi4py on another MPI (a
    world of one is rank 0 everywhere)."""
    from c2r_comm.bootstrap import launcher_rank

    assert launcher_rank({"PMIX_RANK": "3"}) == 3
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "1", "PMIX_RANK": "1", "SLURM_PROCID": "0"}) == 1
    assert launcher_rank({"RANK": "2"}) is None and launcher_rank({}) is None
