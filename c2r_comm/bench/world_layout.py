"""Every rank of a world laid out in one process: rows, bytes and messages per rank, stage and link.

`lay_out_world` runs `Dispatcher.layout_for` (the dispatchers' own layout, no communication) for
each rank and adds each plan's traffic into one rows[stage, sender, receiver] matrix
(`ExchangePlan.add_traffic_to`: a 1,024-rank world needs one [stages, W, W] matrix, not W of them).
The per-rank, per-link-class classification is the benchmark's own (`exchange_plan.StageLoad`,
behind `traffic_stats`), so `rank_stats(w)` equals `traffic_stats(rows, stages, topology, sender=w)`
and the dispatch handles' CommStats, and `world_stats()` the benchmark's `measure.world_stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from c2r_comm.dispatch import DISPATCHERS, CommStats, ExchangePlan
from c2r_comm.dispatch.exchange_plan import StageLoad, stage_loads
from c2r_comm.dispatch.layout import RankGeometry
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

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
    hosts = placement.host_tensors() if placement.replicas else (None, None)
    x_1D = torch.zeros(1, hidden_size, dtype=dtype)
    w_1K: Optional[torch.Tensor] = None
    rows_SWW: Optional[torch.Tensor] = None
    first: Optional[ExchangePlan] = None
    tokens = 0
    for r in range(W):
        idx_TK = torch.as_tensor(ids_of_rank(r), dtype=torch.int64)
        T, K = idx_TK.shape
        geo = RankGeometry(r, topology, placement.experts_per_rank, rank_E, slot_E, *hosts, placement.copy_load_cap)
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
        plan.add_traffic_to(rows_SWW)
        tokens += T
        if on_rank is not None:
            on_rank(r)
    return WorldLayout(dispatcher, topology, tokens, stage_loads(rows_SWW, first.stages, topology))
