"""Routers: logits -> (topk_idx_TK, topk_weight_TK), plus the auxiliary losses.

Every router returns a `RouterOutput`; weights keep their autograd graph back to the gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from c2r_comm.config import check_top_t


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


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32 for routing math; float32 and float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(_at_least_float32(logits_TE), dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """Softmax over all experts, then the k largest; optional renormalisation and gate noise."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True,
                 noise_std: float = 0.0, aux_loss_weight: float = 0.0, z_loss_weight: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        """generator: draw the gate's initial weights from it alone (torch's global RNG is left as it was),
        with nn.Linear's default distribution U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)); None: nn.Linear's
        own init from the global RNG."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in 1..num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.noise_std, self.aux_loss_weight, self.z_loss_weight = noise_std, aux_loss_weight, z_loss_weight
        if generator is None:
            self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        else:
            self.gate = nn.utils.skip_init(nn.Linear, hidden_size, num_experts, bias=False)  # no global draws
            bound = 1.0 / math.sqrt(hidden_size)
            with torch.no_grad():
                self.gate.weight.uniform_(-bound, bound, generator=generator)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = _at_least_float32(self.gate(x_TD))
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


def check_collaborators(collaborators_ET: torch.Tensor, num_experts: int, top_k: int, top_t: int) -> torch.Tensor:
    """Validate one layer's collaborator lists; return the first `top_t` columns as int64 [E, top_t].

    Lists are ordered strongest partner first, so a longer profiled list serves any smaller T.
    """
    c = torch.as_tensor(collaborators_ET)
    if c.dtype.is_floating_point or c.dtype == torch.bool or c.dtype.is_complex:
        raise ValueError(f"collaborator lists must hold integer expert ids, got dtype {c.dtype}")
    if c.ndim != 2 or c.shape[0] != num_experts:
        raise ValueError(f"collaborator lists must have shape [num_experts={num_experts}, >= top_t], "
                         f"got {tuple(c.shape)}")
    top_t = check_top_t(top_t, num_experts, top_k)
    if c.shape[1] < top_t:
        raise ValueError(f"collaborator lists have {c.shape[1]} partners per expert, fewer than top_t = {top_t}")
    c = c[:, :top_t].long().cpu()
    if c.numel() and (c.min() < 0 or c.max() >= num_experts):
        raise ValueError(f"collaborator ids must lie in 0..{num_experts - 1}, found {int(c.min())}..{int(c.max())}")
    self_hit = (c == torch.arange(num_experts)[:, None]).any(1)
    if self_hit.any():
        raise ValueError(f"a collaborator list includes the expert itself (experts "
                         f"{self_hit.nonzero().flatten().tolist()[:8]}); Top-T lists exclude self")
    dup = (c.sort(1).values.diff(dim=1) == 0).any(1)
    if dup.any():
        raise ValueError(f"collaborator lists repeat a partner (experts {dup.nonzero().flatten().tolist()[:8]})")
    return c


class C2RRouter(TopKRouter):
    """C2R: top-1 from the full softmax, the other k-1 only among Top-T(top-1) collaborators.

    Weights are the full-softmax probabilities of the chosen experts (optionally renormalised),
    gathered in `route_logits`, so gradients flow exactly as in TopKRouter. With T = E-1 every
    other expert is a candidate and the choice equals plain top-k.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, collaborators_ET: torch.Tensor,
                 top_t: int, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.top_t = int(top_t)
        self.register_buffer("collaborators_ET", check_collaborators(collaborators_ET, num_experts, top_k, top_t),
                             persistent=False)

    def select(self, probs_TE: torch.Tensor) -> torch.Tensor:
        top1_T1 = torch.topk(probs_TE, 1, dim=-1).indices
        cand_TT = self.collaborators_ET[top1_T1[:, 0]]
        best_pos = torch.topk(probs_TE.gather(1, cand_TT), self.top_k - 1, dim=-1).indices
        return torch.cat([top1_T1, cand_TT.gather(1, best_pos)], dim=1)


class DeviceConstrainedRouter(TopKRouter):
    """Occult-style: at most `max_groups` GPUs (or nodes) per token.

    Walk the plain top-k in score order, keep the first `max_groups` groups it touches, then take
    the best k experts hosted on those groups. If top-k already fits, the result is top-k.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, group_of_expert: torch.Tensor,
                 max_groups: int, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        g = torch.as_tensor(group_of_expert).long().cpu()
        if g.shape != (num_experts,):
            raise ValueError(f"group_of_expert must have shape [num_experts={num_experts}], got {tuple(g.shape)}")
        if g.min() < 0:
            raise ValueError(f"group ids must be >= 0, found {int(g.min())}")
        self.num_groups = int(g.max()) + 1
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        # The worst case freezes the max_groups smallest groups; they must still hold k experts.
        smallest = torch.bincount(g, minlength=self.num_groups).sort().values[:max_groups].sum()
        if smallest < top_k:
            raise ValueError(f"max_groups = {max_groups} groups may hold only {int(smallest)} experts, fewer than "
                             f"top_k = {top_k}: allowed max_groups with at least top_k experts on them")
        self.max_groups = int(max_groups)
        self.register_buffer("group_of_expert", g, persistent=False)

    def select(self, probs_TE: torch.Tensor) -> torch.Tensor:
        topk_TK = torch.topk(probs_TE, self.top_k, dim=-1).indices  # score order
        g_TK = self.group_of_expert[topk_TK]
        K = self.top_k
        earlier_KK = torch.ones(K, K, dtype=torch.bool, device=probs_TE.device).tril(-1)
        seen_before_TK = ((g_TK[:, :, None] == g_TK[:, None, :]) & earlier_KK).any(-1)
        first_TK = ~seen_before_TK
        keep_TK = first_TK & (first_TK.cumsum(1) <= self.max_groups)
        kept_TG = torch.zeros(probs_TE.shape[0], self.num_groups, dtype=torch.long, device=probs_TE.device)
        kept_TG.scatter_add_(1, g_TK, keep_TK.long())
        allowed_TE = (kept_TG > 0)[:, self.group_of_expert]
        # Probabilities are >= 0, so -1 ranks every disallowed expert below every allowed one.
        return torch.topk(probs_TE.masked_fill(~allowed_TE, -1.0), K, dim=-1).indices
