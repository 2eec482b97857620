"""MoELayer end to end on gloo ranks: every router kind under every dispatcher, and planned
placement changes nothing but where experts live."""
from __future__ import annotations

import torch
from ranks import run_ranks

from c2r_comm.config import config_from_dict
from c2r_comm.dispatch import DISPATCHERS
from c2r_comm.experts import init_expert_weights, reference_moe
from c2r_comm.layer import build_moe_layer
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology

E, K, D, F, T = 8, 3, 16, 24, 10


def _config(world, routing, plan_path=None):
    return config_from_dict({
        "model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": E, "top_k": K},
        "parallel": {"nodes": 1, "gpus_per_node": world},
        "routing": routing, "placement": {"plan": plan_path, "layer": 0},
        "run": {"tokens_per_rank": T, "seed": 3},
    })


def _run_layer(config, groups, dispatcher, rank):
    torch.manual_seed(100 + rank)
    x = torch.randn(T, D, requires_grad=True)
    grad = torch.randn(T, D)
    layer = build_moe_layer(config, groups, torch.device("cpu"), dispatcher=dispatcher)
    out = layer(x)
    ((out.out_TD * grad).sum() + out.aux_loss).backward()
    return layer, x, grad, out


def _reference_errors(layer, x, grad, out):
    """Recompute with the same router module and a single-process MoE over global expert weights."""
    xr = x.detach().clone().requires_grad_()
    layer.zero_grad()
    routed = layer.router(xr)
    experts = [init_expert_weights(e, D, F, seed=3) for e in range(E)]
    ref = reference_moe(xr, routed.topk_idx_TK, routed.topk_weight_TK, experts)
    ((ref * grad).sum() + routed.aux_loss).backward()
    return {"out": float((out.out_TD - ref).abs().max()), "grad_x": float((x.grad - xr.grad).abs().max()),
            "same_routing": bool(torch.equal(out.routing.topk_idx_TK, routed.topk_idx_TK))}


def _layer_worker(rank, world, collab_path, plan_path):
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    routings = {
        "topk": {"kind": "topk"},
        "c2r": {"kind": "c2r", "top_t": 3, "collaborators": collab_path},
        "device_constrained": {"kind": "device_constrained", "max_groups": 1, "level": "gpu"},
    }
    results = {}
    for kind, routing in routings.items():
        for name in DISPATCHERS:
            if name == "hierarchical":
                continue  # flat topology here; covered by tests/test_hierarchical.py
            layer, x, grad, out = _run_layer(_config(world, routing), groups, name, rank)
            results[(kind, name)] = _reference_errors(layer, x, grad, out)
            if kind == "device_constrained":  # max_groups=1: every token on one rank
                e2r = torch.tensor(layer.dispatcher.plan.expert_to_rank)
                ranks = e2r[out.routing.topk_idx_TK]
                results[(kind, name)]["one_rank"] = bool((ranks == ranks[:, :1]).all())
    # Planned placement: same outputs and gradients as contiguous.
    base = _run_layer(_config(world, routings["topk"]), groups, "dedup", rank)
    planned = _run_layer(_config(world, routings["topk"], plan_path), groups, "dedup", rank)
    results["plan"] = {
        "moved": planned[0].dispatcher.plan.expert_to_rank != base[0].dispatcher.plan.expert_to_rank,
        "out": float((base[3].out_TD - planned[3].out_TD).abs().max()),
        "grad_x": float((base[1].grad - planned[1].grad).abs().max()),
        "grad_gate": float((base[0].router.gate.weight.grad - planned[0].router.gate.weight.grad).abs().max()),
    }
    return results


def test_every_router_under_every_dispatcher_and_planned_placement(tmp_path):
    world = 2
    trace = RoutingTrace.synthetic(2000, E, K, num_clusters=2, seed=1)
    prof = CollaborationProfiler(1, E)
    prof.update_layers(trace.expert_ids)
    collab = tmp_path / "collab.npz"
    prof.stats().save(collab)
    plan_path = tmp_path / "plan.json"
    PlanFile(Topology(1, world), E, {0: PlacementPlan.random(E, world, seed=5)}, "random").save(plan_path)

    for rank, res in enumerate(run_ranks(world, _layer_worker, str(collab), str(plan_path))):
        for key, errs in res.items():
            if key == "plan":
                assert errs["moved"]
                assert errs["out"] < 1e-5 and errs["grad_x"] < 1e-5 and errs["grad_gate"] < 1e-5, errs
                continue
            assert errs["same_routing"], (rank, key)
            assert errs["out"] < 1e-5 and errs["grad_x"] < 1e-5, (rank, key, errs)
            if key[0] == "device_constrained":
                assert errs["one_rank"], (rank, key)



def _rng_worker(rank, world, collab_path):
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    routings = {"topk": {"kind": "topk"}, "c2r": {"kind": "c2r", "top_t": 3, "collaborators": collab_path},
                "device_constrained": {"kind": "device_constrained", "max_groups": 1}}
    results = {}
    for kind, routing in routings.items():
        data = _config(world, routing).to_dict()
        data["model"]["num_shared_experts"] = 1

        def gate(seed):
            data["run"]["seed"] = seed
            layer = build_moe_layer(config_from_dict(data), groups, torch.device("cpu"))
            return layer.router.gate.weight.detach().clone()

        torch.manual_seed(1234)
        before = torch.get_rng_state()
        a, b, c = gate(3), gate(3), gate(4)
        results[kind] = {"rng_unchanged": bool(torch.equal(before, torch.get_rng_state())),
                         "same_seed_same_gate": bool(torch.equal(a, b)), "other_seed_other_gate": not torch.equal(a, c),
                         "within_linear_init_bound": bool(a.abs().max() <= D ** -0.5)}
    return results


def test_build_leaves_global_rng_alone_and_gate_follows_run_seed(tmp_path):
    prof = CollaborationProfiler(1, E)
    prof.update_layers(RoutingTrace.synthetic(500, E, K, num_clusters=2, seed=1).expert_ids)
    prof.stats().save(tmp_path / "collab.npz")
    (res,) = run_ranks(1, _rng_worker, str(tmp_path / "collab.npz"))
    assert set(res) == {"topk", "c2r", "device_constrained"}
    for kind, checks in res.items():
        assert all(checks.values()), (kind, checks)


def _state_dict_worker(rank, world):
    """What a library user does with a layer's state dict, and the checks on its input."""
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    cpu = torch.device("cpu")
    config = _config(world, {"kind": "topk"})
    config64 = config_from_dict({**config.to_dict(), "run": {**config.to_dict()["run"], "dtype": "float64"}})
    torch.manual_seed(7 + rank)
    x = torch.randn(T, D, dtype=torch.float64)
    saved = build_moe_layer(config64, groups, cpu)  # contiguous: rank r holds experts 4r..4r+3
    want = saved(x).out_TD.detach()
    sd = saved.state_dict()
    found = {"ids": sd["experts._extra_state"]["global_ids"], "float64_routing": saved.router(x).topk_weight_TK.dtype}
    # the same experts on this rank in another slot order (other ranks' experts stay put): reordered on load
    e2r = [e * world // E for e in range(E)]
    swapped = PlacementPlan(tuple(e2r), world)
    fresh = build_moe_layer(config64, groups, cpu, plan=swapped)
    fresh.experts.global_ids = tuple(reversed(fresh.experts.global_ids))  # same set, reversed slots
    fresh.load_state_dict(sd)
    rows = {e: fresh.experts.w_up_LDF[slot] for slot, e in enumerate(fresh.experts.global_ids)}
    found["reordered_ok"] = all(torch.equal(rows[e], saved.experts.w_up_LDF[slot])
                                for slot, e in enumerate(saved.experts.global_ids))
    # another placement: other experts on this rank -> refused, and nothing loaded (the gate too)
    other = build_moe_layer(config64, groups, cpu, plan=PlacementPlan.random(E, world, seed=5))
    gate_before = other.router.gate.weight.detach().clone()
    try:
        other.load_state_dict(sd)
        found["refused"] = None
    except ValueError as exc:
        found["refused"] = str(exc)
    found["gate_untouched"] = torch.equal(other.router.gate.weight, gate_before)
    # a state dict saved before the ids were: loads as before
    legacy = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    again = build_moe_layer(config64, groups, cpu)
    again.load_state_dict(legacy)
    found["legacy_ok"] = torch.equal(again(x).out_TD.detach(), want)
    # expert vs replicated parameters
    experts = {id(p) for p in saved.expert_parameters()}
    found["split"] = (len(experts), [n for n, p in saved.named_parameters()
                                     if id(p) in {id(q) for q in saved.replicated_parameters()}])
    errors = []
    for bad in (lambda: saved(x.view(2, T // 2, D)), lambda: saved(x.float()),
                lambda: build_moe_layer(_config(world * 2, {"kind": "topk"}), groups, cpu)):
        try:
            bad()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    found["errors"] = errors
    # under autocast the layer runs in its own dtype (float64 here) and returns the input's
    x_bf = x.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf = saved(x_bf).out_TD
    out_bf.float().sum().backward()
    exact = saved(x_bf.detach().double()).out_TD.detach()
    found["autocast"] = (out_bf.dtype, x_bf.grad.dtype,
                         float((out_bf.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)))
    return found


def test_state_dict_carries_expert_ids_and_layer_input_is_checked():
    """A state dict names each slot's global expert: loading it under another placement is refused
    before anything loads (it silently computed with the wrong experts before), the same experts in
    other slots are reordered, an older state dict loads as before. A float64 layer routes in
    float64; 3-D input, another dtype (outside autocast; under it the layer runs in its own dtype)
    and a config for another topology get clear errors."""
    for rank, found in enumerate(run_ranks(2, _state_dict_worker)):
        assert found["ids"] == list(range(4 * rank, 4 * rank + 4))
        assert found["float64_routing"] == torch.float64
        assert found["reordered_ok"]
        assert found["refused"] is not None and "its slots hold experts" in found["refused"], found["refused"]
        assert "apply_plan" in found["refused"] and found["gate_untouched"]
        assert found["legacy_ok"]
        assert found["split"] == (3, ["router.gate.weight"])
        three_d, dtype, topology = found["errors"]
        assert "MoELayer takes x_TD [tokens, hidden], got shape (2, 5, 16)" in three_d
        assert "input dtype torch.float32: allowed the layer's torch.float64" in dtype
        assert "config parallel 1x4 but the process groups are 1x2" in topology
        out_dtype, grad_dtype, rel = found["autocast"]
        assert out_dtype == grad_dtype == torch.bfloat16 and rel < 1e-2, found["autocast"]
