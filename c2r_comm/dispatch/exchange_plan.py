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
    # values every rank must share (top-k, dtype codes, needs grad), checked by the count exchange
    agree: tuple[int, ...]

    def traffic(self) -> torch.Tensor:
        """int64 [stages, W, W] rows[sender, receiver] caused by this rank's tokens (host copy)."""
        W = self.world_size
        return self.add_traffic_to(torch.zeros(len(self.stages), W, W, dtype=torch.int64))

    def add_traffic_to(self, rows_SWW: torch.Tensor) -> torch.Tensor:
        """rows_SWW += traffic(), in place (a whole world summed in one matrix); returns rows_SWW."""
        dest_W = torch.arange(self.world_size)
        for i, st in enumerate(self.stages):
            rows_SWW[i].index_put_((torch.tensor(st.sender_of_dest, dtype=torch.int64), dest_W),
                                   st.rows_to_W.cpu(), accumulate=True)
        return rows_SWW


def world_traffic(plans: Sequence[ExchangePlan]) -> torch.Tensor:
    """Every rank's plan combined (same dispatcher and world): rows[stage, sender, receiver]."""
    return torch.stack([p.traffic() for p in plans]).sum(0)


LINK_CLASSES = ("local", "same_node", "cross_node")


def link_class_WW(topology: Topology) -> torch.Tensor:
    """int64 [W, W]: LINK_CLASSES index of the link from rank u (row) to rank v (column)."""
    node_W = torch.arange(topology.world_size) // topology.gpus_per_node
    cls = torch.where(node_W.unsqueeze(1) == node_W.unsqueeze(0), 1, 2)
    cls.fill_diagonal_(0)
    return cls


@dataclass(frozen=True)
class StageLoad:
    """One stage of a world's traffic classified per link class (LINK_CLASSES order) and rank,
    dispatch direction; combine sends every row back (sent <-> received, combine_row_bytes).

        rows_sent[c, w]     = sum over receivers v of class c of rows[w, v]
        rows_recv[c, w]     = sum over senders   u of class c of rows[u, w]
        messages_sent[c, w] = #{v of class c, v != w : rows[w, v] > 0}      (local: always 0)
    """

    name: str  # "all2all", "rail", "node"
    dispatch_row_bytes: int
    combine_row_bytes: int
    rows_sent_CW: torch.Tensor  # int64 [3, W]
    rows_recv_CW: torch.Tensor  # int64 [3, W]
    messages_sent_CW: torch.Tensor  # int64 [3, W]
    messages_recv_CW: torch.Tensor  # int64 [3, W]

    @classmethod
    def of(cls, name: str, dispatch_row_bytes: int, combine_row_bytes: int, rows_WW: torch.Tensor,
           class_WW: torch.Tensor) -> "StageLoad":
        in_class_CWW = class_WW.unsqueeze(0) == torch.arange(len(LINK_CLASSES)).view(-1, 1, 1)
        rows_CWW = torch.where(in_class_CWW, rows_WW.unsqueeze(0), 0)
        msgs_CWW = in_class_CWW & (rows_WW > 0).unsqueeze(0)
        msgs_CWW[0] = False  # a local copy is no message
        return cls(name, dispatch_row_bytes, combine_row_bytes, rows_CWW.sum(2),
                   rows_CWW.sum(1), msgs_CWW.sum(2), msgs_CWW.sum(1))

    def direction(self, combine: bool) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row bytes, rows sent, rows received, messages sent, messages received) [3, W]."""
        if combine:
            return (self.combine_row_bytes, self.rows_recv_CW, self.rows_sent_CW, self.messages_recv_CW,
                    self.messages_sent_CW)
        return (self.dispatch_row_bytes, self.rows_sent_CW, self.rows_recv_CW, self.messages_sent_CW,
                self.messages_recv_CW)

    def stats(self, combine: bool, sender: Optional[int] = None) -> CommStats:
        """CommStats of what `sender` (None: every rank) sends in this stage, in one direction."""
        row_bytes, rows, _, msgs, _ = self.direction(combine)
        if sender is not None:
            rows, msgs = rows[:, sender:sender + 1], msgs[:, sender:sender + 1]
        local, same, cross = (int(x) for x in rows.sum(1))
        return CommStats(rows_local=local, rows_same_node=same, rows_cross_node=cross,
                         bytes_same_node=same * row_bytes, bytes_cross_node=cross * row_bytes,
                         messages_same_node=int(msgs[1].sum()), messages_cross_node=int(msgs[2].sum()))


def stage_loads(rows_SWW: torch.Tensor, stages: Sequence[StageTraffic], topology: Topology) -> tuple[StageLoad, ...]:
    class_WW = link_class_WW(topology)
    return tuple(StageLoad.of(st.name, st.dispatch_row_bytes, st.combine_row_bytes, rows_SWW[i], class_WW)
                 for i, st in enumerate(stages))


def traffic_stats(rows_SWW: torch.Tensor, stages: Sequence[StageTraffic], topology: Topology,
                  sender: Optional[int] = None) -> tuple[CommStats, CommStats]:
    """(dispatch, combine) CommStats of a traffic matrix; combine sends every row back the other way.

    sender=None: all senders (world totals); else only what `sender` itself puts on its links.
    """
    loads = stage_loads(rows_SWW, stages, topology)
    return (sum((ld.stats(False, sender) for ld in loads), CommStats()),
            sum((ld.stats(True, sender) for ld in loads), CommStats()))
