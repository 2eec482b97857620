"""Launcher environments and the device rule (no GPU here: the CUDA branches are checked as errors)."""
from __future__ import annotations

import pytest
import torch

from c2r_comm.bootstrap import pick_device, read_launch_env


def test_torchrun_and_mpirun_environments():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.init_method) == (3, 8, 1, 4, "env://")
    env = read_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29511"})
    assert (env.rank, env.world_size, env.local_world_size, env.init_method) == (2, 4, 2, "tcp://h0:29511")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        read_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert read_launch_env({}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU rule")
def test_device_rule_without_gpus():
    assert pick_device("auto", 0, 4) == torch.device("cpu")
    assert pick_device("cpu", 0, 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="one GPU per local rank: 4 local ranks, 0 GPUs"):
        pick_device("cuda", 0, 4)
