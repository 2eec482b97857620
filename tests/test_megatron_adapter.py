"""The megatron-core adapter against real megatron-core 0.16.1 (extra `megatron`) on 2 and 4 gloo ranks.

A megatron-core MoELayer built from its own TransformerConfig and local spec, with C2RMoELayer's
dedup or hierarchical dispatcher, must give the outputs and gradients (input, router, every expert,
shared expert) of the same layer with megatron-core's MoEAlltoAllTokenDispatcher and of an fp64
dense reference: with contiguous and random placements, expert biases, two micro-batches
dispatched before the first combine, the overlapped shared expert, and EP groups smaller than the
world. Unsupported options raise errors naming them. The CPU shims for megatron-core's CUDA-only
parts are in tests/megatron_cases.py. Each world size is one launch (imports dominate).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as Fn

pytest.importorskip("megatron.core", reason="megatron-core is not installed: bash launch/setup_env.sh megatron "
                                            "(pip install 'c2r-comm[megatron]')")

from megatron_cases import Case, make_config  # noqa: E402
from ranks import run_ranks  # noqa: E402

GELU_BIAS = dict(add_bias_linear=True, gated_linear_unit=False, activation_func=Fn.gelu)
SHARED_OVERLAP = dict(moe_shared_expert_intermediate_size=8, moe_shared_expert_overlap=True)

CASES_2 = [
    Case("dedup", 4),
    Case("hierarchical_bias", 4, dispatcher="hierarchical", nodes=2, config=GELU_BIAS),
    Case("two_in_flight", 4, micro_batches=2, in_flight=True),
    Case("shared_expert_overlap", 4, config=SHARED_OVERLAP, fp64_reference=False),
    # capacity mode: Megatron's router drops; its own dispatcher is the reference (the fp64 one is dropless)
    Case("capacity_probs_two_in_flight", 4, micro_batches=2, in_flight=True,
         config=dict(moe_expert_capacity_factor=0.5), fp64_reference=False),
]
CASES_4 = [
    Case("dedup_k3", 8, topk=3),
    Case("hierarchical_random_plan", 8, dispatcher="hierarchical", nodes=2, plan_seed=5),
    Case("dedup_random_plan_two_in_flight", 8, plan_seed=11, micro_batches=2, in_flight=True, config=GELU_BIAS),
    Case("capacity_position_hierarchical", 8, topk=3, dispatcher="hierarchical", nodes=2, plan_seed=3,
         config=dict(moe_expert_capacity_factor=0.75, moe_token_drop_policy="position"), fp64_reference=False),
]
CASES_4_EP2 = [  # EP groups {0, 1} and {2, 3}: two data-parallel replicas
    Case("ep2_dedup", 4),
    Case("ep2_hierarchical_two_in_flight", 4, dispatcher="hierarchical", nodes=2, micro_batches=2, in_flight=True),
]
EXACT = 1e-5  # ours vs megatron-core's own dispatcher: same arithmetic, summation order aside
FP64 = 1e-4  # fp32 layers vs the fp64 reference


@pytest.fixture(scope="module")
def world2():
    from megatron_cases import world_worker

    return run_ranks(2, world_worker, CASES_2, None, [], timeout_s=150)


@pytest.fixture(scope="module")
def world4():
    from megatron_cases import world_worker

    return run_ranks(4, world_worker, CASES_4, 2, CASES_4_EP2, timeout_s=200)


def _check(results, cases):
    for case in cases:  # capacity cases do drop (on some rank); dropless ones never
        dropped = sum(res[case.name]["dropped_choices"] for res in results)
        assert (dropped > 0) == ("moe_expert_capacity_factor" in case.config), (case.name, dropped)
    for rank, res in enumerate(results):
        for case in cases:
            r = res[case.name]
            where = f"rank {rank} case {case.name}: {r}"
            assert r["routing_equal"] == 1.0, where
            for key, value in r.items():
                if key.endswith("_vs_megatron"):
                    assert value <= EXACT * max(1.0, r["scale"]), f"{key} {where}"
                if key.endswith("_vs_fp64"):
                    assert value <= FP64 * max(1.0, r["scale"]), f"{key} {where}"
            assert case.fp64_reference == ("out_vs_fp64" in r), where
            assert r["in_flight_after"] == 0.0, where
            if case.config.get("moe_shared_expert_intermediate_size"):
                assert "shared_grad_vs_megatron" in r, where


def test_two_ranks_match_megatron_alltoall_and_fp64(world2):
    _check(world2, CASES_2)


def test_four_ranks_match_megatron_alltoall_and_fp64(world4):
    _check(world4, CASES_4 + CASES_4_EP2)
    assert [r["ep_group_ranks"] for r in world4] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_ep_group_smaller_than_world_needs_shared_groups(world4):
    for res in world4:
        msg = res["groups_none_error"]
        assert "c2r option groups=None" in msg and "megatron_process_groups" in msg, msg


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_misuse_raises_clear_errors_and_layer_recovers(world, request):
    for rank, res in enumerate(request.getfixturevalue(world)):
        m = res["misuse"]
        assert m["fifo"].startswith("token_combine called with no micro-batch waiting for it"), m
        assert "dispatch A, dispatch B, combine A, combine B" in m["fifo"], m
        assert "dispatch input rejected on every rank" in m["bad_map"], m  # every rank, though only rank 0 erred
        assert "moe_router_topk=2" in m["bad_map"], m
        assert m["in_flight_after_error"] == "0" and m["after_error_ok"] == "True", m


# ---- unsupported options: refused before any collective (no ranks needed) --------------------------
def _build(config, options=None):
    from megatron_cases import build_layer

    return build_layer(config, options)


@pytest.mark.parametrize("option, overrides, allowed", [
    ("expert_tensor_parallel_size", dict(expert_tensor_parallel_size=2), "1 (experts are not tensor-parallel)"),
    ("moe_token_dispatcher_type", dict(moe_token_dispatcher_type="flex"), "('alltoall', 'allgather')"),
    ("moe_pad_expert_input_to_capacity",
     dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), "False"),
    ("recompute_modules", dict(recompute_granularity="selective", recompute_modules=["moe"]), "a list without 'moe'"),
])
def test_unsupported_megatron_option_is_named(option, overrides, allowed):
    from c2r_comm.integrations.megatron import C2RMegatronOptions, check_megatron_config

    config = make_config(dataclasses.replace(Case("x", 4), config=overrides), ep=1)
    with pytest.raises(ValueError, match="megatron option") as err:
        _build(config, C2RMegatronOptions())
    assert f"megatron option {option}=" in str(err.value) and "allowed" in str(err.value)
    assert allowed in str(err.value)
    with pytest.raises(ValueError, match="megatron option"):
        check_megatron_config(config)


@pytest.mark.parametrize("field, value, needle", [
    ("dispatcher", "alltoall", "c2r option dispatcher='alltoall' is not supported: allowed ('dedup', 'hierarchical')"),
    ("dispatcher", "fancy", "c2r option dispatcher='fancy'"),
    ("nodes", 0, "c2r option nodes=0 is invalid"),
    ("plan", [0, 1], "c2r option plan=list is invalid"),
    ("timeout_s", float("nan"), "c2r option timeout_s=nan is invalid"),
])
def test_unknown_c2r_option_is_named(field, value, needle):
    from c2r_comm.integrations.megatron import C2RMegatronOptions

    with pytest.raises(ValueError) as err:
        C2RMegatronOptions(**{field: value})
    assert needle in str(err.value)


def test_spec_helper_swaps_only_the_moe_module():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from c2r_comm.integrations.megatron import C2RMegatronOptions, C2RMoELayer, use_c2r_dispatcher

    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    options = C2RMegatronOptions(dispatcher="hierarchical", nodes=2)
    new = use_c2r_dispatcher(spec, options)
    assert spec.submodules.mlp.module is MoELayer  # the given spec is untouched
    assert new.submodules.mlp.module is C2RMoELayer and new.submodules.mlp.params["c2r"] is options
    assert new.submodules.mlp.submodules is spec.submodules.mlp.submodules
    assert use_c2r_dispatcher(spec.submodules.mlp).module is C2RMoELayer
    with pytest.raises(ValueError, match="use_c2r_dispatcher needs"):
        use_c2r_dispatcher(get_gpt_layer_local_spec())


def test_routing_map_to_topk_and_positions():
    from c2r_comm.integrations.megatron import expert_at_megatron_position, topk_from_routing_map
    from c2r_comm.plan import PlacementPlan

    rmap = torch.tensor([[False, True, False, True], [True, True, False, False], [False, False, False, True]])
    probs = torch.arange(12, dtype=torch.float32).reshape(3, 4) * rmap
    idx, w = topk_from_routing_map(rmap, probs, 2)
    assert idx.tolist() == [[1, 3], [0, 1], [4, 4]]  # a row with one expert: out of range (InputError later)
    assert w[:2].tolist() == [[1.0, 3.0], [4.0, 5.0]]
    # capacity mode: fewer experts are dropped choices (-1, weight 0); more are still out of range
    rmap3 = torch.cat([rmap, torch.tensor([[True, True, True, False], [False] * 4])])
    probs3 = torch.arange(20, dtype=torch.float32).reshape(5, 4) * rmap3
    idx, w = topk_from_routing_map(rmap3, probs3, 2, dropping=True)
    assert idx.tolist() == [[1, 3], [0, 1], [3, -1], [4, 4], [-1, -1]]
    assert w[[0, 1, 2, 4]].tolist() == [[1.0, 3.0], [4.0, 5.0], [11.0, 0.0], [0.0, 0.0]]
    plan = PlacementPlan((1, 0, 0, 1), 2)
    assert expert_at_megatron_position(plan) == (1, 2, 0, 3)
    assert expert_at_megatron_position(PlacementPlan.contiguous(4, 2)) == (0, 1, 2, 3)


def test_no_host_sync_outside_the_count_exchange():
    """tests/host_reads.py over megatron-core's MoELayer with our dispatchers (its router and
    experts included): forward and backward read device data on the host only in the count exchange."""
    from megatron_cases import host_reads_worker

    cases = [Case("dedup", 4), Case("hierarchical_bias", 4, dispatcher="hierarchical", nodes=2, config=GELU_BIAS),
             Case("shared_expert_overlap", 4, config=SHARED_OVERLAP)]
    for found in run_ranks(2, host_reads_worker, cases, timeout_s=120):
        for name, (violations, exchanges) in found.items():
            assert violations == [] and exchanges >= 1, (name, violations, exchanges)
