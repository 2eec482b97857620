"""Planners: valid equal placements, load refinement, planted-cluster recovery, fallback."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from c2r_comm.placement import hypergraph as hypergraph_mod
from c2r_comm.placement.hypergraph import PartitionSettings, resolve_partitioner
from c2r_comm.placement.metrics import expert_loads, placement_metrics, rank_loads
from c2r_comm.placement.occult import occult_greedy_ranks
from c2r_comm.routing.collaboration import coactivation_counts
from c2r_comm.placement.planners import BASELINES, METHODS, PlannerOptions, plan_layer
from c2r_comm.placement.refine import balance_load, improve_by_swaps, polish_by_kicks
from c2r_comm.placement.swap_cost import SwapCost, topology_levels
from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.plan import PlacementPlan
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

HAS_MTKAHYPAR = hypergraph_mod._import_mtkahypar()[0] is not None
PARTITIONERS = (["mtkahypar"] if HAS_MTKAHYPAR else []) + ["local_search"]


def planted(num_experts=32, clusters=4, in_cluster=0.8, tokens=3000, top_k=4, seed=0, zipf_a=0.0) -> np.ndarray:
    return RoutingTrace.synthetic(tokens, num_experts, top_k, 1, clusters, in_cluster, zipf_a, seed=seed).layer(0)


def clusters_of(ids_TK: np.ndarray, num_experts: int) -> set[frozenset[int]]:
    """Connected components of the co-activation graph (= the planted clusters when clean)."""
    parent = list(range(num_experts))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for row in ids_TK.tolist():
        for e in row[1:]:
            parent[find(e)] = find(row[0])
    comps: dict[int, set[int]] = {}
    for e in range(num_experts):
        comps.setdefault(find(e), set()).add(e)
    return {frozenset(c) for c in comps.values()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nodes,gpus", [(1, 4), (2, 2), (1, 1)])
def test_every_planner_returns_equal_valid_permutation(method, nodes, gpus):
    topo = Topology(nodes, gpus)
    ids = planted(num_experts=16, tokens=800, zipf_a=0.8, seed=nodes * 10 + gpus)
    lp = plan_layer(method, ids, 16, topo, PlannerOptions())
    rank = np.asarray(lp.plan.expert_to_rank)
    assert sorted(rank.tolist()) == sorted(PlacementPlan.contiguous(16, topo.world_size).expert_to_rank)
    assert np.bincount(rank, minlength=topo.world_size).tolist() == [16 // topo.world_size] * topo.world_size
    assert lp.method == method
    assert (lp.balance is None) == (method in BASELINES)


def test_plans_are_deterministic():
    ids = planted(seed=3, zipf_a=0.5)
    for method in METHODS:
        a = plan_layer(method, ids, 32, Topology(2, 2))
        b = plan_layer(method, ids, 32, Topology(2, 2))
        assert a.plan == b.plan, method


def test_unknown_method_and_unequal_split_are_clear_errors():
    ids = planted(num_experts=16, tokens=100)
    with pytest.raises(ValueError, match="'metis' is invalid: allowed"):
        plan_layer("metis", ids, 16, Topology(1, 4))
    with pytest.raises(ValueError, match="16 experts cannot be split equally over topology 1x3"):
        plan_layer("hypergraph", ids, 16, Topology(1, 3))


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_hypergraph_recovers_clean_planted_clusters(partitioner):
    ids = planted(num_experts=32, clusters=4, in_cluster=1.0, tokens=2000, seed=1)
    truth = clusters_of(ids, 32)
    assert len(truth) == 4  # the synthetic trace is clean: 4 components of 8
    opts = PlannerOptions(refine=False, partition=PartitionSettings(partitioner=partitioner))
    plan = plan_layer("hypergraph", ids, 32, Topology(1, 4), opts).plan
    assert {frozenset(x) for x in plan.rank_experts} == truth
    # Hierarchical: 2 nodes x 2 GPUs, clusters of 8 -> each GPU holds one cluster, each node two.
    plan2 = plan_layer("hypergraph", ids, 32, Topology(2, 2), opts).plan
    assert {frozenset(x) for x in plan2.rank_experts} == truth
    m = placement_metrics(plan2, Topology(2, 2), ids)
    assert m.gpus_per_token == 1.0 and m.nodes_per_token == 1.0


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_hypergraph_beats_random_on_noisy_clusters(partitioner):
    fit = planted(in_cluster=0.7, tokens=3000, seed=2, zipf_a=0.6)
    # Same seed -> same clusters and popularity (drawn first); rows 3000: are tokens the fit never saw.
    ev = RoutingTrace.synthetic(6000, 32, 4, 1, 4, 0.7, 0.6, seed=2).layer(0)[3000:]
    topo = Topology(1, 4)
    opts = PlannerOptions(partition=PartitionSettings(partitioner=partitioner))
    hyper = placement_metrics(plan_layer("hypergraph", fit, 32, topo, opts).plan, topo, ev)
    rand = placement_metrics(plan_layer("random", fit, 32, topo, opts).plan, topo, ev)
    assert hyper.gpus_per_token < rand.gpus_per_token - 0.3
    assert hyper.gpu_load_max_over_mean < 1.2


def test_balance_meets_tolerance_when_feasible_and_costs_little():
    ids = planted(num_experts=32, clusters=4, in_cluster=0.9, tokens=4000, seed=4, zipf_a=1.0)
    topo = Topology(1, 4)
    hg = TokenHypergraph.from_ids(ids, 32)
    load = expert_loads(ids, 32)
    cost = SwapCost(hg, topology_levels(topo, 4.0))
    raw = np.asarray(plan_layer("hypergraph", ids, 32, topo, PlannerOptions(refine=False)).plan.expert_to_rank)
    before = rank_loads(load, raw, 4)
    assert before.max() / before.mean() > 1.05  # the test is only meaningful if balancing has work to do
    res = balance_load(cost, load, raw, tolerance=1.05)
    after = rank_loads(load, np.asarray(res.expert_to_rank), 4)
    assert res.met and after.max() / after.mean() <= 1.05 + 1e-9
    assert res.load_max_over_mean == pytest.approx(after.max() / after.mean())
    assert np.bincount(res.expert_to_rank, minlength=4).tolist() == [8] * 4
    assert "<= tolerance" in res.message
    # Cheaper than balancing by reshuffling: a random balanced plan costs far more objective.
    assert res.objective_after < cost.objective(np.asarray(PlacementPlan.random(32, 4, 0).expert_to_rank))


def test_balance_says_so_when_infeasible():
    # Expert 0 alone takes 2/3 of all assignments: no equal split can get close to the mean.
    rng = np.random.default_rng(0)
    ids = np.array([[0, int(x)] for x in rng.integers(1, 8, size=400)] + [[1, 2]] * 20)
    topo = Topology(1, 4)
    cost = SwapCost(TokenHypergraph.from_ids(ids, 8), topology_levels(topo, 4.0))
    res = balance_load(cost, expert_loads(ids, 8), np.arange(8) // 2, tolerance=1.10)
    assert not res.met
    assert "not met" in res.message and "one expert alone carries" in res.message
    lp = plan_layer("hypergraph", ids, 8, topo)
    assert lp.balance is not None and not lp.balance.met


def test_recovery_swaps_keep_the_load_bound_and_never_worsen():
    ids = planted(num_experts=24, clusters=3, in_cluster=0.8, tokens=2000, seed=6, zipf_a=0.7)
    topo = Topology(1, 3)
    hg = TokenHypergraph.from_ids(ids, 24)
    load = expert_loads(ids, 24)
    cost = SwapCost(hg, topology_levels(topo, 4.0))
    start = np.asarray(PlacementPlan.random(24, 3, 1).expert_to_rank)
    bound = rank_loads(load, start, 3).max()
    out, swaps = improve_by_swaps(cost, start, load_E=load, load_bound=bound)
    assert swaps > 0 and cost.objective(out) < cost.objective(start)
    assert rank_loads(load, out, 3).max() <= bound + 1e-9
    assert np.bincount(out).tolist() == [8, 8, 8]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_polish_escapes_swap_local_optima_and_keeps_the_load_bound(seed):
    # Weak clusters: plain best-improvement swaps stop in a local optimum that kicks get out of.
    ids = planted(num_experts=32, clusters=8, in_cluster=0.5, tokens=3000, seed=seed, zipf_a=0.7)
    topo = Topology(1, 4)
    load = expert_loads(ids, 32)
    cost = SwapCost(TokenHypergraph.from_ids(ids, 32), topology_levels(topo, 4.0))
    start = np.asarray(PlacementPlan.random(32, 4, seed).expert_to_rank)
    bound = rank_loads(load, start, 4).max()
    local, _ = improve_by_swaps(cost, start, load_E=load, load_bound=bound)
    out, improved = polish_by_kicks(cost, start, kicks=10, seed=0, load_E=load, load_bound=bound)
    assert improved >= 1 and cost.objective(out) < cost.objective(local)
    assert rank_loads(load, out, 4).max() <= bound + 1e-9
    assert np.bincount(out, minlength=4).tolist() == [8] * 4
    again, _ = polish_by_kicks(cost, start, kicks=10, seed=0, load_E=load, load_bound=bound)
    assert again.tolist() == out.tolist()  # deterministic for a seed


def test_planner_polish_never_worsens_and_keeps_the_tolerance():
    ids = planted(num_experts=32, clusters=8, in_cluster=0.5, tokens=3000, seed=2, zipf_a=0.9)
    topo = Topology(2, 2)
    cost = SwapCost(TokenHypergraph.from_ids(ids, 32), topology_levels(topo, 4.0))
    plain = plan_layer("hypergraph", ids, 32, topo, PlannerOptions(load_tolerance=1.05))
    polished = plan_layer("hypergraph", ids, 32, topo, PlannerOptions(load_tolerance=1.05, polish_kicks=8))
    assert cost.objective(np.asarray(polished.plan.expert_to_rank)) <= cost.objective(np.asarray(plain.plan.expert_to_rank))
    assert polished.balance.met and polished.balance.load_max_over_mean <= 1.05 + 1e-9
    loads = rank_loads(expert_loads(ids, 32), np.asarray(polished.plan.expert_to_rank), 4)
    assert polished.balance.load_max_over_mean == pytest.approx(loads.max() / loads.mean())
    assert polished.balance.expert_to_rank == polished.plan.expert_to_rank
    with pytest.raises(ValueError, match="polish_kicks = -1 is invalid"):
        PlannerOptions(polish_kicks=-1)


def test_occult_greedy_follows_the_published_steps():
    # Two clean blocks {0,1,2,3} and {4,5,6,7}; the strongest pair is (5, 6).
    C = np.zeros((8, 8))
    for block in ([0, 1, 2, 3], [4, 5, 6, 7]):
        for a in block:
            for b in block:
                if a != b:
                    C[a, b] = 1.0
    C[5, 6] = C[6, 5] = 3.0
    rank = occult_greedy_ranks(C, 2)
    assert rank[5] == rank[6] == 0  # GPU 0 seeded with the most-collaborating pair
    assert sorted(np.flatnonzero(rank == 0).tolist()) == [4, 5, 6, 7]
    assert sorted(np.flatnonzero(rank == 1).tolist()) == [0, 1, 2, 3]


def test_coactivation_counts_equal_brute_force():
    ids = planted(num_experts=8, clusters=2, tokens=200, top_k=3, seed=8)
    want = np.zeros((8, 8), dtype=np.int64)
    for row in ids.tolist():
        for a in row:
            for b in row:
                if a != b:
                    want[a, b] += 1
    assert np.array_equal(coactivation_counts(ids, 8), want)


def test_fallback_is_announced_when_mtkahypar_is_missing(monkeypatch):
    monkeypatch.setattr(hypergraph_mod, "_import_mtkahypar", lambda: (None, ImportError("no module named mtkahypar")))
    with pytest.warns(UserWarning, match="mtkahypar is not importable"):
        assert resolve_partitioner("auto") == "local_search"
    with pytest.raises(ValueError, match="needs the mtkahypar package"):
        resolve_partitioner("mtkahypar")
    ids = planted(num_experts=16, tokens=500, seed=9)
    with pytest.warns(UserWarning, match="pure-Python swap local search"):
        lp = plan_layer("hypergraph", ids, 16, Topology(1, 4))
    assert lp.partitioner == "local_search"


@pytest.mark.skipif(not HAS_MTKAHYPAR, reason="mtkahypar not installed")
def test_mtkahypar_is_used_silently_when_present():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = plan_layer("hypergraph", planted(num_experts=16, tokens=500), 16, Topology(1, 4))
    assert lp.partitioner == "mtkahypar"
