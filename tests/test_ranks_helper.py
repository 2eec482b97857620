"""The test helper run_ranks (tests/ranks.py) pools its ranks; every call must still look fresh."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from ranks import RankError, run_ranks

from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology


def _dirty(rank, world):
    """Leave behind what a test might: groups, an env var, a default dtype, grad mode off."""
    build_process_groups(Topology(1, world), timeout_s=30)
    os.environ["C2R_TEST_LEFTOVER"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    return os.getpid(), len(dist.distributed_c10d._world.pg_map)


def _look(rank, world):
    return (os.getpid(), len(dist.distributed_c10d._world.pg_map), "C2R_TEST_LEFTOVER" in os.environ,
            torch.get_default_dtype(), torch.is_grad_enabled())


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes: the collective timeout ends it


def _leave_a_thread(rank, world):
    threading.Thread(target=time.sleep, args=(30,), name="left-behind", daemon=True).start()


def test_a_pooled_call_sees_a_fresh_rank_and_a_failure_restarts_the_pool():
    first = run_ranks(2, _look)
    dirty = run_ranks(2, _dirty)
    after = run_ranks(2, _look)
    assert [p for p, _ in dirty] == [a[0] for a in after] == [f[0] for f in first]  # the same processes
    assert all(n > first[0][1] for _, n in dirty)  # _dirty made groups ...
    assert after == first  # ... and nothing it changed is seen by the next call

    with pytest.raises(RankError, match="boom on rank 1") as info:
        run_ranks(2, _fail_on_rank_1, timeout_s=3)
    assert set(info.value.errors) == {0, 1}  # rank 0's own timeout is reported too, not cut short
    fresh = run_ranks(2, _look)
    assert fresh[0][0] != first[0][0] and [f[1:] for f in fresh] == [f[1:] for f in first]

    with pytest.raises(RankError, match="left threads running: \\['left-behind'\\]"):
        run_ranks(2, _leave_a_thread)

    started = time.monotonic()  # an argument the ranks cannot receive: refused at once, not timed out
    with pytest.raises(Exception, match="pickle"):
        run_ranks(2, _look, lambda: None)
    assert time.monotonic() - started < 5
