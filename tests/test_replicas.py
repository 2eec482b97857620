"""Replica plans (issue 13): plan files, the planner's exact objective, and a layer with replicas on
gloo ranks (fp64 reference; after the replica gradient sync and one optimizer step every copy is
identical). The dispatch's copy choice: test_replica_choice.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ranks import run_ranks
from replica_cases import brute_min_cover, replica_plan

from c2r_comm.config import config_from_dict
from c2r_comm.experts import init_expert_weights, reference_moe
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import build_moe_layer
from c2r_comm.placement.metrics import placement_metrics
from c2r_comm.placement.replicas import select_replicas
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.topology import Topology


# ---- plans and plan files ---------------------------------------------------------------------------
def test_replica_plan_maps_and_validation():
    p = PlacementPlan((0, 0, 1, 1), 2, ((3,), (0,)))
    assert p.replica_slots == 1 and p.experts_per_rank == 3 and p.primaries_per_rank == 2
    assert p.rank_experts == ((0, 1, 3), (2, 3, 0))  # primaries, then replicas
    assert p.hosts_of_expert == ((0, 1), (0,), (1,), (1, 0))
    assert p.slot_on_rank[(3, 0)] == 2 and p.slot_on_rank[(0, 1)] == 2 and p.expert_to_slot == (0, 1, 0, 1)
    ranks, slots = p.host_tensors()
    assert ranks.tolist() == [[0, 1], [0, 0], [1, 1], [1, 0]] and slots.tolist() == [[0, 2], [1, 1], [0, 0], [1, 2]]
    assert p.fingerprint() != PlacementPlan((0, 0, 1, 1), 2).fingerprint()
    for replicas, words in [(((0,), (2,)), "its own primary"), (((3,), ()), "same number of replica slots"),
                            (((3, 3), (0, 1)), "twice"), (((9,), (0,)), "outside"), (((3,),), "every rank")]:
        with pytest.raises(ValueError, match=words):
            PlacementPlan((0, 0, 1, 1), 2, replicas)
    with pytest.raises(ValueError, match="at most 1"):  # expert 0 copied three times with one slot per rank
        PlacementPlan((0, 0, 1, 1, 2, 2, 3, 3), 4, ((2,), (0,), (0,), (0,)))


def test_replica_grad_sync_moves_gradients_among_holders_only():
    """Each non-primary copy's gradient to the primary and the sum back: 2 (copies - 1) expert
    gradients per replicated expert, on the links between its holders, one message per pair and trip."""
    from c2r_comm.replica_grads import ReplicaGradSync, SyncRoute
    # 2x2, 8 experts, R = 1: expert 2 (primary rank 1) copied to rank 0 and expert 6 (primary 3) to
    # rank 2 (same node); expert 4 (primary 2) to rank 1 and expert 0 (primary 0) to rank 3 (cross-node).
    plan = PlacementPlan((0, 0, 1, 1, 2, 2, 3, 3), 4, ((2,), (4,), (6,), (0,)))
    sync = ReplicaGradSync(plan, 0, None, Topology(2, 2))
    row = 3 * 6 * 5 * 4  # hidden 6, ffn 5, fp32
    stats = sync.stats(6, 5, 4)
    assert stats.bytes_same_node == 4 * row and stats.bytes_cross_node == 4 * row  # each expert: there and back
    assert (stats.messages_same_node, stats.messages_cross_node) == (4, 4)
    assert stats.rows_off_rank == 0 and sync.bytes_per_step(6, 5, 4) == 8 * row
    # W = 8, one replica each: 16 rows against the all_reduce's 2 (W-1) x 8 = 112
    eight = PlacementPlan(tuple(r for r in range(8) for _ in range(2)), 8, tuple(((2 * r + 2) % 16,) for r in range(8)))
    assert ReplicaGradSync(eight, 0, None, Topology(1, 8)).bytes_per_step(6, 5, 4) == 16 * row
    # W = 2: each rank a primary and a copy of the other's expert, so each pair carries a gather and a
    # return message in each direction: 4 messages, not 2
    pair = ReplicaGradSync(PlacementPlan((0, 0, 1, 1), 2, ((2,), (0,))), 0, None, Topology(1, 2)).stats(6, 5, 4)
    assert (pair.messages_same_node, pair.bytes_same_node) == (4, 4 * row)
    route = SyncRoute.of(plan, 0)  # rank 0: primary of expert 0 (copy on 3), holds a copy of expert 2 (primary 1)
    assert route.peers == (1, 3) and route.send_experts == (2,) and route.send_counts == (1, 0)
    assert route.recv_experts == (0,) and route.recv_counts == (0, 1) and route.primary_experts == (0,)


def test_empty_replica_lists_are_no_replicas():
    plan = PlacementPlan((0, 0, 1, 1), 2, ((), ()))
    assert plan.replicas == () and plan == PlacementPlan((0, 0, 1, 1), 2)
    assert plan.fingerprint() == PlacementPlan((0, 0, 1, 1), 2).fingerprint()


def test_plan_file_round_trip_and_old_files(tmp_path):
    topo = Topology(2, 2)
    plan = replica_plan(8, 4, 2, seed=3)
    pf = PlanFile(topo, 8, {5: plan}, "hypergraph", {5: {}}, {"replica_slots": 2})
    pf.save(tmp_path / "p.json")
    back = PlanFile.load(tmp_path / "p.json")
    assert back.layers[5] == plan and back.layers[5].replicas == plan.replicas
    plain = PlanFile(topo, 8, {0: PlacementPlan.contiguous(8, 4)}, "contiguous")
    assert "replicas" not in json.dumps(plain.to_json())  # R = 0: the files of before, byte for byte
    with pytest.raises(ValueError, match="plan file is for topology 2x2 but the run uses 1x4"):
        back.plan_for_layer(5, Topology(1, 4), 8)
    doc = pf.to_json()
    doc["layers"]["5"]["replicas"][0] = [0.5]
    with pytest.raises(ValueError, match=r"replicas\[0\]\[0\]' = 0.5"):
        PlanFile.from_json(doc)


# ---- the planner ------------------------------------------------------------------------------------
@pytest.mark.parametrize("topo", [(1, 4), (2, 2)])
def test_replica_selection_objective_is_exact_and_fills_every_slot(topo):
    rng = np.random.default_rng(1)
    topology = Topology(*topo)
    W, E, K = topology.world_size, 8, 3
    hot = rng.choice(E, 3, replace=False)
    ids = np.array([np.concatenate([[rng.choice(hot)], rng.choice(np.setdiff1d(np.arange(E), hot), K - 1,
                                                                    replace=False)]) for _ in range(400)])
    base = PlacementPlan.random(E, W, 2)
    sel = select_replicas(base, ids, topology, 2, load_tolerance=1.5)
    plan = sel.plan
    assert plan.replica_slots == 2 and plan.expert_to_rank == base.expert_to_rank
    before = np.mean([brute_min_cover(base, t) for t in ids.tolist()])
    after = np.mean([brute_min_cover(plan, t) for t in ids.tolist()])
    assert sel.fit_gpus_per_token == pytest.approx((before, after)) and after < before
    if topology.nodes > 1:
        node = lambda r: r // topology.gpus_per_node  # noqa: E731
        assert sel.fit_nodes_per_token == pytest.approx((np.mean([brute_min_cover(base, t, node) for t in ids.tolist()]),
                                                         np.mean([brute_min_cover(plan, t, node) for t in ids.tolist()])))
    m = placement_metrics(plan, topology, ids)  # the dispatch's choice realises the minimum
    if topology.nodes == 1:
        assert m.gpus_per_token == pytest.approx(after)


def test_replica_selection_repairs_pinned_load_first():
    """Half the tokens are [0, 1], both on rank 0: a copy of either saves no GPU, so the greedy by
    gain alone copies other experts and leaves rank 0 with twice the mean load that no copy choice
    can move. With the pinned cap both get copies first."""
    rng = np.random.default_rng(5)
    E, W = 8, 4
    base = PlacementPlan.contiguous(E, W)  # rank r hosts experts 2r, 2r+1
    ids = np.array([[0, 1] if i % 2 else rng.choice(np.arange(2, E), 2, replace=False) for i in range(800)])
    load_E = np.bincount(ids.reshape(-1), minlength=E) / (ids.size / W)

    def pinned(plan):
        out = np.zeros(W)
        for e, hosts in enumerate(plan.hosts_of_expert):
            if len(hosts) == 1:
                out[hosts[0]] += load_E[e]
        return out

    copied = lambda plan: {e for rep in plan.replicas for e in rep}  # noqa: E731
    plain = select_replicas(base, ids, Topology(1, W), 1, load_tolerance=10.0, pinned_load_cap=None).plan
    assert pinned(plain).max() > 1.5 and not {0, 1} & copied(plain)
    repaired = select_replicas(base, ids, Topology(1, W), 1, load_tolerance=10.0, pinned_load_cap=0.95,
                               copy_load_cap=1.1).plan
    assert pinned(repaired).max() <= 0.95 and {0, 1} <= copied(repaired)
    assert repaired.copy_load_cap == 1.1  # the selection writes the dispatch's cap into the plan


def test_pinned_blocks_copy_experts_whose_load_drifts():
    """Rank 0 hosts [0, 1]: cold (~0.8 x the mean) in the first three blocks of the fit tokens, hot
    in the last (40 % of its tokens are [0, 1]: 1.6 x), so ~1.0 x over the whole set, below the cap
    1.25. One block: no copy of either (a copy saves no GPU); four (the default): the hot block gets one."""
    rng = np.random.default_rng(7)
    E, W = 8, 4
    base = PlacementPlan.contiguous(E, W)  # rank r hosts experts 2r, 2r+1
    cold = np.array([0.1, 0.1] + [0.8 / 6] * 6)
    other = lambda: rng.choice(np.arange(2, E), 2, replace=False)  # noqa: E731
    ids = np.array([rng.choice(E, 2, replace=False, p=cold) for _ in range(600)]
                   + [[0, 1] if i % 5 < 2 else other() for i in range(200)])
    copied = lambda plan: {e for rep in plan.replicas for e in rep}  # noqa: E731
    whole = select_replicas(base, ids, Topology(1, W), 1, load_tolerance=10.0, pinned_load_cap=1.25,
                            pinned_blocks=1).plan
    assert not {0, 1} & copied(whole)
    blocks = select_replicas(base, ids, Topology(1, W), 1, load_tolerance=10.0, pinned_load_cap=1.25,
                             pinned_blocks=4).plan
    assert {0, 1} & copied(blocks)
    with pytest.raises(ValueError, match=r"pinned_blocks \(--replica-pinned-blocks\) = 0 is invalid"):
        select_replicas(base, ids, Topology(1, W), 1, pinned_blocks=0)
    # more blocks than fit tokens: the empty blocks count as unloaded (a tiny fit still plans)
    tiny = select_replicas(base, ids[-2:], Topology(1, W), 1, pinned_blocks=np.int64(4)).plan
    assert sum(len(r) for r in tiny.replicas) == W


def test_local_search_never_worsens_the_greedy_and_sometimes_improves_it():
    improved = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        E, W = 12, 4
        ids = np.array([rng.choice(E, 3, replace=False, p=np.arange(1, E + 1) / (E * (E + 1) / 2))
                        for _ in range(300)])
        base = PlacementPlan.random(E, W, seed)
        greedy = select_replicas(base, ids, Topology(1, W), 2, load_tolerance=1.5, local_search_passes=0)
        searched = select_replicas(base, ids, Topology(1, W), 2, load_tolerance=1.5)
        before, after = greedy.fit_gpus_per_token[1], searched.fit_gpus_per_token[1]
        assert after <= before + 1e-12
        assert after == pytest.approx(np.mean([brute_min_cover(searched.plan, t) for t in ids.tolist()]))
        improved += after < before - 1e-12
    assert improved >= 1


def test_replica_selection_never_paints_itself_into_a_corner():
    """E = W = 4, R = 2: greedy choices could leave a GPU whose free slot no expert may fill (every
    other expert already has R copies); each step keeps the remaining slots fillable."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        ids = np.array([rng.choice(4, 2, replace=False) for _ in range(50)])
        plan = select_replicas(PlacementPlan.random(4, 4, seed), ids, Topology(1, 4), 2).plan
        assert plan.replica_slots == 2 and max(len(h) for h in plan.hosts_of_expert) <= 3


# ---- a layer with replicas on gloo ranks --------------------------------------------------------------
D, F, T, K = 6, 5, 10, 3


def _inputs(rank):
    g = torch.Generator().manual_seed(70 + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    idx = torch.argsort(torch.rand(T, 8, generator=g), dim=1)[:, :K]
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    return x, idx, w, torch.randn(T, D, generator=g, dtype=torch.float64)


def _replica_layer_rank(rank, world, dispatcher, nodes, plan_path):
    cfg = config_from_dict({"model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": 8, "top_k": K},
                            "parallel": {"nodes": nodes, "gpus_per_node": world // nodes},
                            "placement": {"plan": plan_path, "layer": 0}, "run": {"dtype": "float64", "seed": 4}})
    layer = build_moe_layer(cfg, build_process_groups(Topology(nodes, world // nodes), timeout_s=60),
                            torch.device("cpu"), dispatcher=dispatcher)
    x, idx, w, grad = _inputs(rank)
    x.requires_grad_(), w.requires_grad_()
    out = layer.forward_routed(x, idx, w)
    (out.out_TD * grad).sum().backward()
    params = (layer.experts.w_gate_LDF, layer.experts.w_up_LDF, layer.experts.w_down_LFD)
    partial = [p.grad.clone() for p in params]
    layer.sync_replica_grads()
    synced = [p.grad.clone() for p in params]
    torch.optim.SGD(layer.experts.parameters(), lr=0.1).step()
    arrays = lambda ts: [t.detach().numpy().copy() for t in ts]  # noqa: E731 (numpy: no shared-memory handles)
    return {"out": out.out_TD.detach().numpy().copy(), "grad_x": x.grad.numpy().copy(),
            "grad_w": w.grad.numpy().copy(), "partial": arrays(partial), "synced": arrays(synced),
            "after_step": arrays(params), "ids": layer.experts.global_ids}


@pytest.mark.parametrize("dispatcher, world, nodes", [("dedup", 2, 1), ("alltoall", 4, 1), ("hierarchical", 4, 2)])
def test_layer_with_replicas_matches_reference_and_copies_stay_identical(tmp_path, dispatcher, world, nodes):
    plan = replica_plan(8, world, 2, seed=world)
    path = tmp_path / "plan.json"
    PlanFile(Topology(nodes, world // nodes), 8, {0: plan}, "test").save(path)
    got = run_ranks(world, _replica_layer_rank, dispatcher, nodes, str(path))
    experts = [[t.double().requires_grad_() for t in init_expert_weights(e, D, F, seed=4)] for e in range(8)]
    for r in range(world):
        x, idx, w, grad = _inputs(r)
        x.requires_grad_(), w.requires_grad_()
        ref = reference_moe(x, idx, w, experts)
        (ref * grad).sum().backward()
        for key, want in (("out", ref.detach()), ("grad_x", x.grad), ("grad_w", w.grad)):
            torch.testing.assert_close(torch.from_numpy(got[r][key]), want, rtol=1e-10, atol=1e-10)
    summed = {e: [0.0, 0.0, 0.0] for e in range(8)}  # the copies' partial gradients add up to the model's
    for res in got:
        for slot, e in enumerate(res["ids"]):
            for i in range(3):
                summed[e][i] = summed[e][i] + res["partial"][i][slot]
    for e in range(8):
        for i in range(3):
            torch.testing.assert_close(torch.from_numpy(summed[e][i]), experts[e][i].grad, rtol=1e-10, atol=1e-10)
    for res in got:  # after the sync every copy holds the full gradient, and after the step the same weights
        for slot, e in enumerate(res["ids"]):
            for i in range(3):
                torch.testing.assert_close(torch.from_numpy(res["synced"][i][slot]), experts[e][i].grad, rtol=1e-10,
                                           atol=1e-10)
    copies: dict[int, list] = {}
    for res in got:
        for slot, e in enumerate(res["ids"]):
            copies.setdefault(e, []).append([res["after_step"][i][slot] for i in range(3)])
    assert any(len(c) > 1 for c in copies.values())
    for e, cs in copies.items():
        for c in cs[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(c, cs[0])), f"copies of expert {e} differ after the step"


def _idle_rank_copies(rank, world, plan_path):
    """Two Adam steps. In the second, rank 1 has no tokens and drops its (all-zero) expert gradients,
    as a framework that frees unused gradients would, and rank 0's tokens go only to experts it alone
    hosts: the replicated experts get no tokens anywhere, yet Adam's momentum moves rank 0's copies,
    so rank 1's copies must step too (the sync gives them zero gradients)."""
    cfg = config_from_dict({"model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": 8, "top_k": 2},
                            "parallel": {"nodes": 1, "gpus_per_node": world},
                            "placement": {"plan": plan_path, "layer": 0}, "run": {"dtype": "float64", "seed": 4}})
    layer = build_moe_layer(cfg, build_process_groups(Topology(1, world), timeout_s=60), torch.device("cpu"))
    opt = torch.optim.Adam(layer.experts.parameters(), lr=0.01)
    x, idx, w, grad = _inputs(rank)
    plan = PlanFile.load(plan_path).layers[0]
    alone = [e for e, hosts in enumerate(plan.hosts_of_expert) if hosts == (0,)][:2]
    for step in range(2):
        opt.zero_grad()
        if step == 0:
            ids = idx[:, :2]
        else:
            ids = torch.tensor([alone] * T) if rank == 0 else idx[:0, :2]
        n = ids.shape[0]
        out = layer.forward_routed(x[:n], ids, w[:n, :2]).out_TD
        (out * grad[:n]).sum().backward()
        if n == 0:
            for p in layer.experts.parameters():
                p.grad = None
        layer.sync_replica_grads()
        opt.step()
    params = (layer.experts.w_gate_LDF, layer.experts.w_up_LDF, layer.experts.w_down_LFD)
    return {"ids": layer.experts.global_ids, "w": [p.detach().numpy().copy() for p in params]}


def test_copies_stay_identical_when_a_rank_has_no_tokens(tmp_path):
    plan = replica_plan(8, 2, 2, seed=5)
    assert sum(hosts == (0,) for hosts in plan.hosts_of_expert) >= 2
    path = tmp_path / "plan.json"
    PlanFile(Topology(1, 2), 8, {0: plan}, "test").save(path)
    got = run_ranks(2, _idle_rank_copies, str(path))
    copies: dict[int, list] = {}
    for res in got:
        for slot, e in enumerate(res["ids"]):
            copies.setdefault(e, []).append([w[slot] for w in res["w"]])
    assert any(len(c) > 1 for c in copies.values())
    for e, cs in copies.items():
        assert all(np.array_equal(a, b) for c in cs[1:] for a, b in zip(c, cs[0])), f"copies of expert {e} differ"


# ---- live re-planning -------------------------------------------------------------------------------
def _migration_rank(rank, world, plan_path, other_path, migrate=True):
    cfg = config_from_dict({"model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": 8, "top_k": K},
                            "parallel": {"nodes": 1, "gpus_per_node": world},
                            "placement": {"plan": plan_path, "layer": 0}, "run": {"dtype": "float64", "seed": 4}})
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    if migrate:  # the same two steps without any migration, for comparison
        control = _migration_rank(rank, world, plan_path, other_path, migrate=False)
    layer = build_moe_layer(cfg, groups, torch.device("cpu"))
    opt = torch.optim.Adam(layer.experts.parameters(), lr=0.01)
    x, idx, w, grad = _inputs(rank)

    def step() -> np.ndarray:
        opt.zero_grad()
        out = layer.forward_routed(x, idx, w).out_TD
        (out * grad).sum().backward()
        layer.sync_replica_grads()
        opt.step()
        return out.detach().numpy().copy()

    def snapshot() -> dict:
        params = (layer.experts.w_gate_LDF, layer.experts.w_up_LDF, layer.experts.w_down_LFD)
        return {"ids": layer.experts.global_ids, "w": [p.detach().numpy().copy() for p in params],
                "m": [opt.state[p]["exp_avg"].numpy().copy() for p in params],
                "v": [opt.state[p]["exp_avg_sq"].numpy().copy() for p in params]}

    step()
    before = snapshot()
    with torch.no_grad():
        out_before = layer.forward_routed(x, idx, w).out_TD.numpy().copy()
    if not migrate:
        step()
        return snapshot()
    other = PlanFile.load(other_path).layers[0]
    layer.apply_plan(other, opt)
    moved = snapshot()
    with torch.no_grad():
        out_moved = layer.forward_routed(x, idx, w).out_TD.numpy().copy()
    step()  # training goes on under the new plan (replica gradient sync included)
    layer.apply_plan(PlanFile.load(plan_path).layers[0], opt)
    return {"before": before, "moved": moved, "out_before": out_before, "out_moved": out_moved, "back": snapshot(),
            "control": control}


def test_apply_plan_moves_weights_and_optimizer_state_and_changes_no_result(tmp_path):
    world = 4
    start, other = PlacementPlan.random(8, world, 1), replica_plan(8, world, 1, seed=9)
    for name, plan in (("start", start), ("other", other)):
        PlanFile(Topology(1, world), 8, {0: plan}, "test").save(tmp_path / f"{name}.json")
    got = run_ranks(world, _migration_rank, str(tmp_path / "start.json"), str(tmp_path / "other.json"))
    by_expert: dict[int, list] = {}
    for res in got:
        for slot, e in enumerate(res["before"]["ids"]):
            by_expert[e] = [res["before"][k][i][slot] for k in ("w", "m", "v") for i in range(3)]
    for r, res in enumerate(got):
        np.testing.assert_allclose(res["out_moved"], res["out_before"], rtol=1e-12, atol=1e-12)
        assert res["moved"]["ids"] == other.rank_experts[r]
        for slot, e in enumerate(res["moved"]["ids"]):  # every copy, replicas included, came over intact
            moved = [res["moved"][k][i][slot] for k in ("w", "m", "v") for i in range(3)]
            assert all(np.array_equal(a, b) for a, b in zip(moved, by_expert[e])), (r, e)
        assert res["back"]["ids"] == start.rank_experts[r]
    for res in got:  # a step under the replica plan, then back: the same model as two steps without moving
        assert res["back"]["ids"] == res["control"]["ids"]
        for k in ("w", "m", "v"):
            for a, b in zip(res["back"][k], res["control"][k]):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
