"""Placement metrics, the token hypergraph and swap deltas against brute-force counts."""
from __future__ import annotations

import numpy as np
import pytest

from c2r_comm.placement.metrics import dealt_source_ranks, expert_loads, max_over_mean, placement_metrics
from c2r_comm.placement.refine import balance_load
from c2r_comm.placement.swap_cost import SwapCost, topology_levels
from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology


def random_ids(rng: np.random.Generator, tokens: int, experts: int, k: int) -> np.ndarray:
    return np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)])


def brute_force(e2r: list[int], topo: Topology, ids: np.ndarray, src: list[int]) -> dict:
    G, W = topo.gpus_per_node, topo.world_size
    gpus, nodes, rgpus, rnodes = [], [], [], []
    load = [0] * W
    for t, row in enumerate(ids.tolist()):
        ranks = {e2r[e] for e in row}
        nds = {r // G for r in ranks}
        gpus.append(len(ranks))
        nodes.append(len(nds))
        rgpus.append(len(ranks - {src[t]}))
        rnodes.append(len(nds - {src[t] // G}))
        for e in row:
            load[e2r[e]] += 1
    node_load = [sum(load[n * G:(n + 1) * G]) for n in range(topo.nodes)]
    mean = lambda xs: sum(xs) / len(xs)
    return dict(gpus_per_token=mean(gpus), nodes_per_token=mean(nodes), remote_gpus_per_token=mean(rgpus),
                remote_nodes_per_token=mean(rnodes), gpu_load_max_over_mean=max(load) / mean(load),
                node_load_max_over_mean=max(node_load) / mean(node_load))


@pytest.mark.parametrize("nodes,gpus,experts,k,seed", [(1, 4, 16, 3, 0), (2, 2, 12, 4, 1), (2, 4, 32, 6, 2),
                                                       (3, 1, 9, 2, 3)])
@pytest.mark.parametrize("explicit_sources", [False, True])
def test_metrics_equal_brute_force(nodes, gpus, experts, k, seed, explicit_sources):
    rng = np.random.default_rng(seed)
    topo = Topology(nodes, gpus)
    plan = PlacementPlan.random(experts, topo.world_size, seed)
    ids = random_ids(rng, 101, experts, k)
    src = rng.integers(0, topo.world_size, size=len(ids)) if explicit_sources else None
    got = placement_metrics(plan, topo, ids, src)
    want = brute_force(list(plan.expert_to_rank), topo, ids,
                       src.tolist() if explicit_sources else dealt_source_ranks(len(ids), topo.world_size).tolist())
    for name, value in want.items():
        assert getattr(got, name) == pytest.approx(value), name
    assert got.experts_per_gpu == experts // topo.world_size
    assert got.tokens == len(ids)


def test_dealt_source_ranks_are_contiguous_blocks():
    src = dealt_source_ranks(10, 4)
    assert src.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert (np.diff(src) >= 0).all() and np.bincount(src).max() - np.bincount(src).min() <= 1


def test_max_over_mean_normal_and_all_zero_load():
    assert max_over_mean(np.array([1, 2, 3, 6])) == pytest.approx(2.0)
    assert max_over_mean(np.array([5, 5, 5])) == 1.0
    assert max_over_mean(np.zeros(4)) == 1.0  # no load, no imbalance
    assert max_over_mean(np.zeros(0)) == 1.0
    # Refinement reports through the same function: an all-zero layer is balanced, tolerance met.
    ids = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    cost = SwapCost(TokenHypergraph.from_ids(ids, 8), topology_levels(Topology(1, 4), 4.0))
    res = balance_load(cost, np.zeros(8), np.arange(8) // 2, tolerance=1.10)
    assert res.load_max_over_mean == res.load_max_over_mean_before == 1.0 and res.met


def test_metrics_errors_name_the_problem():
    topo = Topology(1, 2)
    plan = PlacementPlan.contiguous(4, 2)
    with pytest.raises(ValueError, match="expert ids must lie in 0..3"):
        placement_metrics(plan, topo, np.array([[0, 4]]))
    with pytest.raises(ValueError, match="source_rank_T"):
        placement_metrics(plan, topo, np.array([[0, 1]]), np.array([2]))
    with pytest.raises(ValueError, match="topology 1x4"):
        placement_metrics(plan, Topology(1, 4), np.array([[0, 1]]))


def test_hypergraph_merges_identical_sets_and_counts_connectivity():
    rng = np.random.default_rng(5)
    ids = random_ids(rng, 300, 8, 3)
    hg = TokenHypergraph.from_ids(ids, 8)
    assert hg.total_weight == 300 and hg.num_edges <= 56  # C(8, 3) distinct sets at most
    group = rng.integers(0, 3, size=8)
    want = sum(len({group[e] for e in row}) for row in ids.tolist())
    assert hg.connectivity(group) == want
    assert np.array_equal(expert_loads(ids, 8), np.bincount(hg.pins, weights=np.repeat(hg.edge_weights, 3)))


def test_restrict_keeps_within_set_connectivity():
    rng = np.random.default_rng(6)
    ids = random_ids(rng, 200, 12, 4)
    hg = TokenHypergraph.from_ids(ids, 12)
    subset = [1, 4, 5, 7, 9, 11]
    sub = hg.restrict(subset)
    group_local = rng.integers(0, 2, size=len(subset))
    group_of = dict(zip(subset, group_local.tolist()))
    # Brute force: per token, distinct groups among its experts inside the subset, only if >= 2 of them.
    want = 0
    for row in ids.tolist():
        inside = [e for e in row if e in group_of]
        if len(inside) >= 2:
            want += len({group_of[e] for e in inside})
    assert sub.connectivity(group_local) == want
    assert sub.num_vertices == len(subset)


@pytest.mark.parametrize("nodes,gpus", [(1, 4), (2, 3)])
def test_swap_and_move_deltas_equal_recount(nodes, gpus):
    rng = np.random.default_rng(7)
    topo = Topology(nodes, gpus)
    E = 2 * topo.world_size
    hg = TokenHypergraph.from_ids(random_ids(rng, 150, E, 3), E)
    cost = SwapCost(hg, topology_levels(topo, inter_node_cost=2.5))
    rank = np.asarray(PlacementPlan.random(E, topo.world_size, 3).expert_to_rank)
    base = cost.objective(rank)
    swaps = cost.swap_deltas(rank)
    moves = cost.move_deltas(rank)
    for e in range(E):
        for f in range(E):
            r = rank.copy()
            r[e], r[f] = rank[f], rank[e]
            assert swaps[e, f] == pytest.approx(cost.objective(r) - base)
        for target in range(topo.world_size):
            r = rank.copy()
            r[e] = target
            assert moves[e, target] == pytest.approx(cost.objective(r) - base)
    assert np.allclose(cost.swap_deltas(rank, [3, 1]), swaps[[3, 1]])
