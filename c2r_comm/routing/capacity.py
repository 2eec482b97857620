"""Capacity mode: at most `capacity` of a rank's tokens per expert, Megatron-core's semantics.

Dropless routing (the default) sends every choice. With a capacity factor f, each rank keeps at
most C = ceil(T*k / E * f) of its T tokens per expert (Megatron's `get_capacity(T*k, E, f)`,
computed on the rank's local tokens as Megatron's router does) and drops the other choices:

- drop policy "probs": an expert keeps the C choices with the largest routing weight (ties: the
  earlier token), as Megatron's `apply_router_token_dropping(drop_policy="probs")`;
- drop policy "position": an expert keeps the first C tokens that chose it, in token order
  (Megatron's "position" takes a top-C of the 0/1 routing map, whose choice among ties torch does
  not specify; with equal weights, e.g. trace routing at 1/k, "probs" keeps the same choices).

A dropped choice becomes expert id DROPPED_CHOICE (-1) and weight 0: every dispatcher sends it
nowhere, and a token whose choices are all dropped gets a zero MoE output (the residual stream
carries it, as in Megatron). Remaining weights are not renormalised (Megatron does not either).
Padding to capacity (`pad_to_capacity`) is applied after the exchange (padded_experts.py): each
local expert gets exactly C x EP-size rows, so its GEMM shapes are fixed, and the zero padding
rows cost no bytes on the wire (Megatron sends real tokens with weight 0 instead).

Pure tensor code: two stable sorts and a scatter, no host sync; C comes from host shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from c2r_comm.config import DROP_POLICIES, RoutingConfig

DROPPED_CHOICE = -1  # the "no expert" id every dispatcher accepts (dispatch/base.py layout_for)


@dataclass(frozen=True)
class CapacitySpec:
    """Capacity mode of one MoE layer (RoutingConfig.capacity_factor / drop_policy / pad_to_capacity)."""

    capacity_factor: float
    drop_policy: str = "probs"
    pad_to_capacity: bool = False

    def __post_init__(self) -> None:
        f = self.capacity_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"capacity_factor={f!r} is invalid: allowed a finite number > 0")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={self.drop_policy!r} is invalid: allowed one of {DROP_POLICIES}")

    @classmethod
    def of(cls, routing: RoutingConfig) -> Optional["CapacitySpec"]:
        """The spec of a validated RoutingConfig; None when it is dropless."""
        if routing.capacity_factor is None:
            return None
        return cls(routing.capacity_factor, routing.drop_policy, routing.pad_to_capacity)

    def capacity(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        return expert_capacity(num_tokens, top_k, num_experts, self.capacity_factor)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one rank may send one expert: Megatron's get_capacity(num_tokens * top_k, E, factor)."""
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


@dataclass(frozen=True)
class CapacityDrop:
    """Routing after the capacity limit, and what it dropped (device tensors: no host sync)."""

    topk_idx_TK: torch.Tensor  # int64 [T, K]: kept expert ids, DROPPED_CHOICE where dropped
    topk_weight_TK: torch.Tensor  # [T, K]: the weights, zero where dropped (differentiable)
    kept_TK: torch.Tensor  # bool [T, K]
    routed_TK: torch.Tensor  # bool [T, K]: choices that named an expert before the limit
    capacity: int  # per expert, this rank

    @property
    def routed_choices(self) -> torch.Tensor:
        """int64 scalar: choices before the limit (those given as DROPPED_CHOICE not counted)."""
        return self.routed_TK.sum()

    @property
    def dropped_choices(self) -> torch.Tensor:
        """int64 scalar: (token, expert) choices the limit dropped."""
        return (self.routed_TK & ~self.kept_TK).sum()

    @property
    def dropped_tokens(self) -> torch.Tensor:
        """int64 scalar: tokens that had a choice and lost all of them (zero MoE output)."""
        return (self.routed_TK.any(1) & ~self.kept_TK.any(1)).sum()


def apply_capacity(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int,
                   spec: CapacitySpec) -> CapacityDrop:
    """Keep at most spec.capacity(T, K, E) choices per expert (see the module docstring).

    Expert ids must be distinct within a token (docs/routing.md), so an expert's choices are
    distinct tokens; choices already DROPPED_CHOICE stay dropped and take no capacity."""
    if topk_idx_TK.dim() != 2 or topk_weight_TK.shape != topk_idx_TK.shape or topk_idx_TK.is_floating_point():
        # Malformed input is the dispatcher's to refuse, on every rank at once: pass it through.
        routed = topk_idx_TK != DROPPED_CHOICE
        return CapacityDrop(topk_idx_TK, topk_weight_TK, routed, routed, 0)
    T, K = topk_idx_TK.shape
    device = topk_idx_TK.device
    capacity = spec.capacity(T, K, num_experts)
    routed_TK = topk_idx_TK != DROPPED_CHOICE
    # Ids out of range are never dropped here: they reach the layout, which makes every rank raise.
    in_range_TK = (topk_idx_TK >= 0) & (topk_idx_TK < num_experts)
    if capacity >= T:  # an expert can hold every token: nothing to drop
        kept_TK = routed_TK
    else:
        E = num_experts
        flat_e = torch.where(in_range_TK, topk_idx_TK, E).reshape(-1).long()  # the rest sort last
        if spec.drop_policy == "probs":  # by weight, descending; ties keep flat (token) order
            order = torch.sort(topk_weight_TK.detach().reshape(-1), descending=True, stable=True).indices
        else:  # "position": flat index order is token order (one choice per expert per token)
            order = torch.arange(T * K, device=device)
        order = order[torch.sort(flat_e[order], stable=True).indices]  # by expert, priority within
        e_sorted = flat_e[order]
        per_expert = torch.zeros(E + 1, dtype=torch.int64, device=device).index_add_(
            0, e_sorted, torch.ones_like(e_sorted))
        start = torch.cumsum(per_expert, 0) - per_expert  # first sorted position of each expert
        rank_in_expert = torch.arange(T * K, device=device) - start[e_sorted]
        keep_sorted = (rank_in_expert < capacity) & (e_sorted < E)
        kept_TK = torch.zeros(T * K, dtype=torch.bool, device=device).scatter_(0, order, keep_sorted).reshape(T, K)
        kept_TK = kept_TK | (routed_TK & ~in_range_TK)
    idx = torch.where(kept_TK, topk_idx_TK.long(), DROPPED_CHOICE)
    weight = topk_weight_TK * kept_TK.to(topk_weight_TK.dtype)
    return CapacityDrop(idx, weight, kept_TK, routed_TK, capacity)
