"""Communication failures that name the rank, the peers and the phase: CommError.

Every collective the runtime issues runs under a `CommSite` (layer, phase, direction, stage,
chunk, peers). A communication error raised by the collective or by waiting on it (a peer's
connection closed, a timeout: `torch.distributed.DistError` or a gloo/NCCL transport error)
becomes one `CommError` on that rank, naming:
  * this rank and the site (e.g. "combine forward, intra-node stage, layer 3, chunk 1");
  * the peers it was exchanging with, and for each peer that did not itself report a failure what
    is known of it: its process exited (same host: /proc), it is alive but not answering (a stall),
    or it is on another host;
  * the peers that did report a failure, with their own site (so a chain of failures points back
    to the peer that started it), and silent ranks elsewhere in the group.
Other errors (out of memory, a CUDA kernel error, a bug) pass through unchanged.

Reports travel through the rendezvous store (the key-value store every launcher provides; bench's
own launcher and torchrun host it outside the ranks, so it outlives any rank): a failing rank
appends one line to a shared key and re-reads that key until every live peer has reported or
`REPORT_WAIT_S` has passed. Each rank leaves its host and pid in the store when its process groups
are built (`PeerDirectory.publish`, one store write, no collective). All of this is the failure
path: a healthy call only enters a `guard` and wraps its work handles.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from c2r_comm.launch_env import EXIT_COMM_ERROR, REPORT_WAIT_S  # noqa: F401  (the launcher reads them there)

_REPORTS_KEY = "c2r_comm/failures"  # one line per failing rank: "<rank>\t<site>: <cause>"
_PROCESS_KEY = "c2r_comm/process/{}"  # "<host> <pid>" per global rank


def _store() -> Optional[Any]:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a backend without a store
        return None


@dataclass(frozen=True)
class PeerDirectory:
    """Host and pid of some global ranks, read from the store on the failure path, so a failing
    rank can tell a peer that exited from one that stalls."""

    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    pids: tuple[int, ...]

    @staticmethod
    def publish() -> None:
        """Leave this rank's host and pid in the store (set-up; one store write, no collective)."""
        store = _store()
        if store is not None and dist.is_initialized():
            store.set(_PROCESS_KEY.format(dist.get_rank()), f"{socket.gethostname()} {os.getpid()}")

    @staticmethod
    def from_store(store: Any, ranks: Sequence[int]) -> "PeerDirectory":
        """The entries of `ranks` that published one. Usually two store requests whatever the world
        size (a check of every key, then one multi_get: on the failure path every survivor reads
        them at once); when some rank never published (it died in set-up), a check per key and one
        multi_get of the keys found (a get per key where the store has no multi_get)."""
        keys = [_PROCESS_KEY.format(r) for r in ranks]
        present = list(zip(ranks, keys)) if keys and store.check(keys) else \
            [(r, k) for r, k in zip(ranks, keys) if store.check([k])]
        if not present:
            values = []
        elif hasattr(store, "multi_get"):
            values = list(zip([r for r, _ in present], store.multi_get([k for _, k in present])))
        else:
            values = [(r, store.get(k)) for r, k in present]
        found = [(r, *v.decode().rsplit(" ", 1)) for r, v in values]  # (rank, host, pid)
        return PeerDirectory(tuple(r for r, _, _ in found), tuple(h for _, h, _ in found),
                             tuple(int(pid) for _, _, pid in found))

    def state_of(self, rank: int) -> str:
        """What is known of global rank `rank`'s process from here (Linux /proc; same host only)."""
        if rank not in self.ranks:
            return "no process entry"
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
        return f"its process (pid {pid}) is alive"


@dataclass(frozen=True)
class CommSite:
    """Where a collective runs: what the error names."""

    phase: str = "collective"  # dispatch | combine | count exchange | set-up | ...
    direction: str = "forward"  # forward | backward
    stage: Optional[str] = None  # all2all | cross-node | intra-node | count exchange
    layer: Optional[str] = None  # e.g. "layer 3"
    chunk: Optional[int] = None  # pipeline chunk
    group: Any = None  # the process group (None: the default group)
    group_peers: tuple[int, ...] = ()  # ranks within `group`; turned into global ranks only on failure

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


def group_site(phase: str, group: Any = None, **fields: Any) -> CommSite:
    """A site for a collective over every rank of `group` (barriers, reductions, agreements)."""
    return CommSite(phase=phase, group=group, group_peers=tuple(range(dist.get_world_size(group))), **fields)


class CommError(RuntimeError):
    """A collective failed; the message names this rank, the site, the peers and what became of them."""

    def __init__(self, rank: int, site: CommSite, cause: str, elapsed_s: float, peer_notes: Sequence[str]):
        self.rank, self.site, self.cause, self.elapsed_s = rank, site, cause, elapsed_s
        self.peer_notes = tuple(peer_notes)
        peers = f" with peers {list(site.peers)}" if site.peers else ""
        notes = "; ".join(peer_notes) if peer_notes else "no peer information"
        super().__init__(f"rank {rank}: {site.describe()}{peers} failed after {elapsed_s:.1f} s: {cause}. {notes}")

    def __reduce__(self):  # picklable (multiprocessing queues): rebuilt as a plain RuntimeError text
        return RuntimeError, (f"CommError: {self}",)


_TRANSPORT_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "socket", "peer")


def is_comm_failure(exc: BaseException) -> bool:
    """A communication failure (to name), not an out-of-memory, kernel or programming error (to pass on)."""
    if isinstance(exc, dist.DistError):
        return True
    if isinstance(exc, torch.OutOfMemoryError) or type(exc).__name__ == "AcceleratorError":
        return False
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _TRANSPORT_WORDS)


def _cause(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return "timed out waiting for a peer (the process group's timeout)"
    if any(w in low for w in ("closed by peer", "reset by peer", "broken pipe", "connection refused")):
        return "a peer's connection closed"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def _read_reports(store: Any) -> dict[int, str]:
    reports = {}
    for line in store.get(_REPORTS_KEY).decode(errors="replace").splitlines():
        rank, _, text = line.partition("\t")
        if rank.isdigit():
            reports.setdefault(int(rank), text)
    return reports


def _exchange_reports(store: Any, rank: int, site: CommSite, cause: str, waiting_for: set[int],
                      exited: set[int]) -> dict[int, str]:
    """Append this rank's report; re-read the shared key (one request per poll, backing off) until
    every peer in `waiting_for` that has not exited reported, or REPORT_WAIT_S passed."""
    store.append(_REPORTS_KEY, f"{rank}\t{site.describe()}: {cause}\n")
    deadline, pause = time.monotonic() + REPORT_WAIT_S, 0.02
    while True:
        reports = _read_reports(store)
        if not (waiting_for - exited - set(reports)) or time.monotonic() >= deadline:
            return reports
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.4)


def describe_failure(rank: int, site: CommSite, exc: BaseException, started: float) -> CommError:
    """Compare notes with the peers through the store (failure path) and build the CommError."""
    elapsed, cause, peers = time.monotonic() - started, _cause(exc), site.peers
    others = [p for p in peers if p != rank]
    store, reports, store_problem, directory = _store(), {}, None, PeerDirectory((), (), ())
    if store is None:
        store_problem = "no rendezvous store to compare notes with"
    else:
        previous = store.timeout
        try:
            store.set_timeout(timedelta(seconds=REPORT_WAIT_S))
            directory = PeerDirectory.from_store(store, others)
            exited = {p for p in others if "exited" in directory.state_of(p)}
            reports = _exchange_reports(store, rank, site, cause, set(others), exited)
        except Exception as err:  # the store's host may be gone too
            store_problem = f"the rendezvous store is unreachable too ({_cause(err)})"
        finally:
            try:
                store.set_timeout(previous)
            except Exception:
                pass
    silent = [f"peer {p} reported nothing: {_state(directory, p, store_problem is None)}"
              for p in others if p not in reports]
    by_text: dict[str, list[int]] = {}
    for p in others:
        if p in reports:
            by_text.setdefault(reports[p], []).append(p)
    failed = [f"peer{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps))} failed too ({text})"
              for text, ps in by_text.items()]
    elsewhere = [] if store_problem or not silent and not failed else _silent_elsewhere(store, rank, peers, reports)
    return CommError(rank, site, cause, elapsed, silent + failed + elsewhere + ([store_problem] if store_problem else []))


def _state(directory: PeerDirectory, rank: int, reports_work: bool) -> str:
    """What is known of a peer that reported no failure. With the store working, a live peer that
    did not report within REPORT_WAIT_S is not answering (stalled, or blocked on yet another peer)."""
    state = directory.state_of(rank)
    if reports_work and state.endswith("is alive"):
        return state + " but not answering (stalled or blocked elsewhere)"
    return state


def _silent_elsewhere(store: Any, rank: int, peers: Sequence[int], reports: dict[int, str]) -> list[str]:
    """Ranks outside this exchange that reported no failure and whose process is gone or not
    answering: the usual root cause when the peers of this exchange failed too."""
    if not dist.is_initialized() or not any(p in reports for p in peers):
        return []
    try:
        world = dist.get_world_size()
        outside = [r for r in range(world) if r != rank and r not in peers and r not in reports]
        directory = PeerDirectory.from_store(store, outside)
    except Exception:
        return []
    notes = []
    for r in outside:
        state = _state(directory, r, True)
        if "alive but" in state or "exited" in state:
            notes.append(f"rank {r} (not a peer of this exchange) reported nothing: {state}")
    return notes


SiteSource = Union[CommSite, Callable[[], CommSite]]


class guard:
    """`with guard(site):` around collectives (issue or wait): a communication error they raise
    becomes a CommError naming `site` (a CommSite, or a function making one on the failure path).
    `started`: when the guarded operation began (default: now), for the elapsed time in the message."""

    __slots__ = ("site", "started", "rank")

    def __init__(self, site: SiteSource, started: Optional[float] = None, rank: Optional[int] = None):
        """rank: this process's global rank when the default group does not exist yet (rendezvous)."""
        self.site, self.started, self.rank = site, time.monotonic() if started is None else started, rank

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, CommError) or not is_comm_failure(exc):
            return False
        site = self.site() if callable(self.site) else self.site
        rank = dist.get_rank() if dist.is_initialized() else (-1 if self.rank is None else self.rank)
        raise describe_failure(rank, site, exc, self.started) from exc


class GuardedWork:
    """A collective's work handle whose wait() raises CommError (naming the site) on failure."""

    __slots__ = ("work", "site", "started")

    def __init__(self, work: Any, site: SiteSource):
        self.work, self.site, self.started = work, site, time.monotonic()

    def wait(self, *args: Any) -> Any:
        with guard(self.site, self.started):
            return self.work.wait(*args)

    def is_completed(self) -> bool:
        return self.work.is_completed()
