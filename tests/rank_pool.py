"""A persistent pool of gloo ranks for property tests: spawn W ranks once, send them many tasks.

Spawning gloo ranks costs seconds on 2 cores, so a hypothesis test that spawned per example would
run a handful of examples. A RankPool starts `world` spawn processes once (gloo, tcp init, one
thread each, like ranks.py) and then runs `fn(rank, world, *args)` on every rank per task: the
parent puts the task on each rank's own queue and collects one reply per rank from a shared queue.

Never hangs the parent: every wait is bounded (and notices dead ranks), and a task that fails or
times out on any rank kills and restarts the whole pool before the error is raised, so a rank
stuck in a collective its peers left cannot desynchronise later tasks. Use it as a context
manager (or call close()): the processes are killed and joined even when the test fails.
Module globals of the task's module persist in a rank between tasks (e.g. cached process groups).
"""
from __future__ import annotations

import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch.multiprocessing as mp
from multiprocessing.reduction import ForkingPickler
from ranks import RankError, _free_port, start_single_threaded

_STOP = None  # task sentinel: leave the loop, destroy the process group, exit


def _pool_worker(rank: int, world: int, port: int, pg_timeout_s: float, tasks, replies) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores shared by up to 8 ranks
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s))
        replies.put((-1, rank, "ok", None))  # ready
    except BaseException as exc:
        replies.put((-1, rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    try:
        while True:
            task = tasks.get()
            if task is _STOP:
                break
            task_id, fn, args = task
            try:
                replies.put((task_id, rank, "ok", fn(rank, world, *args)))
            except BaseException as exc:  # report, never hang the parent
                replies.put((task_id, rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankPool:
    """`world` gloo ranks that run task after task; see the module doc.

    timeout_s bounds one task (all ranks' replies); pg_timeout_s is the ranks' collective timeout.
    Counters: tasks (run() calls answered by every rank), restarts (pool restarts after a failure).
    """

    def __init__(self, world: int, timeout_s: float = 60.0, pg_timeout_s: float = 30.0,
                 start_timeout_s: float = 120.0, error_grace_s: float = 2.0):
        self.world, self.timeout_s, self.pg_timeout_s = world, timeout_s, pg_timeout_s
        self.start_timeout_s, self.error_grace_s = start_timeout_s, error_grace_s
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._tasks: list = []
        self._replies = None
        self._next_id = 0
        self.tasks = 0
        self.restarts = 0
        self.starts = 0

    # ---- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> "RankPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        if self._procs:
            return
        self._tasks = [self._ctx.Queue() for _ in range(self.world)]
        self._replies = self._ctx.Queue()
        port = _free_port()
        self._procs = [self._ctx.Process(target=_pool_worker, daemon=True,
                                         args=(r, self.world, port, self.pg_timeout_s, self._tasks[r], self._replies))
                       for r in range(self.world)]
        start_single_threaded(self._procs)
        self.starts += 1
        try:
            self._collect(-1, self.start_timeout_s, self.error_grace_s)
        except BaseException:
            self._kill()
            raise

    def close(self) -> None:
        """Ask the ranks to leave; kill whatever has not exited after a few seconds."""
        if not self._procs:
            return
        for q in self._tasks:
            try:
                q.put(_STOP)
            except Exception:
                pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)
        for q in self._tasks + ([self._replies] if self._replies is not None else []):
            q.cancel_join_thread()  # never block interpreter exit on a dead reader
            q.close()
        self._procs, self._tasks, self._replies = [], [], None

    def restart(self) -> None:
        self._kill()
        self.restarts += 1
        self.start()

    # ---- tasks --------------------------------------------------------------------------------
    def run(self, fn: Callable, *args: Any, timeout_s: Optional[float] = None,
            error_grace_s: Optional[float] = None) -> list[Any]:
        """fn(rank, world, *args) on every rank (fn and args picklable; fn at module level);
        results by rank. Raises RankError (every failing rank's traceback, -1 for a timeout or a
        dead rank) after restarting the pool, so the next run() starts clean. error_grace_s
        overrides the pool's wait for the other ranks' reports after one rank failed."""
        if not self._procs:
            self.start()
        ForkingPickler.dumps((fn, args))  # unpicklable: raise here, not in the queue's feeder thread
        self._next_id += 1
        task_id = self._next_id
        for q in self._tasks:
            q.put((task_id, fn, args))
        try:
            results = self._collect(task_id, self.timeout_s if timeout_s is None else timeout_s,
                                    self.error_grace_s if error_grace_s is None else error_grace_s)
        except BaseException:  # RankError, or pytest-timeout / Ctrl-C while waiting
            self._kill()  # ranks may sit in a collective their peers left: start over next time
            self.restarts += 1
            raise
        self.tasks += 1
        return results

    def _collect(self, task_id: int, timeout_s: float, error_grace_s: float) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        in_grace = False
        while len(results) + len(errors) < self.world:
            now = time.monotonic()
            if errors and not in_grace:  # the others may be stuck: a moment to report their own errors
                deadline, in_grace = min(deadline, now + error_grace_s), True
            if now >= deadline:
                missing = sorted(set(range(self.world)) - set(results) - set(errors))
                errors[-1] = f"timed out after {timeout_s:.0f}s waiting for ranks {missing}"
                break
            try:
                tid, rank, status, payload = self._replies.get(timeout=min(0.5, max(0.01, deadline - now)))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in results and r not in errors]
                if dead:
                    for r in dead:
                        errors[r] = f"rank process died (exit code {self._procs[r].exitcode})"
                continue
            if tid != task_id:
                continue  # a stale reply (cannot happen after a restart; kept for safety)
            (results if status == "ok" else errors)[rank] = payload
        if errors:
            raise RankError(errors)
        return [results[r] for r in range(self.world)]
