"""topk_idx -> what is sent where: one row per distinct (token, destination group).

A group is a rank (flat dedup) or a node (hierarchical). Rows are ordered by destination, then
token, which is the order all_to_all_single splits and rail sends need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupLayout:
    """Source side: one row per distinct (token, destination group)."""

    token_of_row_R: torch.Tensor  # int64 [rows]
    group_of_row_R: torch.Tensor  # int64 [rows], non-decreasing
    member_RK: torch.Tensor  # bool [rows, k]: which of the token's k choices live in that group
    counts_G: torch.Tensor  # int64 [groups]: rows per destination group


def group_layout(topk_idx_TK: torch.Tensor, group_of_expert: torch.Tensor, num_groups: int) -> GroupLayout:
    T, K = topk_idx_TK.shape
    group_TK = group_of_expert[topk_idx_TK.long()]
    hit_GT = torch.zeros(num_groups, T, dtype=torch.bool, device=topk_idx_TK.device)
    hit_GT[group_TK.t().reshape(-1), torch.arange(T, device=topk_idx_TK.device).repeat(K)] = True
    group_of_row, token_of_row = hit_GT.nonzero(as_tuple=True)  # row-major: by group, then token
    member_RK = group_TK.index_select(0, token_of_row) == group_of_row.unsqueeze(1)
    return GroupLayout(token_of_row, group_of_row, member_RK, hit_GT.sum(1))


@dataclass(frozen=True)
class SlotExpansion:
    """Receiver side: received rows -> (row, choice) pairs grouped by local expert slot."""

    row_of_pair_P: torch.Tensor  # int64 [pairs]: received row each expert input comes from
    choice_of_pair_P: torch.Tensor  # int64 [pairs]: flat index row*K + k into the [rows, K] metadata
    tokens_per_expert: tuple[int, ...]


def expand_to_slots(slot_RK: torch.Tensor, num_local_experts: int) -> SlotExpansion:
    """slot_RK holds a local slot per (row, choice), -1 where that choice is not for this rank."""
    R, K = slot_RK.shape
    flat = slot_RK.reshape(-1).long()
    choice = (flat >= 0).nonzero(as_tuple=True)[0]
    slots = flat.index_select(0, choice)
    order = torch.sort(slots, stable=True).indices
    choice = choice.index_select(0, order)
    counts = torch.bincount(slots, minlength=num_local_experts) if slots.numel() else \
        torch.zeros(num_local_experts, dtype=torch.int64)
    return SlotExpansion(torch.div(choice, K, rounding_mode="floor"), choice, tuple(counts.tolist()))
