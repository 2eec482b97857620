"""Capacity mode (issue 12 item 4): drops match an independent count (and Megatron-core's own
token dropping), a large factor equals dropless, and the layer with drops (and padding) equals a
float64 single-process reference on gloo ranks for every dispatcher."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import run_ranks

from c2r_comm.cli import main
from c2r_comm.config import ConfigError, config_from_dict
from c2r_comm.dispatch import DISPATCHERS, InputError
from c2r_comm.experts import init_expert_weights, reference_moe
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import build_moe_layer
from c2r_comm.routing.capacity import DROPPED_CHOICE, CapacitySpec, apply_capacity, expert_capacity
from c2r_comm.topology import Topology


def kept_by_count(idx: np.ndarray, w: np.ndarray, E: int, capacity: int, policy: str) -> np.ndarray:
    """The independent count: per expert, list its choices, order them by the policy, keep the first C."""
    T, K = idx.shape
    kept = np.zeros((T, K), dtype=bool)
    for e in range(E):
        choices = [(t, k) for t in range(T) for k in range(K) if idx[t, k] == e]
        if policy == "probs":
            choices.sort(key=lambda tk: (-w[tk], tk[0]))  # largest weight first, ties: earlier token
        for t, k in choices[:capacity]:
            kept[t, k] = True
    return kept


@st.composite
def routings(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    idx = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K]
    levels = draw(st.sampled_from([0, 3]))  # 3: weights on 3 levels, so ties are common
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    if levels:
        w = torch.floor(w * levels) / levels + 0.1
    if draw(st.booleans()):  # some choices already dropped: they take no capacity
        idx = torch.where(torch.rand(T, K, generator=g) < 0.2, DROPPED_CHOICE, idx)
    factor = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.3, 2.0, 100.0]))
    return idx, w, E, factor, draw(st.sampled_from(["probs", "position"]))


@settings(max_examples=300, deadline=None)
@given(routings())
def test_drops_match_an_independent_count(case):
    idx, w, E, factor, policy = case
    T, K = idx.shape
    drop = apply_capacity(idx, w, E, CapacitySpec(factor, policy))
    C = math.ceil((T * K / E) * factor)
    assert drop.capacity == C == expert_capacity(T, K, E, factor)
    want = kept_by_count(idx.numpy(), w.numpy(), E, C, policy)
    assert np.array_equal(drop.kept_TK.numpy(), want)
    routed = idx.numpy() != DROPPED_CHOICE
    assert int(drop.routed_choices) == routed.sum()
    assert int(drop.dropped_choices) == (routed & ~want).sum()
    assert int(drop.dropped_tokens) == (routed.any(1) & ~want.any(1)).sum()
    assert torch.equal(drop.topk_idx_TK, torch.where(torch.from_numpy(want), idx, DROPPED_CHOICE))
    assert torch.equal(drop.topk_weight_TK, torch.where(torch.from_numpy(want), w, 0.0))
    per_expert = np.bincount(drop.topk_idx_TK[drop.kept_TK].numpy(), minlength=E)
    assert per_expert.max(initial=0) <= C


def test_weights_keep_their_gradient_and_a_large_factor_drops_nothing():
    g = torch.Generator().manual_seed(1)
    idx = torch.argsort(torch.rand(20, 8, generator=g), dim=1)[:, :3]
    w = torch.rand(20, 3, generator=g, requires_grad=True)
    drop = apply_capacity(idx, w, 8, CapacitySpec(0.5))
    drop.topk_weight_TK.sum().backward()
    assert torch.equal(w.grad, drop.kept_TK.float())  # dropped weights get no gradient
    same = apply_capacity(idx, w, 8, CapacitySpec(8 / 3))  # C = T: an expert holds every token
    assert bool(same.kept_TK.all()) and torch.equal(same.topk_idx_TK, idx) and int(same.dropped_choices) == 0


def test_bad_ids_and_shapes_pass_through_for_the_dispatcher_to_refuse():
    """Capacity mode never hides bad input: ids out of range are kept as they are (the layout then
    makes every rank raise), malformed tensors are returned unchanged."""
    idx = torch.tensor([[0, 8], [0, -2], [0, 1], [0, 1]])
    w = torch.ones(4, 2)
    drop = apply_capacity(idx, w, 8, CapacitySpec(0.25))  # C = 1: expert 0 keeps token 0 only
    assert drop.topk_idx_TK.tolist() == [[0, 8], [-1, -2], [-1, 1], [-1, -1]]
    for bad_idx, bad_w in [(idx[:, :1], w), (idx.reshape(-1), w.reshape(-1)), (idx.float(), w)]:
        out = apply_capacity(bad_idx, bad_w, 8, CapacitySpec(0.25))
        assert out.topk_idx_TK is bad_idx and out.topk_weight_TK is bad_w


def _unequal_tokens_rank(rank, world):
    cfg = config_from_dict({"model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": E, "top_k": K},
                            "parallel": {"nodes": 1, "gpus_per_node": world},
                            "routing": {"capacity_factor": 1.0, "pad_to_capacity": True}, "run": {"dtype": "float64"}})
    layer = build_moe_layer(cfg, build_process_groups(Topology(1, world), timeout_s=60), torch.device("cpu"))
    x, idx, w, _ = _rank_inputs(rank)
    n = T - rank  # rank 1 routes one token fewer: its capacity, hence the padded size, would differ
    try:
        layer.forward_routed(x[:n], idx[:n], w[:n])
    except InputError as exc:
        return str(exc)
    return None


def test_padding_refuses_unequal_token_counts_on_every_rank():
    for msg in run_ranks(2, _unequal_tokens_rank, timeout_s=60):
        assert msg is not None and "token counts differ across ranks" in msg and f"{T} tokens" in msg, msg
        assert "pad_to_capacity" in msg, msg


def test_probs_policy_matches_megatron_core():
    """Megatron-core's own apply_router_token_dropping keeps the same choices (distinct weights)."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils",
                                    reason="megatron-core not installed (extra 'megatron')")
    g = torch.Generator().manual_seed(5)
    for T, E, K, factor in [(64, 8, 2, 1.0), (50, 16, 4, 0.5), (33, 6, 3, 1.25), (40, 4, 1, 2.0)]:
        logits = torch.randn(T, E, generator=g)
        w, idx = torch.topk(torch.softmax(logits, -1), K, dim=1)
        probs_TE = torch.zeros(T, E).scatter(1, idx, w)
        map_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
        mprobs, mmap = moe_utils.apply_router_token_dropping(probs_TE, map_TE, K, factor, "probs", False)
        drop = apply_capacity(idx, w, E, CapacitySpec(factor, "probs"))
        ours_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, drop.kept_TK)
        assert torch.equal(ours_TE, mmap), (T, E, K, factor)
        assert torch.equal(torch.zeros(T, E).scatter(1, idx, drop.topk_weight_TK), mprobs)


def test_config_validation():
    base = {"model": {"num_experts": 8, "top_k": 2}}
    for routing, field in [({"capacity_factor": 0}, "routing.capacity_factor"),
                           ({"capacity_factor": float("nan")}, "routing.capacity_factor"),
                           ({"capacity_factor": True}, "routing.capacity_factor"),
                           ({"capacity_factor": 1.0, "drop_policy": "random"}, "routing.drop_policy"),
                           ({"pad_to_capacity": True}, "routing.pad_to_capacity")]:
        with pytest.raises(ConfigError) as err:
            config_from_dict({**base, "routing": routing})
        assert err.value.field_name == field
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "routing": {"capacity_factor": 1.0, "pad_to_capacity": True},
                          "schedule": {"overlap_degree": 2}})
    assert err.value.field_name == "schedule.overlap_degree"
    cfg = config_from_dict({**base, "routing": {"capacity_factor": 1.5, "drop_policy": "position"}})
    assert CapacitySpec.of(cfg.routing) == CapacitySpec(1.5, "position", False)
    assert CapacitySpec.of(config_from_dict(base).routing) is None


# ---- the layer on gloo ranks ----------------------------------------------------------------------
E, K, D, F, T = 8, 3, 6, 5, 12


def _rank_inputs(rank: int):
    g = torch.Generator().manual_seed(40 + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    skew = torch.rand(T, E, generator=g, dtype=torch.float64)
    skew[:, :2] += 1.0  # experts 0 and 1 are popular: they overflow their capacity
    idx = torch.argsort(skew, dim=1, descending=True)[:, :K]
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    return x, idx, w, torch.randn(T, D, generator=g, dtype=torch.float64)


def _layer_rank(rank, world, dispatcher, routing, overlap):
    nodes = 2 if dispatcher == "hierarchical" and world == 4 else 1
    cfg = config_from_dict({"model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": E, "top_k": K},
                            "parallel": {"nodes": nodes, "gpus_per_node": world // nodes}, "routing": routing,
                            "run": {"dtype": "float64", "seed": 9}, "schedule": {"overlap_degree": overlap}})
    groups = build_process_groups(Topology(nodes, world // nodes), timeout_s=60)
    layer = build_moe_layer(cfg, groups, torch.device("cpu"), dispatcher=dispatcher)
    seen = []
    inner = layer.experts.forward
    layer.experts.forward = lambda x, counts, *a: (seen.append(tuple(counts)), inner(x, counts, *a))[1]
    x, idx, w, grad = _rank_inputs(rank)
    x.requires_grad_(), w.requires_grad_()
    out = layer.forward_routed(x, idx, w)
    (out.out_TD * grad).sum().backward()
    cap = out.capacity_drop
    return {"out": out.out_TD.detach(), "grad_x": x.grad, "grad_w": w.grad, "counts": seen,
            "dispatched": [h.tokens_per_expert for h in out.handles],
            "kept": None if cap is None else cap.kept_TK, "capacity": None if cap is None else cap.capacity,
            "grad_experts": [p.grad.clone() for p in (layer.experts.w_gate_LDF, layer.experts.w_up_LDF,
                                                      layer.experts.w_down_LFD)]}


def _layer_runs(rank, world, dispatcher, runs):
    """_layer_rank for each (name, routing, overlap) of `runs`, in one launch (ranks cost seconds to spawn)."""
    return {name: _layer_rank(rank, world, dispatcher, routing, overlap) for name, routing, overlap in runs}


def _reference(world, kept_by_rank):
    experts = [[t.double().requires_grad_() for t in init_expert_weights(e, D, F, seed=9)] for e in range(E)]
    per_rank = []
    for r in range(world):
        x, idx, w, grad = _rank_inputs(r)
        x.requires_grad_(), w.requires_grad_()
        kept = kept_by_rank[r]
        out = reference_moe(x, torch.where(kept, idx, DROPPED_CHOICE), w * kept, experts)
        (out * grad).sum().backward()
        per_rank.append({"out": out.detach(), "grad_x": x.grad, "grad_w": w.grad})
    return per_rank, experts


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
def test_layer_with_drops_and_padding_matches_reference(dispatcher):
    world = 4 if dispatcher == "hierarchical" else 2  # hierarchical on 2 nodes x 2
    L = E // world
    configs = [("dropless", {}, 1), ("large", {"capacity_factor": 100.0}, 1), ("probs", {"capacity_factor": 0.75}, 2),
               ("padded", {"capacity_factor": 0.75, "drop_policy": "position", "pad_to_capacity": True}, 1)]
    by_rank = run_ranks(world, _layer_runs, dispatcher, configs, timeout_s=300)  # four layers per launch
    runs = {name: [by_rank[r][name] for r in range(world)] for name, _, _ in configs}
    for r in range(world):  # a factor whose capacity holds every token changes nothing
        for key in ("out", "grad_x", "grad_w"):
            assert torch.equal(runs["large"][r][key], runs["dropless"][r][key]), (r, key)
        assert bool(runs["large"][r]["kept"].all())
    C = expert_capacity(T, K, E, 0.75)
    for name, policy in (("probs", "probs"), ("padded", "position")):
        got = runs[name]
        for r in range(world):
            x, idx, w, _ = _rank_inputs(r)
            want = kept_by_count(idx.numpy(), w.detach().numpy(), E, C, policy)
            assert np.array_equal(got[r]["kept"].numpy(), want) and got[r]["capacity"] == C
        assert sum(int((~g["kept"]).sum()) for g in got) > 0  # the case does drop
        ref, experts = _reference(world, [g["kept"] for g in got])
        for r in range(world):
            for key in ("out", "grad_x", "grad_w"):
                torch.testing.assert_close(got[r][key], ref[r][key], rtol=1e-10, atol=1e-10)
            mine = range(r * L, (r + 1) * L)  # contiguous placement
            for i, g in enumerate(got[r]["grad_experts"]):
                torch.testing.assert_close(g, torch.stack([experts[e][i].grad for e in mine]), rtol=1e-10, atol=1e-10)
    for r in range(world):  # padding: every local expert computes exactly capacity x EP size rows
        assert runs["padded"][r]["counts"] == [(C * world,) * L]
        assert len(runs["probs"][r]["dispatched"]) == 2  # two chunks, unpadded
        assert sum(sum(c) for c in runs["probs"][r]["dispatched"]) <= C * world * L  # capacity bounds every slot


# ---- the benchmark reports the drops ----------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"


@pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces (beside the repo)")
def test_bench_reports_drops_that_match_an_independent_count(tmp_path):
    """c2r-comm bench on real DeepSeek-V2-Lite routing with a capacity factor: dropped choices and
    tokens (JSON and table) equal a per-rank count over the trace, and rows sent shrink accordingly."""
    tokens, world, factor = 96, 2, 1.0
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "c2r_comm", "bench", "--trace", str(TRACE), "--layer", "12", "--topology",
           f"1x{world}", "--tokens-per-rank", str(tokens), "--hidden-size", "16", "--ffn-hidden-size", "16",
           "--iters", "1", "--warmup-iters", "0", "--dispatcher", "alltoall,dedup", "--capacity-factor", str(factor),
           "--drop-policy", "position", "--pad-to-capacity", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.read_text())
    ids = np.load(TRACE)["expert_ids"][: world * tokens, 12, :].astype(np.int64)
    E, k = 64, ids.shape[1]
    C = math.ceil((tokens * k / E) * factor)
    kept = np.concatenate([kept_by_count(ids[r * tokens:(r + 1) * tokens], np.ones((tokens, k)), E, C, "position")
                           for r in range(world)])
    e2r = np.repeat(np.arange(world), E // world)
    src = np.repeat(np.arange(world), tokens)[:, None]
    assert (~kept).sum() > 0  # the popular experts of this layer overflow
    for r in records:
        m = r["measurement"]
        assert (m["routed_choices"], m["dropped_choices"], m["dropped_tokens"]) == \
            (ids.size, int((~kept).sum()), int((~kept.any(1)).sum()))
        assert r["config"]["routing"]["capacity_factor"] == factor
    by = {r["dispatcher"]: r["measurement"]["dispatch"] for r in records}
    assert by["alltoall"]["rows_same_node"] == int((kept & (e2r[ids] != src)).sum())
    remote_rank_rows = sum(int(((e2r[ids] == d) & kept).any(1)[src[:, 0] != d].sum()) for d in range(world))
    assert by["dedup"]["rows_same_node"] == remote_rank_rows
    assert f"{int((~kept).sum())} (" in proc.stdout and "dropped choices" in proc.stdout


@pytest.mark.parametrize("flags, words", [
    (["--capacity-factor", "0"], ["routing.capacity_factor"]),
    (["--drop-policy", "lottery", "--capacity-factor", "1"], ["routing.drop_policy", "probs"]),
    (["--pad-to-capacity"], ["routing.pad_to_capacity", "capacity_factor"]),
    (["--capacity-factor", "1", "--pad-to-capacity", "--overlap-degree", "2"], ["--overlap-degree", "pad_to_capacity"]),
])
def test_bad_capacity_flags_fail_before_launch(flags, words, capsys, no_launch):
    assert main(["bench", "--topology", "1x2", *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
