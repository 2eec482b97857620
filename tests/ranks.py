"""Spawn real gloo ranks on CPU and collect each rank's return value (or its exception)."""
from __future__ import annotations

import faulthandler
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores shared by up to 8 ranks
    # A rank still running shortly before the parent gives up prints every thread's stack to
    # stderr (the test's captured output) and exits, so a hang names where it hangs.
    faulthandler.dump_traceback_later(timeout_s + 30, exit=True)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # report, never hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


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


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return results by rank.

    Raises RankError with every failing rank's traceback. fn must be a module-level function.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, timeout_s, fn, args, queue), daemon=True)
             for r in range(world_size)]
    start_single_threaded(procs)
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s + 60)
            (results if status == "ok" else errors)[rank] = payload
    except Exception:
        errors.setdefault(-1, f"timed out after {timeout_s + 60}s waiting for ranks {sorted(set(range(world_size)) - set(results) - set(errors))}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankError(errors)
    return [results[r] for r in range(world_size)]
