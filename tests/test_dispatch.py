"""Dispatchers against a single-process reference MoE, on real gloo ranks."""
from __future__ import annotations

import pytest
from moe_cases import Case, distinct_pairs, run_cases
from ranks import run_ranks

TOL = 1e-10  # float64 end to end


def _check(cases, results_by_rank):
    for rank, results in enumerate(results_by_rank):
        for case, res in zip(cases, results):
            bad = {k: v for k, v in res["err"].items() if not v <= TOL}
            assert not bad, f"rank {rank} {case}: {bad}"


def _cases(world, nodes=1, **kw):
    gpus = world // nodes
    out = []
    for disp in ("alltoall", "dedup"):
        for plan in ("contiguous", "random"):
            out.append(Case(disp, nodes=nodes, gpus_per_node=gpus, plan=plan, **kw))
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_reference(world):
    cases = _cases(world, num_experts=8, top_k=3)
    # Edge cases: a rank with zero tokens, unused experts, one expert for everyone, k = 1, k = E.
    zero = tuple(0 if r == world - 1 else 5 for r in range(world))
    for disp in ("alltoall", "dedup"):
        cases += [
            Case(disp, gpus_per_node=world, tokens=zero, plan="random"),
            Case(disp, gpus_per_node=world, routing="subset", top_k=2),
            Case(disp, gpus_per_node=world, routing="single", top_k=1),
            Case(disp, gpus_per_node=world, routing="single", top_k=3),
            Case(disp, gpus_per_node=world, top_k=1, plan="random"),
            Case(disp, gpus_per_node=world, top_k=8, plan="random"),
        ]
    _check(cases, run_ranks(world, run_cases, cases))


def test_matches_reference_world8_two_nodes():
    cases = [Case(d, nodes=2, gpus_per_node=4, num_experts=16, top_k=4, plan="random", tokens=(7, 0, 5, 3, 6, 6, 1, 4))
             for d in ("alltoall", "dedup")]
    _check(cases, run_ranks(8, run_cases, cases))


def test_dedup_rows_equal_distinct_remote_pairs():
    cases = [Case("dedup", nodes=2, gpus_per_node=2, num_experts=8, top_k=4, plan=p, tokens=(20, 20, 20, 20))
             for p in ("contiguous", "random")]
    cases += [Case("alltoall", nodes=2, gpus_per_node=2, num_experts=8, top_k=4, tokens=(20, 20, 20, 20))]
    results = run_ranks(4, run_cases, cases)
    for rank, per_rank in enumerate(results):
        for case, res in zip(cases, per_rank):
            st = res["dispatch_stats"]
            if case.dispatcher == "dedup":
                assert st.rows_off_rank == distinct_pairs(case, rank, "rank")
            else:  # baseline: every (token, expert) pair whose expert lives elsewhere
                from moe_cases import make_plan, rank_inputs
                plan, (_, idx, _, _) = make_plan(case), rank_inputs(case, rank)
                assert st.rows_off_rank == sum(plan.expert_to_rank[e] != rank for e in idx.reshape(-1).tolist())
            # Combine returns exactly what dispatch received, row for row: the baseline one row per
            # (token, expert) pair, i.e. every expert input; dedup one partial per received (token,
            # rank) row, each of which feeds >= 1 expert and at most k.
            back = res["combine_stats"].rows_off_rank + res["combine_stats"].rows_local
            pairs = sum(res["tokens_per_expert"])
            if case.dispatcher == "alltoall":
                assert back == pairs, (rank, case, back, pairs)
            else:
                assert res["rows_received"] == back and back <= pairs <= case.top_k * back and (pairs > 0) == (back > 0), \
                    (rank, case, back, pairs)


def test_routing_weights_applied_by_the_experts_match_reference():
    """ExpertBatch.weight_P applied inside the experts (on the [P, F] activation) and
    combine(weighted=True) give the reference results and gradients; alltoall, which weights at
    the source, hands over no weight_P and keeps its own path."""
    cases = [Case(d, nodes=2, gpus_per_node=2, num_experts=8, top_k=3, plan=p, weights_at_experts=True,
                  tokens=(6, 0, 7, 5)) for d in ("alltoall", "dedup", "hierarchical") for p in ("contiguous", "random")]
    _check(cases, run_ranks(4, run_cases, cases))
