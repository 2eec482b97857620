"""Async phases: two micro-batches in flight give what two blocking calls give, and nothing deadlocks.

Both sends are issued before either is waited on; both combines are started before either is
waited on, and they are waited on in the opposite order. One backward then runs through both
graphs, whose exchange stages the autograd engine may interleave: each stage is one Function
issuing its collectives in a fixed order, so every rank still posts them in the same order.
"""
from __future__ import annotations

import dataclasses

import torch
from moe_cases import Case, make_plan, rank_inputs
from ranks import run_ranks

from c2r_comm.dispatch import build_dispatcher
from c2r_comm.experts import GroupedExperts
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology


def _experts(case: Case, rank: int, plan) -> GroupedExperts:
    return GroupedExperts.for_rank(plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)


def _leaf_inputs(case: Case, rank: int):
    x, idx, w, grad = rank_inputs(case, rank)
    return x.requires_grad_(), idx, w.requires_grad_(), grad


def _grads(inputs, experts):
    return [t.grad.clone() for t in (inputs[0][0], inputs[0][2], inputs[1][0], inputs[1][2])] + \
        [p.grad.clone() for p in experts.parameters()]


def _blocking(disp, experts, inputs):
    outs = []
    for x, idx, w, _ in inputs:
        batch, handle = disp.dispatch(x, idx, w)
        outs.append(disp.combine(experts(batch.x_PD, batch.tokens_per_expert, batch.offsets_E), handle))
    sum((o * g).sum() for o, (_, _, _, g) in zip(outs, inputs)).backward()
    return outs


def _in_flight(disp, experts, inputs):
    routes = [disp.exchange_counts(disp.layout(x, idx, w)) for x, idx, w, _ in inputs]
    pending = [disp.send(x, w, r) for (x, _, w, _), r in zip(inputs, routes)]  # both issued
    dispatched = [p.wait() for p in pending]
    combines = [disp.combine_start(experts(b.x_PD, b.tokens_per_expert, b.offsets_E), h) for b, h in dispatched]
    outs = [combines[1].wait(), combines[0].wait()][::-1]  # waited in the opposite order
    sum((o * g).sum() for o, (_, _, _, g) in zip(outs, inputs)).backward()
    return outs


def worker(rank: int, world: int, cases: list[Case]) -> list[float]:
    errors = []
    for case in cases:
        groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=60)
        plan = make_plan(case)
        disp = build_dispatcher(case.dispatcher, plan, groups, case.hidden)
        micro = [case, dataclasses.replace(case, seed=case.seed + 1)]
        results = []
        for run in (_blocking, _in_flight):
            experts = _experts(case, rank, plan)
            inputs = [_leaf_inputs(c, rank) for c in micro]
            outs = run(disp, experts, inputs)
            results.append(([o.detach() for o in outs], _grads(inputs, experts)))
        (o_ref, g_ref), (o_new, g_new) = results
        errors.append(max(float((a - b).abs().max()) if a.numel() else 0.0
                          for a, b in zip(o_ref + g_ref, o_new + g_new)))
    return errors


def _cases(world: int, nodes: int = 1) -> list[Case]:
    names = ("alltoall", "dedup") + (("hierarchical",) if nodes > 1 or world <= 2 else ())
    return [Case(n, nodes=nodes, gpus_per_node=world // nodes, num_experts=4 * world, top_k=3, plan="random",
                 tokens=tuple(5 + r for r in range(world))) for n in names]


def test_two_micro_batches_in_flight_on_2_ranks():
    for errs in run_ranks(2, worker, _cases(2)):
        assert all(e <= 1e-12 for e in errs), errs


def test_two_micro_batches_in_flight_on_4_ranks_and_2x2():
    for errs in run_ranks(4, worker, _cases(4) + _cases(4, nodes=2)):
        assert all(e <= 1e-12 for e in errs), errs
