"""Every rank of a world laid out in one process: rows, bytes and messages per rank, stage and link.

`lay_out_world` runs `Dispatcher.layout_for` (the dispatchers' own layout, no communication) for
each rank and adds each plan's stage traffic into one rows[stage, sender, receiver] matrix, exactly
what `ExchangePlan.traffic()` / `world_traffic` give (`add_traffic` is `traffic()` added in place,
so a 1,024-rank world needs one [stages, W, W] matrix instead of W of them). From it, per rank and
per link class ("local": kept on the rank, "same_node", "cross_node"):

    rows_sent[c, w]     = sum over receivers v of class c of rows[w, v]      (dispatch direction)
    rows_recv[c, w]     = sum over senders   u of class c of rows[u, w]
    messages_sent[c, w] = #{v of class c, v != w : rows[w, v] > 0}          (local: always 0)

Combine sends every dispatch row back the other way, so its sends are the dispatch receives (and
vice versa) with the stage's combine_row_bytes. `rank_stats(w)` classifies exactly like
`traffic_stats(rows, stages, topology, sender=w)` and the dispatch handles' CommStats; `world_stats()`
like `traffic_stats` over all senders (the benchmark's `measure.world_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from c2r_comm.dispatch import DISPATCHERS, CommStats, ExchangePlan
from c2r_comm.dispatch.layout import RankGeometry
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

LINK_CLASSES = ("local", "same_node", "cross_node")


def link_class_WW(topology: Topology) -> torch.Tensor:
    """int64 [W, W]: LINK_CLASSES index of the link from rank u (row) to rank v (column)."""
    node_W = torch.arange(topology.world_size) // topology.gpus_per_node
    same = node_W.unsqueeze(1) == node_W.unsqueeze(0)
    cls = torch.where(same, 1, 2)
    cls.fill_diagonal_(0)
    return cls


def add_traffic(plan: ExchangePlan, rows_SWW: torch.Tensor) -> None:
    """rows_SWW += plan.traffic(), in place (host int64 [stages, W, W])."""
    dest_W = torch.arange(plan.world_size)
    for i, st in enumerate(plan.stages):
        rows_SWW[i].index_put_((torch.tensor(st.sender_of_dest, dtype=torch.int64), dest_W),
                               st.rows_to_W.cpu(), accumulate=True)


@dataclass(frozen=True)
class StageLoad:
    """One stage of a world's dispatch, per link class (LINK_CLASSES order) and rank, dispatch direction."""

    name: str  # "all2all", "rail", "node"
    dispatch_row_bytes: int
    combine_row_bytes: int
    rows_sent_CW: torch.Tensor  # int64 [3, W]
    rows_recv_CW: torch.Tensor  # int64 [3, W]
    messages_sent_CW: torch.Tensor  # int64 [3, W] non-empty (sender, receiver) pairs; local row 0
    messages_recv_CW: torch.Tensor  # int64 [3, W]

    @classmethod
    def of(cls, name: str, dispatch_row_bytes: int, combine_row_bytes: int, rows_WW: torch.Tensor,
           class_WW: torch.Tensor) -> "StageLoad":
        sent, recv, msg_sent, msg_recv = [], [], [], []
        nonzero_WW = rows_WW > 0
        for c in range(len(LINK_CLASSES)):
            in_class = class_WW == c
            r = torch.where(in_class, rows_WW, 0)
            sent.append(r.sum(1))
            recv.append(r.sum(0))
            m = (nonzero_WW & in_class) if c else torch.zeros_like(in_class)  # a local copy is no message
            msg_sent.append(m.sum(1))
            msg_recv.append(m.sum(0))
        return cls(name, dispatch_row_bytes, combine_row_bytes, torch.stack(sent), torch.stack(recv),
                   torch.stack(msg_sent), torch.stack(msg_recv))

    def direction(self, combine: bool) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row bytes, rows sent, rows received, messages sent, messages received) [3, W] of the
        dispatch (combine=False) or combine direction (every row goes back: sent <-> received)."""
        if combine:
            return (self.combine_row_bytes, self.rows_recv_CW, self.rows_sent_CW, self.messages_recv_CW,
                    self.messages_sent_CW)
        return (self.dispatch_row_bytes, self.rows_sent_CW, self.rows_recv_CW, self.messages_sent_CW,
                self.messages_recv_CW)

    def stats(self, combine: bool, rank: Optional[int] = None) -> CommStats:
        """CommStats of what `rank` (None: every rank) sends in this stage, in one direction."""
        row_bytes, rows, _, msgs, _ = self.direction(combine)
        if rank is not None:
            rows, msgs = rows[:, rank:rank + 1], msgs[:, rank:rank + 1]
        local, same, cross = (int(x) for x in rows.sum(1))
        return CommStats(rows_local=local, rows_same_node=same, rows_cross_node=cross,
                         bytes_same_node=same * row_bytes, bytes_cross_node=cross * row_bytes,
                         messages_same_node=int(msgs[1].sum()), messages_cross_node=int(msgs[2].sum()))


@dataclass(frozen=True)
class WorldLayout:
    """What one dispatcher sends in one MoE layer call when every rank routes its tokens."""

    dispatcher: str
    topology: Topology
    tokens: int  # over all ranks
    stages: tuple[StageLoad, ...]  # in dispatch order

    def rank_stats(self, rank: int) -> tuple[CommStats, CommStats]:
        """(dispatch, combine) of what `rank` itself puts on its links (= its handle's CommStats)."""
        if not 0 <= rank < self.topology.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.topology.world_size - 1}")
        return (sum((s.stats(False, rank) for s in self.stages), CommStats()),
                sum((s.stats(True, rank) for s in self.stages), CommStats()))

    def world_stats(self) -> tuple[CommStats, CommStats]:
        """(dispatch, combine) over all ranks (= the benchmark's world accounting)."""
        return (sum((s.stats(False) for s in self.stages), CommStats()),
                sum((s.stats(True) for s in self.stages), CommStats()))

    def copies_per_token_off_rank(self) -> float:
        """Dispatch rows that leave their rank, per token (the bench table's column)."""
        return self.world_stats()[0].rows_off_rank / self.tokens if self.tokens else 0.0


def lay_out_world(dispatcher: str, topology: Topology, placement: PlacementPlan, hidden_size: int,
                  dtype: torch.dtype, ids_of_rank: Callable[[int], torch.Tensor],
                  on_rank: Optional[Callable[[int], None]] = None,
                  weight_dtype: Optional[torch.dtype] = None) -> WorldLayout:
    """Lay out every rank's tokens with `dispatcher` (no communication) and count the world's traffic.

    ids_of_rank(r) gives rank r's int64 [T_r, K] expert ids. The token rows (`dtype`) and routing
    weights (`weight_dtype`, default `dtype`: the layer casts its router to the model dtype; the
    bench's trace routing sends float32 weights) are zero-stride expansions of one row: the layout
    reads only their shapes and dtypes. on_rank(r) runs after rank r (progress).
    """
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher {dispatcher!r} is unknown: allowed {sorted(DISPATCHERS)}")
    W = topology.world_size
    placement.check_matches(placement.num_experts, W, what=f"topology {topology}")
    cls = DISPATCHERS[dispatcher]
    rank_E, slot_E = placement.rank_tensor(), placement.slot_tensor()
    x_1D = torch.zeros(1, hidden_size, dtype=dtype)
    w_1K: Optional[torch.Tensor] = None
    rows_SWW: Optional[torch.Tensor] = None
    first: Optional[ExchangePlan] = None
    tokens = 0
    for r in range(W):
        idx_TK = torch.as_tensor(ids_of_rank(r), dtype=torch.int64)
        T, K = idx_TK.shape
        geo = RankGeometry(r, topology, placement.experts_per_rank, rank_E, slot_E)
        if w_1K is None or w_1K.shape[1] != K:
            w_1K = torch.zeros(1, K, dtype=weight_dtype or dtype)
        plan = cls.layout_for(geo, hidden_size, x_1D.expand(T, hidden_size), idx_TK, w_1K.expand(T, K))
        if int(plan.status):
            detail = plan.status_detail() if callable(plan.status_detail) else plan.status_detail
            raise ValueError(f"rank {r}'s tokens cannot be laid out by {dispatcher}: {detail}")
        if rows_SWW is None:
            first = plan
            rows_SWW = torch.zeros(len(plan.stages), W, W, dtype=torch.int64)
        elif [(s.name, s.dispatch_row_bytes, s.combine_row_bytes) for s in plan.stages] != \
                [(s.name, s.dispatch_row_bytes, s.combine_row_bytes) for s in first.stages]:
            raise ValueError(f"{dispatcher}: rank {r}'s stages differ from rank 0's (different top-k per rank?)")
        add_traffic(plan, rows_SWW)
        tokens += T
        if on_rank is not None:
            on_rank(r)
    class_WW = link_class_WW(topology)
    stages = tuple(StageLoad.of(s.name, s.dispatch_row_bytes, s.combine_row_bytes, rows_SWW[i], class_WW)
                   for i, s in enumerate(first.stages))
    return WorldLayout(dispatcher, topology, tokens, stages)
