"""Grouped local experts (SwiGLU) laid out in the plan's local slots; zero-token safe.

Weights are initialised per *global* expert id from (seed, expert id), so the same expert has the
same weights wherever a plan puts it: placement never changes results.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from c2r_comm.plan import PlacementPlan


def init_expert_weights(expert_id: int, hidden_size: int, ffn_size: int, seed: int,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_gate [D, F], w_up [D, F], w_down [F, D]) of one global expert, deterministic."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + expert_id)
    w_gate = torch.randn(hidden_size, ffn_size, generator=g) / math.sqrt(hidden_size)
    w_up = torch.randn(hidden_size, ffn_size, generator=g) / math.sqrt(hidden_size)
    w_down = torch.randn(ffn_size, hidden_size, generator=g) / math.sqrt(ffn_size)
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)


def swiglu(x_ND: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor) -> torch.Tensor:
    return (F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD


class GroupedExperts(nn.Module):
    """The experts of one rank: w_gate_LDF, w_up_LDF, w_down_LFD indexed by local slot."""

    def __init__(self, global_ids: Sequence[int], hidden_size: int, ffn_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.global_ids = tuple(int(e) for e in global_ids)
        weights = [init_expert_weights(e, hidden_size, ffn_size, seed, dtype) for e in self.global_ids]
        stack = lambda i: nn.Parameter(torch.stack([w[i] for w in weights]).to(device))  # noqa: E731
        self.w_gate_LDF, self.w_up_LDF, self.w_down_LFD = stack(0), stack(1), stack(2)

    @classmethod
    def for_rank(cls, plan: PlacementPlan, rank: int, hidden_size: int, ffn_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "GroupedExperts":
        return cls(plan.rank_experts[rank], hidden_size, ffn_size, seed, dtype, device)

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    def forward(self, x_PD: torch.Tensor, tokens_per_expert: Sequence[int]) -> torch.Tensor:
        """Rows grouped by local slot (counts in tokens_per_expert) -> outputs in the same order."""
        if len(tokens_per_expert) != self.num_local_experts or sum(tokens_per_expert) != x_PD.shape[0]:
            raise ValueError(f"tokens_per_expert {list(tokens_per_expert)} does not match {self.num_local_experts} "
                             f"local experts and {x_PD.shape[0]} rows")
        chunks = torch.split(x_PD, list(tokens_per_expert))
        # Empty chunks still run (a [0, D] matmul), so every weight gets a (zero) gradient.
        outs = [swiglu(c, self.w_gate_LDF[i], self.w_up_LDF[i], self.w_down_LFD[i]) for i, c in enumerate(chunks)]
        return torch.cat(outs) if outs else x_PD.new_zeros(0, x_PD.shape[1])


class SharedExpert(nn.Module):
    """Dense SwiGLU every token goes through (DeepSeek / Qwen shared experts); no communication."""

    def __init__(self, hidden_size: int, ffn_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        w = init_expert_weights(-1, hidden_size, ffn_size, seed, dtype)  # id -1: never a routed expert
        self.w_gate_DF, self.w_up_DF, self.w_down_FD = (nn.Parameter(t) for t in w)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)


def reference_moe(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                  experts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Single-process MoE: out[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]). For tests and checks."""
    out = x_TD.new_zeros(x_TD.shape)
    for e, (wg, wu, wd) in enumerate(experts):
        t, k = (topk_idx_TK == e).nonzero(as_tuple=True)
        if t.numel():
            out = out.index_add(0, t, swiglu(x_TD[t], wg, wu, wd) * topk_weight_TK[t, k].unsqueeze(1))
    return out
