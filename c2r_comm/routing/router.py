"""Routers: logits -> (topk_idx_TK, topk_weight_TK), plus the auxiliary losses.

Every router returns a `RouterOutput`; weights keep their autograd graph back to the gate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterOutput:
    topk_idx_TK: torch.Tensor  # int64 [tokens, k]
    topk_weight_TK: torch.Tensor  # float [tokens, k], differentiable
    logits_TE: torch.Tensor  # float [tokens, experts]
    aux_loss: torch.Tensor  # scalar: weighted load-balancing + z-loss


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard: E * sum_e f_e * P_e, f_e = share of (token, slot) assignments to e, P_e = mean prob."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, topk_idx_TK.reshape(-1), torch.ones_like(topk_idx_TK.reshape(-1), dtype=probs_TE.dtype))
    f_E = counts_E / topk_idx_TK.numel()
    return E * (f_E.detach() * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """Softmax over all experts, then the k largest; optional renormalisation and gate noise."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True,
                 noise_std: float = 0.0, aux_loss_weight: float = 0.0, z_loss_weight: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in 1..num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.noise_std, self.aux_loss_weight, self.z_loss_weight = noise_std, aux_loss_weight, z_loss_weight
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = self.gate(x_TD).float()
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
        return logits_TE

    def select(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """Chosen experts [T, k] from softmax probabilities; subclasses constrain this."""
        return torch.topk(probs_TE, self.top_k, dim=-1).indices

    def route_logits(self, logits_TE: torch.Tensor) -> RouterOutput:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        idx_TK = self.select(probs_TE.detach())
        weight_TK = probs_TE.gather(1, idx_TK)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        aux = logits_TE.new_zeros(())
        if self.aux_loss_weight > 0:
            aux = aux + self.aux_loss_weight * load_balancing_loss(probs_TE, idx_TK)
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * router_z_loss(logits_TE)
        return RouterOutput(idx_TK, weight_TK, logits_TE, aux)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        return self.route_logits(self.compute_logits(x_TD))
