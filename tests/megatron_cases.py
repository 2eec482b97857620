"""Rank-side cases for tests/test_megatron_adapter.py: megatron-core MoELayers on gloo CPU ranks.

Each case builds the same layer twice from megatron-core's TransformerConfig and local spec, once
with megatron-core's own MoEAlltoAllTokenDispatcher and once with C2RMoELayer, gives both the same
weights (set per global expert id, so a non-contiguous plan puts the same expert wherever it goes),
runs forward + backward and reports the largest differences of outputs and gradients, also against
an fp64 dense reference. The CPU shims for megatron-core's CUDA-only parts are the example's
(c2r_comm/bench/megatron_peer.py, the benchmark peer's), never the adapter's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as Fn

H, FFN, SEED = 16, 8, 7


# ---- CPU shims (the benchmark peer's; never the adapter's) ---------------------------------------
from c2r_comm.bench.megatron_peer import install_cpu_only_shims as install_cpu_shims  # noqa: E402


# ---- building layers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    num_experts: int
    topk: int = 2
    dispatcher: Optional[str] = "dedup"  # None: megatron-core's own alltoall only
    nodes: Optional[int] = None
    plan_seed: Optional[int] = None  # a random (non-contiguous) placement
    micro_batches: int = 1
    in_flight: bool = False  # dispatch every micro-batch before the first combine
    config: dict = field(default_factory=dict)
    fp64_reference: bool = True


def make_config(case: Case, ep: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=H, num_attention_heads=2, num_moe_experts=case.num_experts,
              moe_router_topk=case.topk, moe_ffn_hidden_size=FFN, ffn_hidden_size=FFN,
              moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
              moe_router_load_balancing_type="none", add_bias_linear=False, gated_linear_unit=True,
              activation_func=Fn.silu, expert_model_parallel_size=ep)
    kw.update(case.config)
    return TransformerConfig(**kw)


def build_layer(config, options=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from c2r_comm.integrations.megatron import use_c2r_dispatcher

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    if options is not None:
        spec = use_c2r_dispatcher(spec, options)
    return build_module(spec.submodules.mlp, config=config)


def expert_params(e: int, shapes: dict[str, torch.Size], dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED * 1000 + e)
    return {n: (torch.randn(s, generator=g) * 0.3).to(dtype) for n, s in shapes.items()}


def set_weights(layer, expert_of_position: tuple[int, ...], ep_rank: int) -> dict[str, torch.Size]:
    """Router, shared expert and each local module (the expert `expert_of_position` puts there)."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
        if layer.router.bias is not None:  # add_bias_linear gives the router a bias too
            layer.router.bias.copy_(torch.randn(layer.router.bias.shape, generator=g) * 0.3)
        if layer.shared_experts is not None:
            for _, p in sorted(layer.shared_experts.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        L = len(layer.experts.local_experts)
        shapes = {n: p.shape for n, p in layer.experts.local_experts[0].named_parameters()}
        for i, module in enumerate(layer.experts.local_experts):
            values = expert_params(expert_of_position[ep_rank * L + i], shapes)
            for n, p in module.named_parameters():
                p.copy_(values[n])
    return shapes


def _inputs(rank: int, mb: int):
    g = torch.Generator().manual_seed(100 * rank + mb)
    S = 3 + rank + mb  # ranks and micro-batches hold different token counts
    return torch.randn(S, 2, H, generator=g), torch.randn(S, 2, H, generator=g)


# ---- running -----------------------------------------------------------------------------------
def run_layer(layer, rank: int, case: Case) -> dict[str, Any]:
    """Forward + backward of every micro-batch; returns outputs, input grads and routing maps."""
    maps: list[torch.Tensor] = []
    hook = layer.router.register_forward_hook(lambda m, i, o: maps.append(o[1].detach().clone()))
    xs, gs = zip(*(_inputs(rank, mb) for mb in range(case.micro_batches)))
    xs = [x.clone().requires_grad_() for x in xs]
    if case.in_flight:
        staged = []
        for x in xs:  # dispatch every micro-batch ...
            probs, routing_map = layer.route(x)
            h, p = layer.preprocess(x, probs, routing_map)
            staged.append(layer.dispatch(h, p))
        expert_outs = [layer.routed_experts_compute(h, p)[0] for h, p in staged]  # ... experts A, B ...
        outs = [layer.postprocess(layer.combine(o), None) for o in expert_outs]  # ... combine A, B
    else:
        outs = [layer(x)[0] for x in xs]
    hook.remove()
    sum((o * g).sum() for o, g in zip(outs, gs)).backward()
    return {"outs": [o.detach() for o in outs], "x_grads": [x.grad for x in xs], "xs": xs, "gs": gs, "maps": maps}


def expert_grads(layer, expert_of_position: tuple[int, ...], ep_rank: int, group) -> dict[int, dict]:
    """Every expert's weight gradients by global expert id, gathered from the EP group."""
    L = len(layer.experts.local_experts)
    mine = {expert_of_position[ep_rank * L + i]: {n: p.grad.clone() for n, p in m.named_parameters()}
            for i, m in enumerate(layer.experts.local_experts)}
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {e: g for part in everyone for e, g in part.items()}


def fp64_reference(config, run: dict, shapes, router, group) -> dict[str, Any]:
    """Dense MoE in fp64 with Megatron's semantics: softmax over the chosen logits, each row's prob
    scales the activation before the second linear layer and that layer's bias, outputs summed."""
    E = config.num_moe_experts
    experts = [{n: v.double().requires_grad_() for n, v in expert_params(e, shapes).items()} for e in range(E)]
    w = router.weight.detach().double().requires_grad_()
    router_b = 0 if router.bias is None else router.bias.detach().double()
    act = Fn.silu if config.gated_linear_unit else config.activation_func
    outs, x_grads = [], []
    for x, g, rmap in zip(run["xs"], run["gs"], run["maps"]):
        x64 = x.detach().double().requires_grad_()
        xt = x64.reshape(-1, H)
        probs = torch.softmax((xt @ w.t() + router_b).masked_fill(~rmap, float("-inf")), dim=1)
        out = torch.zeros_like(xt)
        for e, p in enumerate(experts):
            h = xt @ p["linear_fc1.weight"].t() + p.get("linear_fc1.bias", 0)
            if config.gated_linear_unit:
                a, b = h.chunk(2, dim=-1)
                h = act(a) * b
            else:
                h = act(h)
            y = (h * probs[:, e:e + 1]) @ p["linear_fc2.weight"].t() + probs[:, e:e + 1] * p.get("linear_fc2.bias", 0)
            out = out + y * rmap[:, e:e + 1]
        out = out.reshape(x.shape)
        (out * g.double()).sum().backward()
        outs.append(out.detach())
        x_grads.append(x64.grad)
    grads = {e: {n: v.grad for n, v in p.items()} for e, p in enumerate(experts)}
    for e in range(E):
        for v in grads[e].values():
            dist.all_reduce(v, group=group)  # every rank's tokens
    return {"outs": outs, "x_grads": x_grads, "router_grad": w.grad, "expert_grads": grads}


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(case: Case, rank: int, ep_rank: int, ep: int, groups=None) -> dict[str, float]:
    """The case's layer with megatron-core's alltoall and with C2R: largest differences."""
    from megatron.core import parallel_state

    from c2r_comm.integrations.megatron import C2RMegatronOptions, expert_at_megatron_position
    from c2r_comm.plan import PlacementPlan

    group = parallel_state.get_expert_model_parallel_group()
    config = make_config(case, ep)
    contiguous = tuple(range(case.num_experts))
    ref = build_layer(config)
    shapes = set_weights(ref, contiguous, ep_rank)
    # megatron-core's own dispatcher keeps per-call state on itself: one micro-batch at a time
    ref_run = run_layer(ref, rank, replace(case, in_flight=False))
    result = {}
    plan = None if case.plan_seed is None else PlacementPlan.random(case.num_experts, ep, case.plan_seed)
    options = C2RMegatronOptions(dispatcher=case.dispatcher, nodes=case.nodes, plan=plan, groups=groups)
    ours = build_layer(config, options)
    positions = contiguous if plan is None else expert_at_megatron_position(plan)
    set_weights(ours, positions, ep_rank)
    run = run_layer(ours, rank, case)
    result["routing_equal"] = float(all(torch.equal(a, b) for a, b in zip(ref_run["maps"], run["maps"])))
    result["dropped_choices"] = float(sum(int((case.topk - m.sum(1)).sum()) for m in run["maps"]))  # capacity mode
    result["out_vs_megatron"] = _max_diff(run["outs"], ref_run["outs"])
    result["x_grad_vs_megatron"] = _max_diff(run["x_grads"], ref_run["x_grads"])
    result["router_grad_vs_megatron"] = _max_diff(ours.router.weight.grad, ref.router.weight.grad)
    ours_eg = expert_grads(ours, positions, ep_rank, group)
    ref_eg = expert_grads(ref, contiguous, ep_rank, group)
    result["expert_grad_vs_megatron"] = _max_diff(ours_eg, ref_eg)
    if ours.shared_experts is not None:
        result["shared_grad_vs_megatron"] = _max_diff(
            {n: p.grad for n, p in ours.shared_experts.named_parameters()},
            {n: p.grad for n, p in ref.shared_experts.named_parameters()})
    if case.fp64_reference:
        ref64 = fp64_reference(config, run, shapes, ours.router, group)
        result["out_vs_fp64"] = _max_diff(run["outs"], ref64["outs"])
        result["x_grad_vs_fp64"] = _max_diff(run["x_grads"], ref64["x_grads"])
        result["router_grad_vs_fp64"] = _max_diff(ours.router.weight.grad, ref64["router_grad"])
        result["expert_grad_vs_fp64"] = _max_diff(ours_eg, ref64["expert_grads"])
    result["in_flight_after"] = float(ours.token_dispatcher.in_flight)
    result["scale"] = max(float(o.abs().max()) for o in ref_run["outs"])
    return result


# ---- rank workers (module level: run_ranks pickles them) ----------------------------------------
def _misuse_cases(rank: int, ep: int) -> dict[str, str]:
    """FIFO misuse and a bad routing map on one rank: clear errors, and the layer works after."""
    from megatron.core import parallel_state

    from c2r_comm.dispatch import InputError
    from c2r_comm.integrations.megatron import C2RMegatronOptions

    case = Case("misuse", num_experts=2 * ep)
    layer = build_layer(make_config(case, ep), C2RMegatronOptions())
    set_weights(layer, tuple(range(case.num_experts)), parallel_state.get_expert_model_parallel_rank())
    d, out = layer.token_dispatcher, {}
    try:
        d.token_combine(torch.zeros(0, H))
        out["fifo"] = "no error"
    except RuntimeError as exc:
        out["fifo"] = str(exc)
    E = case.num_experts
    rmap = torch.zeros(4, E, dtype=torch.bool)
    rmap[:, :2] = True
    if rank == 0:
        rmap[1, 1] = False  # one expert instead of moe_router_topk=2
    h, p = d.dispatch_preprocess(torch.randn(4, H), rmap, rmap.float() / 2)
    try:
        d.token_dispatch(h, p)
        out["bad_map"] = "no error"
    except InputError as exc:
        out["bad_map"] = str(exc)
    out["in_flight_after_error"] = str(d.in_flight)
    x = torch.randn(3, 2, H, requires_grad=True)
    layer(x)[0].sum().backward()
    out["after_error_ok"] = str(bool(torch.isfinite(x.grad).all()))
    return out


def world_worker(rank: int, world: int, cases: list[Case], sub_ep: Optional[int], sub_cases: list[Case]):
    """Cases with EP = world; then, with sub_ep, EP groups smaller than the world (data-parallel
    replicas) through megatron_process_groups."""
    install_cpu_shims()
    from megatron.core import parallel_state

    from c2r_comm.integrations.megatron import C2RMegatronOptions, megatron_process_groups

    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    results: dict[str, Any] = {c.name: compare(c, rank, rank, world) for c in cases}
    results["misuse"] = _misuse_cases(rank, world)
    if sub_ep is not None:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(expert_model_parallel_size=sub_ep)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        try:
            build_layer(make_config(Case("x", num_experts=2 * sub_ep), sub_ep), C2RMegatronOptions())
            results["groups_none_error"] = "no error"
        except ValueError as exc:
            results["groups_none_error"] = str(exc)
        by_nodes = {}
        for c in sub_cases:
            nodes = c.nodes or 1
            if nodes not in by_nodes:
                by_nodes[nodes] = megatron_process_groups(nodes=nodes, timeout_s=60)
            results[c.name] = compare(c, rank, ep_rank, sub_ep, groups=by_nodes[nodes])
        results["ep_group_ranks"] = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
    return results


def host_reads_worker(rank: int, world: int, cases: list[Case]) -> dict[str, tuple[list[str], int]]:
    """Per case: the host reads tests/host_reads.py finds in the second forward + backward of
    megatron-core's MoELayer with our dispatcher, and the count exchanges it let through."""
    install_cpu_shims()
    from host_reads import HostReadGuard
    from megatron.core import parallel_state

    from c2r_comm.integrations.megatron import C2RMegatronOptions

    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    found = {}
    for case in cases:
        layer = build_layer(make_config(case, world),
                            C2RMegatronOptions(dispatcher=case.dispatcher, nodes=case.nodes))
        set_weights(layer, tuple(range(case.num_experts)), parallel_state.get_expert_model_parallel_rank())
        for step in range(2):  # the second step is guarded: one-time set-up may read the host
            x, _ = _inputs(rank, step)
            x.requires_grad_()
            with HostReadGuard() as guard:
                layer(x)[0].sum().backward()
        found[case.name] = (guard.violations, guard.count_exchanges)
    return found
