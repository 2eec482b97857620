"""Real gloo ranks on CPU: run a function on each and collect each rank's return value (or its exception)."""
from __future__ import annotations

import atexit
import collections
import faulthandler
import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Any, Callable

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_single_threaded(procs) -> None:
    """Start spawned processes with OMP_NUM_THREADS=1 (up to 8 ranks share 2 cores); the parent's
    environment is restored afterwards."""
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads


class RankError(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"[rank {r}] {e}" for r, e in sorted(errors.items())))


# One pool of ranks per world size, shared by every run_ranks call of the session: spawning gloo
# ranks costs ~1.5 s per rank on 2 cores (torch's import), about half of what the multi-rank
# tests took when each call spawned its own. At most _MAX_POOLS stay alive (least recently used
# closed first); all are closed at exit.
_MAX_POOLS = 3
_POOLS: "collections.OrderedDict[int, Any]" = collections.OrderedDict()


def _pool(world_size: int):
    from rank_pool import RankPool

    pool = _POOLS.pop(world_size, None)
    if pool is None:
        pool = RankPool(world_size, pg_timeout_s=120.0)  # rendezvous and store timeout; each call sets its own
    _POOLS[world_size] = pool
    while len(_POOLS) > _MAX_POOLS:
        _POOLS.popitem(last=False)[1].close()
    return pool


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def _run_as_if_fresh(rank: int, world_size: int, timeout_s: float, fn: Callable, args: tuple) -> Any:
    """fn(rank, world_size, *args) in a pooled rank, with what a test may change put back: the
    process groups it created are destroyed, c2r_comm's failure reports cleared from the store,
    the environment, working directory, default dtype and grad mode restored, megatron-core's
    parallel state reset, torch's global RNG reseeded at random (as a fresh process starts it).
    A Python thread the task started and left running, or a destroyed default group, fails the
    task. When fn raises, nothing is put back: the pool is killed and restarted anyway. Not
    reset: libraries that cache process groups elsewhere (DeepSpeed's groups): run those with
    run_ranks(..., fresh=True)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from c2r_comm.comm_failures import _REPORTS_KEY

    torch.seed()  # a fresh process starts torch's global RNG from a random seed too
    c10d._set_pg_timeout(timedelta(seconds=timeout_s))  # this call's collective timeout
    groups, threads = set(c10d._world.pg_map), set(threading.enumerate())
    env, cwd = dict(os.environ), os.getcwd()
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    faulthandler.dump_traceback_later(timeout_s + 30, exit=True)  # a hang names where it hangs
    try:
        result = fn(rank, world_size, *args)
        if not dist.is_initialized():
            raise RuntimeError(f"rank {rank}: the task destroyed the default process group")
        megatron_state = sys.modules.get("megatron.core.parallel_state")  # its groups are about to go
        if megatron_state is not None and megatron_state.model_parallel_is_initialized():
            megatron_state.destroy_model_parallel()
        for g in [g for g in c10d._world.pg_map if g not in groups]:
            dist.destroy_process_group(g)
        c10d._get_default_store().delete_key(_REPORTS_KEY)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        left = [t for t in threading.enumerate() if t not in threads]
        for t in left:
            t.join(timeout=2.0)
        left = [t.name for t in left if t.is_alive()]
        if left:
            raise RuntimeError(f"rank {rank}: the task left threads running: {left}")
        return result
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 120.0, fresh: bool = False) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return results by rank.

    timeout_s is the ranks' collective timeout; every rank's report is awaited up to 60 s longer.
    Raises RankError with every failing rank's traceback (and restarts the pool). fn must be a
    module-level function. The ranks are pooled (see _pool) but each call sees a fresh-looking
    process (_run_as_if_fresh); fresh=True spawns new ranks for this call alone.
    """
    if fresh:
        from rank_pool import RankPool

        with RankPool(world_size, pg_timeout_s=timeout_s, start_timeout_s=timeout_s) as pool:
            return pool.run(fn, *args, timeout_s=timeout_s + 60, error_grace_s=timeout_s + 60)
    return _pool(world_size).run(_run_as_if_fresh, timeout_s, fn, args, timeout_s=timeout_s + 60,
                                 error_grace_s=timeout_s + 60)
