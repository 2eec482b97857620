"""Communication failures that name the rank, the peers and the phase: CommError.

Every collective the runtime issues runs under a `CommSite` (layer, phase, direction, stage,
chunk, peers). A gloo/NCCL error raised by the collective or by waiting on it (a peer's connection
closed, a timeout) becomes one `CommError` on that rank, naming:
  * this rank and the site (e.g. "combine forward, intra-node stage, layer 3, chunk 1");
  * the peers it was exchanging with, and for each peer that did not itself report a failure what
    is known of it: its process exited (same host: /proc), it is alive but not answering (a stall),
    or it is on another host;
  * the peers that did report a failure, with their own site (so a chain of failures points back
    to the peer that started it).

Reports travel through the rendezvous store (the key-value store every launcher already provides):
a failing rank writes one key and waits at most `REPORT_WAIT_S` for its peers' keys. This only
runs on the failure path; a healthy call costs one Python `try` per collective and nothing more.
If the store itself is gone (it lives in rank 0 unless torchrun hosts it), the error says so and
still names the peers from the process table gathered when the groups were built.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Iterator, Optional, Sequence

import torch.distributed as dist

REPORT_WAIT_S = 2.0  # how long a failing rank waits for its peers' reports (failure path only)
EXIT_COMM_ERROR = 3  # exit status of a command that ended on a CommError (2: bad input or config)
_KEY = "c2r_comm/failure/{}"
_PROCESS_KEY = "c2r_comm/process/{}"


@dataclass(frozen=True)
class PeerDirectory:
    """Host name and process id of every global rank, gathered once when the process groups are
    built, so a failing rank can tell a peer that exited from one that stalls."""

    ranks: tuple[int, ...]  # global ranks
    hosts: tuple[str, ...]
    pids: tuple[int, ...]

    @staticmethod
    def gather(group: Any = None) -> "PeerDirectory":
        """Collective over `group` (default: the world): every rank contributes (rank, host, pid).
        Each rank also leaves its entry in the rendezvous store, for failure reports of collectives
        whose site carries no directory (PeerDirectory.from_store)."""
        me = (dist.get_rank(), socket.gethostname(), os.getpid())
        entries: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(entries, me, group=group)
        store = _store()
        if store is not None:
            store.set(_PROCESS_KEY.format(me[0]), f"{me[1]} {me[2]}")
        return PeerDirectory(*(tuple(column) for column in zip(*entries)))

    @staticmethod
    def from_store(ranks: Sequence[int]) -> Optional["PeerDirectory"]:
        """The entries `gather` left in the store for `ranks` (failure path; None if unavailable)."""
        store = _store()
        if store is None:
            return None
        found = []
        try:
            store.set_timeout(timedelta(seconds=REPORT_WAIT_S))
            for r in ranks:
                if store.check([_PROCESS_KEY.format(r)]):
                    host, pid = store.get(_PROCESS_KEY.format(r)).decode().rsplit(" ", 1)
                    found.append((r, host, int(pid)))
        except Exception:
            return None
        return PeerDirectory(*(tuple(column) for column in zip(*found))) if found else None

    def state_of(self, rank: int) -> str:
        """What is known of global rank `rank`'s process from here (Linux /proc; same host only)."""
        if rank not in self.ranks:
            return "unknown"
        host, pid = self.hosts[self.ranks.index(rank)], self.pids[self.ranks.index(rank)]
        if host != socket.gethostname():
            return f"on host {host}"
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return f"its process (pid {pid}) has exited"
        if state in ("Z", "X"):
            return f"its process (pid {pid}) has exited"
        return f"its process (pid {pid}) is alive but not answering (stalled or blocked elsewhere)"


@dataclass(frozen=True)
class CommSite:
    """Where a collective runs: what the error names. `peers` are global ranks."""

    phase: str = "collective"  # dispatch | combine | count exchange | set-up
    direction: str = "forward"  # forward | backward
    stage: Optional[str] = None  # all2all | cross-node | intra-node
    layer: Optional[str] = None  # e.g. "layer 3"
    chunk: Optional[int] = None  # pipeline chunk
    group: Any = None  # the process group (None: the default group)
    group_peers: tuple[int, ...] = ()  # ranks within `group`; turned into global ranks only on failure
    directory: Optional[PeerDirectory] = None

    def at(self, **changes: Any) -> "CommSite":
        return replace(self, **changes)

    @property
    def peers(self) -> tuple[int, ...]:
        """Global ranks of the peers (computed on the failure path only)."""
        if self.group is None:
            return tuple(self.group_peers)
        try:
            return tuple(dist.get_global_rank(self.group, r) for r in self.group_peers)
        except Exception:  # the group is gone: keep the group ranks
            return tuple(self.group_peers)

    def describe(self) -> str:
        where = [f"{self.phase} {self.direction}" if self.phase in ("dispatch", "combine") else self.phase]
        where += [f"{self.stage} stage"] if self.stage else []
        where += [self.layer] if self.layer else []
        where += [f"chunk {self.chunk}"] if self.chunk is not None else []
        return ", ".join(where)


class CommError(RuntimeError):
    """A collective failed; the message names this rank, the site, the peers and what became of them."""

    def __init__(self, rank: int, site: CommSite, cause: str, elapsed_s: float, peer_notes: Sequence[str]):
        self.rank, self.site, self.cause, self.peer_notes = rank, site, cause, tuple(peer_notes)
        peers = f" with peers {list(site.peers)}" if site.peers else ""
        notes = "; ".join(peer_notes) if peer_notes else "no peer information"
        super().__init__(f"rank {rank}: {site.describe()}{peers} failed after {elapsed_s:.1f} s: {cause}. {notes}")


def _cause(exc: BaseException) -> str:
    text = str(exc)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return "timed out waiting for a peer (the process group's timeout)"
    if "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text or "Connection refused" in text:
        return "a peer's connection closed"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def _store() -> Optional[Any]:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a backend without a store
        return None


def _report_and_collect(rank: int, site: CommSite, peers: Sequence[int],
                        cause: str) -> tuple[dict[int, str], Optional[str]]:
    """Write this rank's failure to the store; wait up to REPORT_WAIT_S for each peer's. Returns the
    peers' reports and, if the store failed, why."""
    store = _store()
    if store is None:
        return {}, "no rendezvous store to compare notes with"
    reports: dict[int, str] = {}
    try:
        store.set_timeout(timedelta(seconds=REPORT_WAIT_S))
        store.set(_KEY.format(rank), f"{site.describe()}: {cause}")
        waiting = [p for p in peers if p != rank]
        deadline = time.monotonic() + REPORT_WAIT_S
        while waiting:
            for p in list(waiting):
                if store.check([_KEY.format(p)]):
                    reports[p] = store.get(_KEY.format(p)).decode(errors="replace")
                    waiting.remove(p)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except Exception as exc:  # the store lives in a rank or launcher that may be gone too
        return reports, f"the rendezvous store is unreachable too ({_cause(exc)})"
    return reports, None


def describe_failure(rank: int, site: CommSite, exc: BaseException, started: float) -> CommError:
    elapsed = time.monotonic() - started
    cause = _cause(exc)
    peers = site.peers
    if site.directory is None:
        site = site.at(directory=PeerDirectory.from_store(peers))
    reports, store_problem = _report_and_collect(rank, site, peers, cause)
    silent = [f"peer {p} reported nothing: " +
              (site.directory.state_of(p) if site.directory is not None else "no process table")
              for p in peers if p != rank and p not in reports]
    by_text: dict[str, list[int]] = {}
    for p, text in reports.items():
        by_text.setdefault(text, []).append(p)
    failed = [f"peer{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps))} failed too ({text})"
              for text, ps in by_text.items()]
    elsewhere = [] if store_problem else _silent_elsewhere(rank, site, peers)
    return CommError(rank, site, cause, elapsed,
                     silent + failed + elsewhere + ([store_problem] if store_problem else []))


def _silent_elsewhere(rank: int, site: CommSite, peers: Sequence[int]) -> list[str]:
    """Ranks of the expert-parallel group outside this exchange that have reported no failure and
    whose process is gone or not answering: the usual root cause when a peer failed too."""
    store, directory = _store(), site.directory
    if store is None or directory is None:
        return []
    notes = []
    try:
        for r in directory.ranks:
            if r == rank or r in peers or store.check([_KEY.format(r)]):
                continue
            state = directory.state_of(r)
            if "alive but" in state or "exited" in state:
                notes.append(f"rank {r} (not a peer of this exchange) reported nothing: {state}")
    except Exception:
        return notes
    return notes


@contextmanager
def guard(site: CommSite, started: Optional[float] = None) -> Iterator[None]:
    """Run collectives (issue or wait) under `site`: a RuntimeError they raise becomes a CommError.
    `started`: when the guarded operation began (default: now), for the elapsed time in the message."""
    t0 = time.monotonic() if started is None else started
    try:
        yield
    except CommError:
        raise
    except RuntimeError as exc:
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise describe_failure(rank, site, exc, t0) from exc


class GuardedWork:
    """A collective's work handle whose wait() raises CommError (naming `site`) on failure."""

    __slots__ = ("work", "site", "started")

    def __init__(self, work: Any, site: CommSite):
        self.work, self.site, self.started = work, site, time.monotonic()

    def wait(self, *args: Any) -> Any:
        with guard(self.site, self.started):
            return self.work.wait(*args)

    def is_completed(self) -> bool:
        return self.work.is_completed()




def group_site(phase: str, group: Any = None, **fields: Any) -> CommSite:
    """A site for a collective over every rank of `group` (barriers, reductions, agreements)."""
    return CommSite(phase=phase, group=group, group_peers=tuple(range(dist.get_world_size(group))), **fields)
