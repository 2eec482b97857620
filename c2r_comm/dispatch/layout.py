"""Sync-free layout primitives: which rows a rank sends, and how a receiver groups them by expert.

Everything here is pure tensor code with shapes fixed by the input (no `.tolist()`, `.item()` or
`nonzero`), so on a GPU it queues kernels without stalling the stream. Data-dependent sizes (how
many rows are real) are only needed later, after the count exchange, which is the one host sync
of a dispatch; until then row tensors are padded to T*K with sentinel rows sorted last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from c2r_comm.counting import bucket_counts
from c2r_comm.placement.replica_choice import choose_copies
from c2r_comm.dispatch.row_sum import RowSum, sources_by_destination
from c2r_comm.plan import PlacementPlan
from c2r_comm.routing.capacity import DROPPED_CHOICE  # an expert id that routes a choice nowhere
from c2r_comm.topology import Topology


def valid_choices(topk_idx_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [T, K] choices that go to an expert, the ids with dropped choices as expert 0 so they
    can index the expert maps): layouts mask everything they derive from the second by the first."""
    valid_TK = topk_idx_TK != DROPPED_CHOICE
    return valid_TK, topk_idx_TK.clamp_min(0)


def first_choice_mask(group_TK: torch.Tensor) -> torch.Tensor:
    """bool [T, K]: True where no earlier choice of the token lands in the same group."""
    same_TKK = group_TK.unsqueeze(2) == group_TK.unsqueeze(1)  # [t, k, j]: choice k and j share a group
    return ~same_TKK.tril(-1).any(2)  # kept where j < k


def distinct_counts(group_TK: torch.Tensor, num_groups: int, valid_TK: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [num_groups]: distinct (token, group) pairs per group, i.e. rows a dedup sends each group."""
    if valid_TK is not None:  # invalid choices get their own group so they shadow no valid one
        group_TK = torch.where(valid_TK, group_TK, num_groups)
    first = first_choice_mask(group_TK)
    if valid_TK is not None:
        first = first & valid_TK
    return bucket_counts(group_TK, num_groups, first)


@dataclass(frozen=True)
class GroupRows:
    """Source side: one row per distinct (token, destination group), padded to T*K.

    Real rows come first, ordered by group then token (the order all_to_all splits need); the
    `counts_G.sum()` real rows are followed by sentinel rows (group = num_groups, member all False).
    """

    token_of_row_R: torch.Tensor  # int64 [T*K]
    group_of_row_R: torch.Tensor  # int64 [T*K], non-decreasing
    member_RK: torch.Tensor  # bool [T*K, K]: which of the token's k choices live in that group
    counts_G: torch.Tensor  # int64 [groups]: real rows per destination group
    # The real rows in token order (then padding), and rows per token: the structure of summing
    # rows back into their tokens (row_sum.RowSum); the real rows first, ascending within a token.
    row_by_token_R: Optional[torch.Tensor]  # int64 [T*K] (None: with_token_order=False)
    rows_per_token_T: Optional[torch.Tensor]  # int64 [T]


def group_rows(group_TK: torch.Tensor, num_groups: int, valid_TK: torch.Tensor | None = None,
               with_token_order: bool = True) -> GroupRows:
    """Rows for the distinct (token, group) pairs of group_TK (int64 [T, K] in 0..num_groups-1).

    Choices with valid_TK False (e.g. 'not on this node') make no row and are never members.
    with_token_order=False skips row_by_token_R / rows_per_token_T (left None) for callers that
    never sum rows back into tokens.
    """
    T, K = group_TK.shape
    device = group_TK.device
    if valid_TK is not None:  # invalid choices get their own group so they shadow no valid one
        group_TK = torch.where(valid_TK, group_TK, num_groups)
    first = first_choice_mask(group_TK)
    if valid_TK is not None:
        first = first & valid_TK
    stride = max(T, 1)
    token_TK = torch.arange(T, device=device).unsqueeze(1).expand(T, K)
    key = torch.where(first, group_TK * stride + token_TK, num_groups * stride).reshape(-1)
    key, choice_of_row = torch.sort(key)  # keys of real rows are distinct: no stability needed
    group_of_row = torch.div(key, stride, rounding_mode="floor")
    token_of_row = key - group_of_row * stride
    member_RK = group_TK.index_select(0, token_of_row) == group_of_row.unsqueeze(1) if T else \
        torch.zeros(0, K, dtype=torch.bool, device=device)
    counts = bucket_counts(group_of_row, num_groups + 1)[:num_groups]
    if not with_token_order:
        return GroupRows(token_of_row, group_of_row, member_RK, counts, None, None)
    # Real rows in token order: each token's first choices, replaced by their rows (ascending).
    row_of_choice = torch.empty_like(choice_of_row).scatter_(0, choice_of_row, torch.arange(T * K, device=device))
    row_by_token, rows_per_token = sources_by_destination(row_of_choice.reshape(T, K), first, T * K)
    return GroupRows(token_of_row, group_of_row, member_RK, counts, row_by_token, rows_per_token)


@dataclass(frozen=True)
class SlotPairs:
    """Receiver side: received rows -> (row, choice) pairs grouped by local expert slot."""

    row_of_pair_P: torch.Tensor  # int64 [pairs]: received row each expert input comes from
    choice_of_pair_P: torch.Tensor  # int64 [pairs]: flat index row*K + k into the [rows, K] metadata
    # The pairs in received-row order and pairs per row: the structure of summing expert outputs
    # back into one partial per received row (row_sum.RowSum), ascending within a row.
    pair_by_row_P: Optional[torch.Tensor]  # int64 [pairs] (None: with_row_order=False)
    pairs_per_row_R: Optional[torch.Tensor]  # int64 [rows]
    num_rows: int  # received rows

    def row_sum(self, dtype: torch.dtype) -> "RowSum":
        """Sum of expert rows into their received rows (combine; dispatch's backward)."""
        return RowSum.build(self.row_of_pair_P, self.num_rows, dtype, self.pair_by_row_P, self.pairs_per_row_R)


def pairs_by_slot(slot_RK: torch.Tensor, num_local_experts: int, num_pairs: int,
                  with_row_order: bool = True) -> SlotPairs:
    """slot_RK: a local slot per (row, choice), anything outside 0..L-1 where that choice is not here.

    `num_pairs` (known from the count exchange) is how many choices are real; one stable sort
    groups them by slot, keeping arrival order inside a slot. with_row_order=False skips
    pair_by_row_P / pairs_per_row_R (left None) where the row sums will not be CSR products.
    """
    R, K = slot_RK.shape
    flat = slot_RK.reshape(-1).long()
    here = (flat >= 0) & (flat < num_local_experts)
    key = torch.where(here, flat, num_local_experts)
    order = torch.sort(key, stable=True).indices
    choice = order[:num_pairs]
    row_of_pair = torch.div(choice, max(K, 1), rounding_mode="floor")
    if not with_row_order:
        return SlotPairs(row_of_pair, choice, None, None, R)
    # Each row's pairs (ascending), from the pair position of every (row, k) choice.
    pair_of_choice = torch.empty_like(order).scatter_(0, order, torch.arange(R * K, device=order.device))
    pair_by_row, pairs_per_row = sources_by_destination(pair_of_choice.reshape(R, K), here.reshape(R, K), num_pairs)
    return SlotPairs(row_of_pair, choice, pair_by_row, pairs_per_row, R)


def expert_offsets(pairs_per_slot_L: torch.Tensor) -> torch.Tensor:
    """int32 [L] cumulative end offset of each slot's rows (what grouped GEMMs take), on device."""
    return torch.cumsum(pairs_per_slot_L, 0).to(torch.int32)


@dataclass(frozen=True)
class RankGeometry:
    """What a layout needs to know about one rank: pure data, no process group. The dispatcher
    builds its own; accounting and the cost model build one per rank to lay out a whole world."""

    rank: int
    topology: Topology
    num_local_experts: int
    rank_of_expert_E: torch.Tensor  # int64 [E] on the layout's device: the primary copy
    slot_of_expert_E: torch.Tensor  # int64 [E]
    # With replicas: every copy of each expert, [E, H] ranks and slots (plan.host_tensors); None: one copy
    host_rank_EH: Optional[torch.Tensor] = None
    host_slot_EH: Optional[torch.Tensor] = None
    copy_load_cap: Optional[float] = None  # plan.copy_load_cap: the copy choice's per-batch load cap

    @classmethod
    def of(cls, rank: int, topology: Topology, placement: PlacementPlan, device: torch.device | str = "cpu") -> "RankGeometry":
        hosts = placement.host_tensors(device) if placement.replicas else (None, None)
        return cls(rank, topology, placement.experts_per_rank, placement.rank_tensor(device),
                   placement.slot_tensor(device), *hosts, placement.copy_load_cap)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def copies(self, idx_TK: torch.Tensor, valid_TK: torch.Tensor, by_node: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank_TK, slot_TK) each choice is sent to: its expert's only copy, or with replicas the
        copies that reach the token's experts with the fewest other ranks (other nodes first with
        by_node), balanced up to the plan's copy_load_cap (placement/replica_choice.py)."""
        if self.host_rank_EH is None:
            return self.rank_of_expert_E[idx_TK], self.slot_of_expert_E[idx_TK]
        return choose_copies(idx_TK, valid_TK, self.host_rank_EH, self.host_slot_EH, self.world_size,
                             self.topology.gpus_per_node, self.rank, by_node, self.copy_load_cap)
