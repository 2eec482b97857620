"""Start one process per rank inside the emulated nodes' namespaces, and supervise them; and
`run_supervised`, the same hygiene for bench's own torchrun launch.

Each rank gets torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR/PORT) plus GLOO_SOCKET_IFNAME naming its node's interface, so
`c2r-comm bench` joins the world exactly as under torchrun. Supervision is torchrun's: the first
rank to fail ends the run (the others are stopped) and its exit code is returned. Ranks die with
the launcher: they carry a parent-death signal (SIGKILL), and on SIGINT/SIGTERM the launcher stops
them (SIGTERM, then SIGKILL after a grace period) before it returns.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

from c2r_comm.bench.netns import EmulatedNodes

MASTER_PORT = 29500  # node 0's namespace is fresh: nothing else listens there
GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


class Interrupted(Exception):
    """A signal (SIGINT/SIGTERM) asked the launcher to stop."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def set_parent_death_signal(signum: int = signal.SIGKILL) -> None:
    """This process gets `signum` when its parent dies (Linux prctl; elsewhere nothing). If the parent
    is already gone (re-parented before the call), exit at once."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != parent:
        os._exit(128 + int(signum))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    set_parent_death_signal(signal.SIGKILL)


@dataclass(frozen=True)
class RankProcess:
    rank: int
    node: int
    proc: subprocess.Popen


def rank_env(em: EmulatedNodes, gpus_per_node: int, rank: int, base: dict[str, str]) -> dict[str, str]:
    node = rank // gpus_per_node
    env = dict(base)
    env.update(RANK=str(rank), WORLD_SIZE=str(em.nodes * gpus_per_node), LOCAL_RANK=str(rank % gpus_per_node),
               LOCAL_WORLD_SIZE=str(gpus_per_node), GROUP_RANK=str(node), MASTER_ADDR=em.address(0),
               MASTER_PORT=str(MASTER_PORT), GLOO_SOCKET_IFNAME=em.ifname)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the machine's cores, as bench's own launch does
    return env


def start_ranks(em: EmulatedNodes, gpus_per_node: int, argv: Sequence[str]) -> list[RankProcess]:
    """`python -m c2r_comm *argv` once per rank, inside its node's namespace."""
    procs: list[RankProcess] = []
    try:
        for rank in range(em.nodes * gpus_per_node):
            node = rank // gpus_per_node
            cmd = [*em.exec_prefix(node), sys.executable, "-m", "c2r_comm", *argv]
            procs.append(RankProcess(rank, node, subprocess.Popen(
                cmd, env=rank_env(em, gpus_per_node, rank, dict(os.environ)), preexec_fn=_die_with_parent)))
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: Sequence[RankProcess], grace_s: float = GRACE_S) -> None:
    """SIGTERM every live rank, SIGKILL what is left after grace_s; reap all (signals held back)."""
    with signals_blocked():
        _stop(procs, grace_s)


def _stop(procs: Sequence[RankProcess], grace_s: float) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def supervise(procs: Sequence[RankProcess], poll_s: float = 0.1) -> tuple[int, Optional[int]]:
    """Wait for every rank; on the first failure stop the others. Returns (exit code, failed rank)."""
    try:
        while True:
            codes = [p.proc.poll() for p in procs]
            failed = [(p, c) for p, c in zip(procs, codes) if c not in (None, 0)]
            if failed:
                first, code = failed[0]
                stop(procs)
                return (128 - code if code < 0 else code), first.rank  # killed by signal N: 128 + N
            if all(c == 0 for c in codes):
                return 0, None
            time.sleep(poll_s)
    except BaseException:
        stop(procs)
        raise


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_signal_handlers() -> dict[int, object]:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread (so `finally` blocks clean up);
    returns the previous handlers."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


@contextmanager
def signals_blocked():
    """Hold SIGINT/SIGTERM/SIGHUP back while cleaning up; they are delivered afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def restore_signal_handlers(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def run_supervised(cmd: Sequence[str], env: dict[str, str], grace_s: float = GRACE_S) -> int:
    """Run `cmd` (e.g. torchrun) so that nothing outlives this process: it gets its own process group
    and SIGTERM when this process dies; SIGINT/SIGTERM/SIGHUP here stop its whole group (SIGTERM,
    then SIGKILL after grace_s) and return 128 + the signal. Otherwise its exit code."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True,
                            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM))
    previous = install_signal_handlers()
    try:
        code = proc.wait()
        return 128 - code if code < 0 else code
    except Interrupted as stopped:
        with signals_blocked():
            _stop_group(proc, grace_s)
        return 128 + stopped.signum
    except BaseException:
        with signals_blocked():
            _stop_group(proc, grace_s)
        raise
    finally:
        restore_signal_handlers(previous)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL whatever of it is left after grace_s; reap the child.
    (torchrun starts each rank in a session of its own: ranks die through their parent-death signal.)"""
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
