"""ExchangePlan: what one rank's tokens make every stage of one dispatch send, and to whom.

`Dispatcher.layout()` builds it with no communication. It is the source of rows and bytes: the
benchmark's totals come from every rank's plan combined (`world_traffic`, `traffic_stats`), and so
will the cost model's (`Dispatcher.layout_for` lays out any rank's tokens in one process). The
handle's CommStats classify the counts the dispatcher actually passed to its collectives;
tests/test_exchange_plan.py checks that they, the plans' world accounting and the rows and bytes
actually posted agree exactly. The traffic matrix of a stage holds rows[sender, receiver].

Traffic is attributed to the tokens' source rank: in the hierarchical dispatcher the rows a
forwarder sends inside its node on behalf of a rail peer are in that peer's plan, with the
forwarder as sender. Summed over ranks, that is exactly what each link carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from c2r_comm.topology import Topology


@dataclass(frozen=True)
class CommStats:
    """What one direction of one exchange sends, classified by link."""

    rows_local: int = 0  # kept on the sending rank (no link)
    rows_same_node: int = 0
    rows_cross_node: int = 0
    bytes_same_node: int = 0
    bytes_cross_node: int = 0
    messages_same_node: int = 0  # non-empty (sender, receiver) messages per link class
    messages_cross_node: int = 0

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.rows_local, self.rows_same_node, self.rows_cross_node, self.bytes_same_node,
                self.bytes_cross_node, self.messages_same_node, self.messages_cross_node)

    @property
    def rows_off_rank(self) -> int:
        return self.rows_same_node + self.rows_cross_node

    @property
    def bytes_off_rank(self) -> int:
        return self.bytes_same_node + self.bytes_cross_node


def stats_of_messages(messages: Iterable[tuple[int, int, int]], row_bytes: int, topology: Topology) -> CommStats:
    """Classify (sender, receiver, rows) messages by link (host ints); each (sender, receiver)
    pair appears at most once per stage, so every non-empty one is one message."""
    f = dict(rows_local=0, rows_same_node=0, rows_cross_node=0, bytes_same_node=0, bytes_cross_node=0,
             messages_same_node=0, messages_cross_node=0)
    for s, r, n in messages:
        if not n:
            continue
        if s == r:
            f["rows_local"] += n
            continue
        cls = "same_node" if topology.same_node(s, r) else "cross_node"
        f[f"rows_{cls}"] += n
        f[f"bytes_{cls}"] += n * row_bytes
        f[f"messages_{cls}"] += 1
    return CommStats(**f)


@dataclass(frozen=True)
class StageTraffic:
    """One stage of this rank's dispatch: rows into each destination rank, and who sends them."""

    name: str  # "all2all", "rail" (cross-node, hierarchical), "node" (fan-out inside a node)
    sender_of_dest: tuple[int, ...]  # [W] the rank that sends this rank's rows to destination d
    rows_to_W: torch.Tensor  # int64 [W] on the tokens' device
    dispatch_row_bytes: int  # bytes per row on the way out (token + whatever metadata travels)
    combine_row_bytes: int  # bytes per row on the way back (one partial / output row)


@dataclass(frozen=True)
class ExchangePlan:
    """Per call, per rank; dispatchers subclass it with the index maps their send phase needs."""

    dispatcher: str
    rank: int
    world_size: int
    num_tokens: int
    hidden_size: int
    top_k: int
    stages: tuple[StageTraffic, ...]
    counts_WC: torch.Tensor  # int64 [W, C]: what the count exchange sends each peer (device)
    status: torch.Tensor  # int64 [] on device: a StatusCode for this rank's input (0 = fine)
    status_detail: Optional[str | Callable[[], str]]  # message behind the status (callable: error path only)
    agree: tuple[int, ...]  # values every rank must share (top-k, dtype codes), checked by the count exchange

    def traffic(self) -> torch.Tensor:
        """int64 [stages, W, W] rows[sender, receiver] caused by this rank's tokens (host copy)."""
        W = self.world_size
        out = torch.zeros(len(self.stages), W, W, dtype=torch.int64)
        for i, st in enumerate(self.stages):
            out[i, torch.tensor(st.sender_of_dest), torch.arange(W)] = st.rows_to_W.cpu()
        return out


def world_traffic(plans: Sequence[ExchangePlan]) -> torch.Tensor:
    """Every rank's plan combined (same dispatcher and world): rows[stage, sender, receiver]."""
    return torch.stack([p.traffic() for p in plans]).sum(0)


def traffic_stats(rows_SWW: torch.Tensor, stages: Sequence[StageTraffic], topology: Topology,
                  sender: Optional[int] = None) -> tuple[CommStats, CommStats]:
    """(dispatch, combine) CommStats of a traffic matrix; combine sends every row back the other way.

    sender=None: all senders (world totals); else only what `sender` itself puts on its links.
    """
    dispatch, combine = CommStats(), CommStats()
    for i, st in enumerate(stages):
        s_idx, r_idx = rows_SWW[i].nonzero(as_tuple=True)
        pairs = [(s, r, n) for s, r, n in zip(s_idx.tolist(), r_idx.tolist(), rows_SWW[i][s_idx, r_idx].tolist())]
        dispatch = dispatch + stats_of_messages([m for m in pairs if sender in (None, m[0])],
                                                st.dispatch_row_bytes, topology)
        combine = combine + stats_of_messages([(r, s, n) for s, r, n in pairs if sender in (None, r)],
                                              st.combine_row_bytes, topology)
    return dispatch, combine
