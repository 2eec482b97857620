"""Per-rank MoE cases compared against a single-process reference (used by the dispatcher tests).

Every rank regenerates every rank's inputs from the seed, so each rank can compute the reference
for the whole world (expert-weight gradients sum over all ranks' tokens) without communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from c2r_comm.dispatch import build_dispatcher
from c2r_comm.experts import GroupedExperts, init_expert_weights, reference_moe
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class Case:
    dispatcher: str
    nodes: int = 1
    gpus_per_node: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden: int = 8
    ffn: int = 12
    tokens: tuple[int, ...] = ()  # per rank; empty = 6 each
    plan: str = "contiguous"  # contiguous | random
    routing: str = "random"  # random | subset (half the experts unused) | single (every token the same experts)
    seed: int = 0
    weights_at_experts: bool = False  # experts apply ExpertBatch.weight_P, combine(weighted=True)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def tokens_of(self, rank: int) -> int:
        return self.tokens[rank] if self.tokens else 6


def rank_inputs(case: Case, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_TD, topk_idx_TK, topk_weight_TK, upstream grad g_TD) of `rank`, float64 for tight checks."""
    g = torch.Generator().manual_seed(1000 * case.seed + rank)
    T, E, K = case.tokens_of(rank), case.num_experts, case.top_k
    x = torch.randn(T, case.hidden, generator=g, dtype=torch.float64)
    pool = {"random": E, "subset": max(K, E // 2), "single": E}[case.routing]
    idx = torch.argsort(torch.rand(T, pool, generator=g), dim=1)[:, :K]
    if case.routing == "single":  # every token picks the same experts (expert 3 when K == 1)
        idx = ((torch.arange(K) + 3) % E).expand(T, K).clone()
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    grad = torch.randn(T, case.hidden, generator=g, dtype=torch.float64)
    return x, idx, w, grad


def make_plan(case: Case) -> PlacementPlan:
    if case.plan == "random":
        return PlacementPlan.random(case.num_experts, case.world, seed=case.seed + 7)
    return PlacementPlan.contiguous(case.num_experts, case.world)


def reference(case: Case) -> dict[str, list[torch.Tensor]]:
    """Single-process outputs and gradients for every rank's tokens, and expert-weight grads."""
    experts = [[w.double().requires_grad_() for w in init_expert_weights(e, case.hidden, case.ffn, case.seed)]
               for e in range(case.num_experts)]
    outs, gxs, gws = [], [], []
    for r in range(case.world):
        x, idx, w, grad = rank_inputs(case, r)
        x.requires_grad_(), w.requires_grad_()
        out = reference_moe(x, idx, w, experts)
        if out.requires_grad:
            (out * grad).sum().backward()
        outs.append(out.detach())
        gxs.append(x.grad if x.grad is not None else torch.zeros_like(x))
        gws.append(w.grad if w.grad is not None else torch.zeros_like(w))
    expert_grads = [torch.stack([ws[i].grad if ws[i].grad is not None else torch.zeros_like(ws[i])
                                 for ws in experts]) for i in range(3)]
    return {"out": outs, "grad_x": gxs, "grad_w": gws, "grad_experts": expert_grads}


def run_case_on_rank(rank: int, case: Case) -> dict[str, object]:
    topo = Topology(case.nodes, case.gpus_per_node)
    groups = build_process_groups(topo, timeout_s=60)
    plan = make_plan(case)
    disp = build_dispatcher(case.dispatcher, plan, groups, case.hidden)
    experts = GroupedExperts.for_rank(plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)
    x, idx, w, grad = rank_inputs(case, rank)
    x.requires_grad_(), w.requires_grad_()
    batch, handle = disp.dispatch(x, idx, w)
    if case.weights_at_experts and batch.weight_P is not None:
        y = experts(batch.x_PD, batch.tokens_per_expert, batch.offsets_E, batch.weight_P)
        out = disp.combine(y, handle, weighted=True)
    else:
        out = disp.combine(experts(batch.x_PD, batch.tokens_per_expert), handle)
    (out * grad).sum().backward()

    ref = reference(case)
    mine = list(plan.rank_experts[rank])
    err = {
        "out": _maxdiff(out.detach(), ref["out"][rank]),
        "grad_x": _maxdiff(x.grad, ref["grad_x"][rank]),
        "grad_w": _maxdiff(w.grad, ref["grad_w"][rank]),
        "grad_experts": max(_maxdiff(p.grad, g[mine]) for p, g in
                            zip((experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD), ref["grad_experts"])),
    }
    return {"err": err, "dispatch_stats": handle.dispatch_stats, "combine_stats": handle.combine_stats,
            "tokens_per_expert": handle.tokens_per_expert,
            "rows_received": handle.route.stages[-1].exchange.rows_received}


def _maxdiff(a: Optional[torch.Tensor], b: torch.Tensor) -> float:
    if a is None:
        return float("inf") if b.numel() and b.abs().max() > 0 else 0.0
    return float((a - b).abs().max()) if a.numel() else 0.0


def run_cases(rank: int, world: int, cases: list[Case]) -> list[dict[str, object]]:
    """Entry point for run_ranks: all cases in one spawn (process start-up dominates on 2 cores)."""
    results = []
    for case in cases:
        assert case.world == world, (case, world)
        results.append(run_case_on_rank(rank, case))
        dist.barrier()
    return results


def distinct_pairs(case: Case, rank: int, level: str) -> int:
    """Independent count of distinct (token, destination rank or node) pairs off the source's own."""
    plan = make_plan(case)
    _, idx, _, _ = rank_inputs(case, rank)
    topo = Topology(case.nodes, case.gpus_per_node)
    pairs = set()
    for t, row in enumerate(idx.tolist()):
        for e in row:
            dest = plan.expert_to_rank[e]
            key = dest if level == "rank" else topo.node_of(dest)
            own = rank if level == "rank" else topo.node_of(rank)
            if key != own:
                pairs.add((t, key))
    return len(pairs)
