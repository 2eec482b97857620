"""Start one process per rank, on this machine (bench's own launch) or inside the emulated nodes'
namespaces, and supervise them.

Each rank gets torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR/PORT; in namespaces also GLOO_SOCKET_IFNAME naming its node's interface),
so `c2r-comm bench` joins the world exactly as under torchrun. Supervision: when a rank fails, the
others get `SETTLE_S` to end on their own (a peer's failure makes them raise a CommError naming
it, comm_failures.py), then what is left is stopped; the first failure's exit code is returned and
one line per rank that ended abnormally is printed. Ranks die with the launcher: they carry a
parent-death signal (SIGKILL), and on SIGINT/SIGTERM the launcher stops them (SIGTERM, then SIGKILL
after a grace period) before it returns.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

from c2r_comm.bench.netns import EmulatedNodes
from c2r_comm.launch_env import EXIT_COMM_ERROR, REPORT_WAIT_S

MASTER_PORT = 29500  # node 0's namespace is fresh: nothing else listens there
GRACE_S = 5.0
SETTLE_S = REPORT_WAIT_S + 8.0  # after a failure, time the other ranks get to report theirs and exit
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
    world = em.nodes * gpus_per_node
    return _start([[*em.exec_prefix(r // gpus_per_node), sys.executable, "-m", "c2r_comm", *argv] for r in range(world)],
                  [rank_env(em, gpus_per_node, r, dict(os.environ)) for r in range(world)], gpus_per_node)


def local_rank_env(world: int, rank: int, port: int, base: dict[str, str]) -> dict[str, str]:
    """torchrun's contract, with the rendezvous store hosted by the launcher (TORCHELASTIC_USE_AGENT_STORE,
    as torchrun's agent does), so it outlives any rank: failure reports still meet if rank 0 dies."""
    env = dict(base)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the machine's cores
    return env


def run_local_ranks(cmd: Sequence[str], world: int, base_env: Optional[dict[str, str]] = None) -> int:
    """Run `cmd` as `world` ranks on this machine and supervise them; nothing outlives this call.
    This process hosts the rendezvous store (on a port the OS picks, so no other program can take
    it first). SIGINT/SIGTERM/SIGHUP stop every rank and return 128 + the signal; otherwise the
    first failure's exit code (see supervise), or 0.

    The port is a listening socket made before the ranks start; the store takes it over only after
    they started, so this process imports torch while the ranks import theirs (their connections
    wait in the socket's backlog meanwhile) instead of before them."""
    env = dict(os.environ if base_env is None else base_env)
    previous = install_signal_handlers()
    procs: list[RankProcess] = []
    listener = store = None
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(world, 128))
        port = listener.getsockname()[1]
        procs = _start([list(cmd)] * world, [local_rank_env(world, r, port, env) for r in range(world)], world)
        import torch.distributed as dist  # only the launcher needs it; rank_launcher stays light to import

        with signals_blocked():  # the socket has one owner at any time: handed over, then the store's
            fd = listener.detach()  # from here the store closes it (left open if it fails: this process ends)
            store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False,
                                  master_listen_fd=fd)
        code, _ = supervise(procs)
        return code
    except Interrupted as stopped:
        stop(procs)
        return 128 + stopped.signum
    except BaseException:
        stop(procs)
        raise
    finally:
        restore_signal_handlers(previous)
        if listener is not None:
            listener.close()  # a no-op once detached
        del store


def _start(cmds: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], gpus_per_node: int) -> list[RankProcess]:
    procs: list[RankProcess] = []
    try:
        for rank, (cmd, env) in enumerate(zip(cmds, envs)):
            # own session: a terminal's Ctrl-C reaches the launcher only, which stops the ranks
            procs.append(RankProcess(rank, rank // gpus_per_node, subprocess.Popen(
                list(cmd), env=env, preexec_fn=_die_with_parent, start_new_session=True)))
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


def supervise(procs: Sequence[RankProcess], poll_s: float = 0.1,
              settle_s: float = SETTLE_S) -> tuple[int, Optional[int]]:
    """Wait for every rank. On the first failure give the others settle_s to end on their own (so
    they report what they saw), then stop the rest and print one line per rank that ended badly.
    Returns (exit code of the first failure, its rank)."""
    try:
        while True:
            codes = [p.proc.poll() for p in procs]
            failed = [(p, c) for p, c in zip(procs, codes) if c not in (None, 0)]
            if failed:
                deadline = time.monotonic() + settle_s
                while time.monotonic() < deadline and any(p.proc.poll() is None for p in procs):
                    time.sleep(poll_s)
                failed += [(p, p.proc.returncode) for p in procs
                           if p.proc.returncode not in (None, 0) and all(p is not q for q, _ in failed)]
                # a rank that failed on its own is the cause; one that reports a peer's failure is not
                first, code = min(failed, key=lambda pc: pc[1] == EXIT_COMM_ERROR)
                left = [p.rank for p in procs if p.proc.poll() is None]
                stop(procs)
                _print_endings(procs, left)
                return _exit_status(code), first.rank
            if all(c == 0 for c in codes):
                return 0, None
            time.sleep(poll_s)
    except BaseException:
        stop(procs)
        raise


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N


def _print_endings(procs: Sequence[RankProcess], stopped: Sequence[int]) -> None:
    """One line per rank that did not exit 0: killed by a signal, a CommError (reported above by
    the rank itself), another error, or stopped here because its peers had failed."""
    for p in procs:
        code = p.proc.returncode
        if p.rank in stopped:
            what = "was still running after its peers failed: stopped"
        elif code < 0:
            what = f"was killed by {signal.Signals(-code).name}"
        elif code == EXIT_COMM_ERROR:
            what = "ended on a communication error (its message is above)"
        elif code:
            what = f"exited with {code}"
        else:
            continue
        print(f"c2r-comm: rank {p.rank} {what}", file=sys.stderr)


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
