"""Routers: C2R and device-constrained selection rules, gradients, the config factory, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from c2r_comm.config import ConfigError, ModelConfig, RoutingConfig, config_from_dict
from c2r_comm.plan import PlacementPlan, distinct_per_token, expert_to_node
from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.routing.factory import build_router
from c2r_comm.routing.router import C2RRouter, DeviceConstrainedRouter, TopKRouter
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology


def all_partners(E: int) -> torch.Tensor:
    """T = E-1 lists in a shuffled (but valid) order: order must not matter for the choice."""
    g = torch.Generator().manual_seed(E)
    rows = [torch.tensor([j for j in range(E) if j != i])[torch.randperm(E - 1, generator=g)] for i in range(E)]
    return torch.stack(rows)


def random_lists(E: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(E):
        others = torch.tensor([j for j in range(E) if j != i])
        rows.append(others[torch.randperm(E - 1, generator=g)[:T]])
    return torch.stack(rows)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,K", [(8, 2), (16, 4), (60, 4)])
def test_c2r_with_all_partners_equals_topk_bitwise(E, K, renormalize):
    torch.manual_seed(E * 10 + K)
    topk = TopKRouter(16, E, K, renormalize=renormalize, aux_loss_weight=0.01, z_loss_weight=0.001)
    c2r = C2RRouter(16, E, K, all_partners(E), E - 1, renormalize=renormalize, aux_loss_weight=0.01,
                    z_loss_weight=0.001)
    logits = torch.randn(2048, E) * 3
    a, b = topk.route_logits(logits), c2r.route_logits(logits)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK)
    assert torch.equal(a.topk_weight_TK, b.topk_weight_TK)
    assert torch.equal(a.aux_loss, b.aux_loss)


def reference_c2r(probs_TE: torch.Tensor, lists_ET: torch.Tensor, K: int) -> list[set]:
    """Token-by-token reading of the paper's rule."""
    out = []
    for p in probs_TE.tolist():
        top1 = max(range(len(p)), key=lambda e: p[e])
        cands = sorted(lists_ET[top1].tolist(), key=lambda e: -p[e])
        out.append({top1, *cands[:K - 1]})
    return out


@pytest.mark.parametrize("E,K,T", [(8, 2, 1), (16, 4, 3), (16, 4, 5), (60, 4, 30)])
def test_c2r_small_t_respects_collaborators(E, K, T):
    torch.manual_seed(T)
    lists = random_lists(E, T, seed=T)
    c2r = C2RRouter(8, E, K, lists, T)
    probs = torch.softmax(torch.randn(512, E) * 2, -1)
    idx = c2r.select(probs)
    plain = torch.topk(probs, K, -1).indices
    assert torch.equal(idx[:, 0], plain[:, 0])  # top-1 unchanged
    allowed = torch.zeros(512, E, dtype=torch.bool)
    allowed.scatter_(1, lists[idx[:, 0]], True)
    allowed.scatter_(1, idx[:, :1], True)
    assert allowed.gather(1, idx).all()
    assert [set(r) for r in idx.tolist()] == reference_c2r(probs, lists, K)
    assert (idx.sort(1).values.diff(dim=1) != 0).all()


@pytest.mark.parametrize("renormalize", [True, False])
def test_c2r_gradcheck_through_gathered_scores(renormalize):
    torch.manual_seed(1)
    E, K, T = 8, 3, 3
    router = C2RRouter(4, E, K, random_lists(E, T, seed=3), T, renormalize=renormalize).double()
    logits = (torch.randn(6, E, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: router.route_logits(z).topk_weight_TK, (logits,), eps=1e-6, atol=1e-7)
    # And into the gate weights through compute_logits.
    x = torch.randn(6, 4, dtype=torch.float64)
    router.route_logits(router.gate(x)).topk_weight_TK.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def reference_device_constrained(probs_TE: torch.Tensor, group_E: np.ndarray, K: int, max_groups: int) -> list[set]:
    out = []
    for p in probs_TE.tolist():
        order = sorted(range(len(p)), key=lambda e: -p[e])
        frozen: list[int] = []
        for e in order[:K]:
            if group_E[e] not in frozen and len(frozen) < max_groups:
                frozen.append(group_E[e])
        out.append(set([e for e in order if group_E[e] in frozen][:K]))
    return out


@pytest.mark.parametrize("level", ["gpu", "node"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_constrained_limits_groups(level, seed):
    rng = np.random.default_rng(seed)
    topo = [Topology(2, 4), Topology(4, 2), Topology(1, 8)][seed]
    E, K = 32, int(rng.integers(2, 7))
    plan = PlacementPlan.random(E, topo.world_size, seed=seed)
    group_E = np.asarray(plan.expert_to_rank) if level == "gpu" else expert_to_node(plan, topo)
    G = int(group_E.max()) + 1
    torch.manual_seed(seed)
    logits = torch.randn(1024, E) * 2
    probs = torch.softmax(logits, -1)
    plain = TopKRouter(8, E, K).route_logits(logits)
    per = E // G
    for max_groups in range(max(1, -(-K // per)), G + 1):
        r = DeviceConstrainedRouter(8, E, K, torch.from_numpy(group_E), max_groups)
        out = r.route_logits(logits)
        idx = out.topk_idx_TK
        assert (distinct_per_token(group_E, idx.numpy()) <= max_groups).all()
        assert torch.equal(idx[:, 0], plain.topk_idx_TK[:, 0])
        assert [set(x) for x in idx[:64].tolist()] == reference_device_constrained(probs[:64], group_E, K, max_groups)
        if max_groups >= min(G, K):  # top-k can never touch more groups than this
            assert torch.equal(idx, plain.topk_idx_TK)
            assert torch.equal(out.topk_weight_TK, plain.topk_weight_TK)


def test_device_constrained_actually_constrains():
    torch.manual_seed(0)
    r = DeviceConstrainedRouter(8, 16, 4, torch.arange(16) // 4, 1)
    idx = r.route_logits(torch.randn(256, 16)).topk_idx_TK
    assert ((idx // 4) == (idx[:, :1] // 4)).all()


# ---- bad input ------------------------------------------------------------------------------
def test_c2r_rejects_bad_collaborators():
    E, K = 8, 3
    good = random_lists(E, 4, seed=0)
    with pytest.raises(ValueError, match="shape"):
        C2RRouter(4, E, K, good[:5], 4)
    with pytest.raises(ValueError, match="shape"):
        C2RRouter(4, E, K, good.flatten(), 4)
    with pytest.raises(ValueError, match="fewer than top_t"):
        C2RRouter(4, E, K, good, 5)
    with pytest.raises(ConfigError, match="'routing.top_t' = 1 is invalid"):
        C2RRouter(4, E, K, good, 1)  # T < k-1
    with pytest.raises(ConfigError, match="'routing.top_t' = 8 is invalid"):
        C2RRouter(4, E, K, torch.zeros(E, 8, dtype=torch.long), 8)
    bad = good.clone()
    bad[2, 0] = 8
    with pytest.raises(ValueError, match=r"0\.\.7, found"):
        C2RRouter(4, E, K, bad, 4)
    bad = good.clone()
    bad[3, 1] = 3
    with pytest.raises(ValueError, match="includes the expert itself"):
        C2RRouter(4, E, K, bad, 4)
    bad = good.clone()
    bad[1, 1] = bad[1, 0]
    with pytest.raises(ValueError, match="repeat a partner"):
        C2RRouter(4, E, K, bad, 4)
    with pytest.raises(ValueError, match="integer expert ids"):
        C2RRouter(4, E, K, good.float(), 4)


def test_device_constrained_rejects_bad_groups():
    with pytest.raises(ValueError, match="shape"):
        DeviceConstrainedRouter(4, 8, 2, torch.arange(4), 1)
    with pytest.raises(ValueError, match="fewer than top_k"):
        DeviceConstrainedRouter(4, 8, 4, torch.arange(8) // 2, 1)  # 2 experts per group, k=4
    with pytest.raises(ValueError, match="max_groups must be >= 1"):
        DeviceConstrainedRouter(4, 8, 2, torch.arange(8) // 2, 0)


# ---- factory and YAML -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    trace = RoutingTrace.synthetic(4096, 16, 4, num_layers=3, num_clusters=4, in_cluster=0.9, seed=5)
    prof = CollaborationProfiler(3, 16)
    prof.update_layers(trace.expert_ids)
    path = tmp_path_factory.mktemp("stats") / "stats.npz"
    prof.stats().save(path)
    return path, prof.stats()


def test_factory_builds_each_kind(stats_file):
    path, stats = stats_file
    model = ModelConfig(hidden_size=16, num_experts=16, top_k=4)
    topo = Topology(2, 2)
    plan = PlacementPlan.random(16, 4, seed=1)
    x = torch.randn(64, 16)
    r = build_router(model, RoutingConfig(kind="topk"), plan, topo, layer=0)
    assert type(r) is TopKRouter and r(x).topk_idx_TK.shape == (64, 4)
    r = build_router(model, RoutingConfig(kind="c2r", top_t=5, collaborators=str(path)), plan, topo, layer=2)
    assert isinstance(r, C2RRouter)
    assert np.array_equal(r.collaborators_ET.numpy(), stats.collaborators(5)[2])
    out = r(x)
    assert r.collaborators_ET[out.topk_idx_TK[:, 0]].unsqueeze(1).eq(out.topk_idx_TK[:, 1:, None]).any(-1).all()
    for level, groups in (("gpu", np.asarray(plan.expert_to_rank)), ("node", expert_to_node(plan, topo))):
        r = build_router(model, RoutingConfig(kind="device_constrained", max_groups=1, level=level), plan, topo, 0)
        assert isinstance(r, DeviceConstrainedRouter)
        assert (distinct_per_token(groups, r(x).topk_idx_TK.numpy()) == 1).all()


def test_factory_from_yaml_dict_and_explicit_lists(tmp_path):
    lists = np.stack([random_lists(8, 5, seed=s).numpy() for s in range(2)])  # [L=2, E=8, T=5]
    np.savez(tmp_path / "lists.npz", collaborators_LET=lists)
    cfg = config_from_dict({"model": {"hidden_size": 8, "num_experts": 8, "top_k": 2},
                            "routing": {"kind": "c2r", "top_t": 3, "collaborators": str(tmp_path / "lists.npz")}})
    r = build_router(cfg.model, cfg.routing, PlacementPlan.contiguous(8, 1), Topology(1, 1), layer=1)
    assert np.array_equal(r.collaborators_ET.numpy(), lists[1][:, :3])


def test_factory_errors(tmp_path, stats_file):
    path, _ = stats_file
    model = ModelConfig(hidden_size=8, num_experts=16, top_k=4)
    plan, topo = PlacementPlan.contiguous(16, 4), Topology(1, 4)
    with pytest.raises(ConfigError, match="routing.collaborators"):
        build_router(model, RoutingConfig(kind="c2r", top_t=4, collaborators=str(tmp_path / "nope.npz")), plan, topo, 0)
    with pytest.raises(ConfigError, match="routing.top_t"):
        build_router(model, RoutingConfig(kind="c2r", top_t=2, collaborators=str(path)), plan, topo, 0)
    with pytest.raises(ConfigError, match="routing.top_t"):
        build_router(model, RoutingConfig(kind="c2r", top_t=16, collaborators=str(path)), plan, topo, 0)
    with pytest.raises(ValueError, match="layer 7 was not profiled"):
        build_router(model, RoutingConfig(kind="c2r", top_t=4, collaborators=str(path)), plan, topo, 7)
    with pytest.raises(ValueError, match="profiled with 16 experts but the model has 32"):
        build_router(ModelConfig(num_experts=32, top_k=4), RoutingConfig(kind="c2r", top_t=4, collaborators=str(path)),
                     PlacementPlan.contiguous(32, 4), topo, 0)
    np.savez(tmp_path / "bad.npz", collaborators_LET=np.zeros((2, 15, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="collaborators_LET must be"):
        build_router(model, RoutingConfig(kind="c2r", top_t=4, collaborators=str(tmp_path / "bad.npz")), plan, topo, 0)
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="not a profiler .npz"):
        build_router(model, RoutingConfig(kind="c2r", top_t=4, collaborators=str(tmp_path / "other.npz")), plan, topo, 0)
    with pytest.raises(ValueError, match="placement plan is for 16 experts on 4 ranks"):
        build_router(model, RoutingConfig(kind="device_constrained", max_groups=2), plan, Topology(2, 4), 0)
    with pytest.raises(ConfigError, match="routing.top_t"):
        config_from_dict({"model": {"num_experts": 16, "top_k": 4},
                          "routing": {"kind": "c2r", "top_t": 1, "collaborators": str(path)}})


@pytest.mark.parametrize("K,T,ok", [(4, 2, False), (4, 3, True), (4, 15, True), (4, 16, False),
                                    (2, 0, False), (2, 1, True), (1, 1, True), (1, 0, False)])
def test_one_top_t_rule_and_error_at_config_factory_and_router(stats_file, K, T, ok):
    """max(1, top_k-1) <= top_t <= num_experts-1 (16 experts here), the same ConfigError everywhere;
    the profiler's lists know no top_k, so there only 1 <= top_t <= 15."""
    path, stats = stats_file
    model = ModelConfig(hidden_size=8, num_experts=16, top_k=K)
    routing = RoutingConfig(kind="c2r", top_t=T, collaborators=str(path))
    plan, topo = PlacementPlan.contiguous(16, 1), Topology(1, 1)
    levels = {
        "config": lambda: config_from_dict({"model": {"hidden_size": 8, "num_experts": 16, "top_k": K},
                                            "routing": {"kind": "c2r", "top_t": T, "collaborators": str(path)}}),
        "factory": lambda: build_router(model, routing, plan, topo, 0),
        "router": lambda: C2RRouter(8, 16, K, all_partners(16), T),
    }
    for level, build in levels.items():
        if ok:
            build()
            continue
        with pytest.raises(ConfigError) as info:
            build()
        assert info.value.field_name == "routing.top_t" and info.value.value == T, level
        assert "<= top_t <= num_experts-1 = 15" in info.value.allowed, level
    if 1 <= T <= 15:
        assert stats.collaborators(T).shape == (3, 16, T)
    else:
        with pytest.raises(ConfigError, match="'routing.top_t'"):
            stats.collaborators(T)
