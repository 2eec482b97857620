"""Cost model: bytes from the dispatchers' own layouts (exactly what they report), alpha-beta times,
hardware profiles, the token replay, and `c2r-comm simulate` (bad input first, then end to end).

Real gloo ranks run every dispatcher on small hypothesis routings; each rank compares its handle's
CommStats with the world layout computed in one process, and the benchmark's world accounting
(`measure.world_stats`) with the layout's world totals. Examples are generated identically on every
rank (derandomized, no shrinking), as in tests/test_exchange_plan.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from moe_cases import Case, make_plan, rank_inputs
from ranks import run_ranks

from c2r_comm.bench.cost_model import predict
from c2r_comm.bench.hardware import HardwareProfile, known_profiles, load_profile
from c2r_comm.bench.replay import Replay, default_expert_copies
from c2r_comm.bench.world_layout import WorldLayout, lay_out_world
from c2r_comm.dispatch.exchange_plan import StageLoad, link_class_WW
from c2r_comm.cli import main
from c2r_comm.config import ConfigError
from c2r_comm.dispatch import DISPATCHERS, traffic_stats, world_traffic
from c2r_comm.dispatch.layout import RankGeometry
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"
ALL = tuple(DISPATCHERS)


def world_of(case: Case) -> WorldLayout:
    topo = Topology(case.nodes, case.gpus_per_node)
    return lay_out_world(case.dispatcher, topo, make_plan(case), case.hidden, torch.float64,
                         lambda r: rank_inputs(case, r)[1])


# ---- (1) bytes: the layout's numbers are the dispatchers' -----------------------------------------
def gloo_worker(rank: int, world: int, shapes: tuple[tuple[int, int], ...], examples: int) -> int:
    """For each topology (nodes, gpus_per_node) of `world` ranks: hypothesis routings, each through every
    dispatcher; returns how many (routing, dispatcher) cases ran."""
    import torch.distributed as dist

    from c2r_comm.bench.measure import world_stats
    from c2r_comm.dispatch import build_dispatcher
    from c2r_comm.groups import build_process_groups

    ran = 0
    for nodes, gpn in shapes:
        groups = build_process_groups(Topology(nodes, gpn), timeout_s=60)

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
        @given(st.integers(1, 3), st.integers(1, 6), st.lists(st.integers(0, 9), min_size=world, max_size=world),
               st.sampled_from(["contiguous", "random"]), st.sampled_from(["random", "subset", "single"]),
               st.integers(0, 10_000))
        def run(experts_per_rank, k, tokens, plan, routing, seed):
            nonlocal ran
            E = experts_per_rank * world
            for name in ALL:
                case = Case(name, nodes=nodes, gpus_per_node=gpn, num_experts=E, top_k=min(k, E), hidden=4,
                            tokens=tuple(tokens), plan=plan, routing=routing, seed=seed)
                disp = build_dispatcher(name, make_plan(case), groups, case.hidden)
                x, idx, w, _ = rank_inputs(case, rank)
                _, handle = disp.dispatch(x, idx, w)
                layout = world_of(case)
                where = f"rank {rank} {case}"
                assert layout.rank_stats(rank) == (handle.dispatch_stats, handle.combine_stats), where
                bench_d, bench_c, tokens_all = world_stats([handle.route.plan], groups.topology, torch.device("cpu"),
                                                           groups.ep)
                assert layout.world_stats() == (bench_d, bench_c), where
                assert layout.tokens == tokens_all == sum(case.tokens_of(r) for r in range(world)), where
                dist.barrier()
                ran += 1

        run()
    return ran


def test_model_bytes_equal_what_gloo_dispatchers_report_world2():
    assert run_ranks(2, gloo_worker, ((1, 2), (2, 1)), 4) == [24, 24]


def test_model_bytes_equal_what_gloo_dispatchers_report_world4_1x4_and_2x2():
    assert run_ranks(4, gloo_worker, ((1, 4), (2, 2)), 5) == [30] * 4


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(ALL), st.sampled_from([(1, 1), (1, 3), (2, 2), (3, 2), (2, 3), (4, 2)]), st.integers(1, 2),
       st.integers(1, 4), st.integers(0, 10_000), st.sampled_from(["contiguous", "random"]))
def test_world_layout_equals_the_plans_world_accounting(name, shape, epr, k, seed, plan):
    """Per rank and world, every field, against traffic_stats over world_traffic of layout_for's plans."""
    nodes, gpn = shape
    W = nodes * gpn
    case = Case(name, nodes=nodes, gpus_per_node=gpn, num_experts=epr * W, top_k=min(k, epr * W), hidden=3,
                tokens=tuple((seed >> r) % 7 for r in range(W)), plan=plan, seed=seed)
    topo, placement = Topology(nodes, gpn), make_plan(case)
    plans = [DISPATCHERS[name].layout_for(RankGeometry.of(r, topo, placement), case.hidden, *rank_inputs(case, r)[:3])
             for r in range(W)]
    rows, stages = world_traffic(plans), plans[0].stages
    layout = world_of(case)
    assert layout.world_stats() == traffic_stats(rows, stages, topo)
    for r in range(W):
        assert layout.rank_stats(r) == traffic_stats(rows, stages, topo, sender=r), r
    assert [(s.name, s.dispatch_row_bytes, s.combine_row_bytes) for s in layout.stages] == \
        [(s.name, s.dispatch_row_bytes, s.combine_row_bytes) for s in stages]


# ---- (2) alpha-beta arithmetic on hand-made worlds ------------------------------------------------
def hand_world(topo: Topology, rows_WW: list[list[int]], dispatch_row_bytes: int, combine_row_bytes: int,
               name: str = "all2all") -> WorldLayout:
    rows = torch.tensor(rows_WW, dtype=torch.int64)
    stage = StageLoad.of(name, dispatch_row_bytes, combine_row_bytes, rows, link_class_WW(topo))
    return WorldLayout("test", topo, 0, (stage,))


def profile(**kw) -> HardwareProfile:
    base = dict(name="t", description="", intra_node_gbit=8.0, inter_node_gbit=8.0,  # 1e9 bytes/s
                intra_node_latency_us=2.0, inter_node_latency_us=10.0)
    return HardwareProfile(**{**base, **kw})


def test_alpha_beta_two_ranks_by_hand():
    """2 nodes x 1 GPU: rank 0 sends 1000 rows of 1000 B, rank 1 sends 500; combine rows are 500 B."""
    world = hand_world(Topology(2, 1), [[7, 1000], [500, 0]], 1000, 500)
    t = predict(world, profile(stage_overhead_us=5.0))
    # dispatch: rank 0 out 1e6 B, in 5e5 B -> 1 ms + 1 message x 10 us + 5 us overhead
    assert t.dispatch_s == pytest.approx(1e-3 + 10e-6 + 5e-6, rel=1e-12)
    # combine: rank 0 gets 1000 x 500 B back, sends 500 x 500 B -> 0.5 ms + 10 us + 5 us
    assert t.combine_s == pytest.approx(0.5e-3 + 15e-6, rel=1e-12)
    assert t.backward_s == pytest.approx(t.forward_s, rel=1e-12)
    assert t.fwd_bwd_s == pytest.approx(2 * (1.5e-3 + 30e-6), rel=1e-12)
    link = t.dispatch_stages[0].bottleneck
    assert (link.link_class, link.bytes_max, link.latency_s) == ("cross_node", 10**6, pytest.approx(10e-6))
    assert t.dispatch_stages[0].links[0].seconds == 0.0  # nothing same-node


def test_per_node_link_is_shared_by_the_nodes_ranks():
    """2x2: ranks 0 and 1 each send 1e6 B to their rail peer; one NIC per node carries both."""
    rows = [[0, 0, 1000, 0], [0, 0, 0, 1000], [0, 0, 0, 0], [0, 0, 0, 0]]
    world = hand_world(Topology(2, 2), rows, 1000, 1000)
    per_gpu = predict(world, profile(inter_node_link="per_gpu"))
    per_node = predict(world, profile(inter_node_link="per_node"))
    assert per_gpu.dispatch_s == pytest.approx(1e-3 + 10e-6, rel=1e-12)
    assert per_node.dispatch_s == pytest.approx(2e-3 + 10e-6, rel=1e-12)  # ranks post in parallel: 1 x alpha
    assert per_node.dispatch_stages[0].bottleneck.unit == "node 0"
    half = predict(world, profile(inter_node_link="per_node", inter_node_efficiency=0.5))
    assert half.dispatch_s == pytest.approx(4e-3 + 10e-6, rel=1e-12)


def test_same_node_and_cross_node_links_run_in_parallel_and_stages_add_up():
    rows = [[0, 3000, 1000, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # 3 MB same node, 1 MB cross
    topo = Topology(2, 2)
    t = predict(hand_world(topo, rows, 1000, 1000), profile())
    assert t.dispatch_s == pytest.approx(3e-3 + 2e-6, rel=1e-12)
    assert t.dispatch_stages[0].bottleneck.link_class == "same_node"
    cls = link_class_WW(topo)
    two = WorldLayout("test", topo, 0, (StageLoad.of("rail", 1000, 1000, torch.tensor(rows), cls),
                                        StageLoad.of("node", 1000, 1000, torch.tensor(rows).T.contiguous(), cls)))
    t2 = predict(two, profile())
    assert t2.dispatch_s == pytest.approx(2 * (3e-3 + 2e-6), rel=1e-12)
    assert [s.stage for s in t2.combine_stages] == ["node", "rail"]


def test_a_stage_that_moves_nothing_costs_nothing():
    t = predict(hand_world(Topology(1, 2), [[5, 0], [0, 9]], 100, 100), profile(stage_overhead_us=50.0))
    assert t.fwd_bwd_s == 0.0


# ---- profiles and replay --------------------------------------------------------------------------
def test_shipped_profiles_load():
    assert {"h100_nvlink_ib400", "a100_nvlink_ib200", "pcie_gen4_eth100", "emulated_cpu"} <= set(known_profiles())
    for name in known_profiles():
        p = load_profile(name)
        assert p.name == name and p.bytes_per_second("cross_node") > 0
    em = load_profile("emulated_cpu").with_rates(inter_node_gbit=2.5)
    assert em.inter_node_gbit == 2.5 and em.inter_node_link == "per_node"


@pytest.mark.parametrize("text, field", [
    ("inter_node_link: per_rack", "inter_node_link"), ("inter_node_gbit: -1", "inter_node_gbit"),
    ("inter_node_gbit: 0", "inter_node_gbit"), ("intra_node_efficiency: 1.5", "intra_node_efficiency"),
    ("bandwidth: 3", "bandwidth"), ("inter_node_latency_us: fast", "inter_node_latency_us")])
def test_bad_profile_fields_name_file_field_value_and_allowed(tmp_path, text, field):
    good = {"name": "x", "description": "d", "intra_node_gbit": 10, "inter_node_gbit": 1}
    key = text.split(":")[0]
    lines = [f"{k}: {v}" for k, v in good.items() if k != key] + [text]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert str(path) in msg and field in msg and "allowed" in msg


def test_replay_deals_like_rank_block_and_spreads_expert_copies():
    trace = RoutingTrace.synthetic(301, 16, 3, num_layers=2, seed=1)
    rep = Replay(trace.layer(1), 16, 4, 50, 1)
    for r in range(4):
        assert np.array_equal(rep.rank_ids(r), trace.rank_block(1, r, 50))
    assert default_expert_copies(64, 1024) == 16 and default_expert_copies(64, 8) == 1
    big = Replay(trace.layer(0), 16, 32, 40, default_expert_copies(16, 32))  # 2 copies, 1280 > 301 tokens
    ids = big.rank_ids(31)
    j = 31 * 40 + np.arange(40)
    assert np.array_equal(ids, trace.layer(0)[j % 301] + 16 * (j % 2)[:, None])
    fit = big.planner_ids()  # every (token, copy) the stream holds, once: lcm(301, 2) = 602
    copy_of_row = fit[:, 0] // 16
    assert fit.shape[0] == 602 and np.array_equal(fit[:301] % 16, fit[301:] % 16)  # rows j, j + 301: one token
    assert (copy_of_row[:301] + copy_of_row[301:] == 1).all()  # ... once in each copy


# ---- (3) bad input: clear errors, exit 2, before any work -----------------------------------------
@pytest.fixture()
def small_trace(tmp_path) -> Path:
    path = tmp_path / "trace.npz"
    RoutingTrace.synthetic(400, 16, 4, num_layers=3, tokens_per_prompt=40, seed=3).save(path)
    return path


@pytest.fixture()
def no_work(monkeypatch):
    from c2r_comm.cli import simulate_cmd

    def boom(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(simulate_cmd, "lay_out_world", boom)
    monkeypatch.setattr(simulate_cmd, "plan_layer", boom)


@pytest.mark.parametrize("extra, expect", [
    (["--layer", "3"], ["--layer", "'3'", "0..2"]),
    (["--layer", "0,7"], ["--layer", "0..2"]),
    (["--hardware", "tpu_v9"], ["--hardware", "tpu_v9", "h100_nvlink_ib400", "emulated_cpu"]),
    (["--hardware", "missing/p.yaml"], ["--hardware", "missing/p.yaml"]),
    (["--inter-node-gbit", "0"], ["--inter-node-gbit", "0.0", "> 0"]),
    (["--intra-node-gbit", "-2"], ["--intra-node-gbit", "-2.0", "> 0"]),
    (["--tokens-per-rank", "0"], ["--tokens-per-rank", "0", ">= 1"]),
    (["--dispatcher", "dedup,nccl"], ["--dispatcher", "nccl", "alltoall"]),
    (["--placement", "magic"], ["--placement", "magic", "occult_greedy"]),
    (["--topology", "2x"], ["--topology", "'2x'"]),
    (["--topology", "3x2", "--expert-copies", "2"], ["--expert-copies", "2", "3x2"]),
    (["--prompts", "50:60"], ["prompt range 50:60", "selects no prompt"]),
    (["--dtype", "int8"], ["--dtype", "int8", "bfloat16"]),
    (["--weight-dtype", "int4"], ["--weight-dtype", "int4", "float32"]),
])
def test_bad_input_is_refused_before_any_work(small_trace, no_work, capsys, tmp_path, extra, expect):
    out = tmp_path / "out.json"
    argv = ["simulate", "--trace", str(small_trace), "--topology", "2x2", "--tokens-per-rank", "16",
            "--json", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(e in err for e in expect), err
    assert not out.exists()


def test_a_plan_for_another_topology_is_refused(small_trace, no_work, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    PlanFile(Topology(1, 2), 16, {0: PlacementPlan.contiguous(16, 2)}, "contiguous").save(plan)
    assert main(["simulate", "--trace", str(small_trace), "--topology", "2x2", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "--plan" in err and "topology 1x2" in err and "2x2" in err
    assert main(["simulate", "--trace", str(small_trace), "--topology", "1x2", "--plan", str(plan),
                 "--layer", "1"]) == 2
    assert "no plan for layer 1" in capsys.readouterr().err


def test_a_bad_profile_file_is_refused(small_trace, no_work, capsys, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndescription: x\nintra_node_gbit: 10\ninter_node_gbit: 1\ninter_node_link: shared\n")
    assert main(["simulate", "--trace", str(small_trace), "--topology", "2x2", "--hardware", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "inter_node_link" in err and "'shared'" in err and "per_node" in err


# ---- (4) end to end -------------------------------------------------------------------------------
def test_simulate_with_a_plan_file_matches_the_layouts(small_trace, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    placement = PlacementPlan.random(16, 4, seed=2)
    PlanFile(Topology(2, 2), 16, {0: placement, 1: placement}, "random").save(plan)
    out = tmp_path / "sim.json"
    assert main(["simulate", "--trace", str(small_trace), "--topology", "2x2", "--plan", str(plan), "--placement", "",
                 "--layer", "0", "--tokens-per-rank", "32", "--hidden-size", "16", "--dtype", "float32",
                 "--hardware", "emulated_cpu", "--inter-node-gbit", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["hardware"]["inter_node_gbit"] == 2
    trace = RoutingTrace.load(small_trace)
    text = capsys.readouterr().out
    assert len(doc["records"]) == 3
    for rec in doc["records"]:
        assert rec["placement"] == "plan:random"
        layout = lay_out_world(rec["dispatcher"], Topology(2, 2), placement, 16, torch.float32,
                               lambda r: trace.rank_block(0, r, 32))
        d, c = layout.world_stats()
        assert (rec["dispatch"], rec["combine"]) == (asdict(d), asdict(c))
        assert f"| 2x2 | 4 | 16 | {rec['dispatcher']} | plan:random |" in text


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason=f"shared trace {SHARED_TRACE} is absent")
def test_simulate_end_to_end_on_the_shared_trace(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["simulate", "--trace", str(SHARED_TRACE), "--topology", "2x2,2x4", "--topology", "4x8",
                 "--layer", "0,25", "--prompts", "0:200", "--tokens-per-rank", "64", "--json", str(out),
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert len(doc["records"]) == 3 * 3 * 2  # topologies x dispatchers x placements
    by = {(r["topology"], r["dispatcher"], r["placement"]): r for r in doc["records"]}
    assert by[("4x8", "dedup", "contiguous")]["expert_copies"] == 1
    for topo in ("2x2", "2x4", "4x8"):
        a, d = by[(topo, "alltoall", "contiguous")], by[(topo, "dedup", "contiguous")]
        assert d["dispatch"]["rows_cross_node"] <= a["dispatch"]["rows_cross_node"]
        h = by[(topo, "hierarchical", "contiguous")]
        assert h["dispatch"]["rows_cross_node"] <= d["dispatch"]["rows_cross_node"]
        assert [l["layer"] for l in a["layers"]] == [0, 25]
        assert a["fwd_bwd_s"] > 0
    assert "| 2x4 | 8 | 64 | hierarchical | occult_greedy |" in text
    assert png.stat().st_size > 1000


def test_simulate_warns_when_expert_copies_cap_the_gpus_a_token_touches(small_trace, capsys):
    """16 experts, top-4: on 3x2 (3 copies, one copy's experts on 2 GPUs) a token touches at most 2
    GPUs under contiguous placement, which the note says; on 4x8 (2 copies on 16 GPUs each) no warning."""
    common = ["--trace", str(small_trace), "--layer", "0", "--tokens-per-rank", "16", "--hidden-size", "16",
              "--dtype", "float32", "--dispatcher", "dedup", "--placement", "contiguous"]
    assert main(["simulate", *common, "--topology", "3x2"]) == 0
    out = capsys.readouterr().out
    assert "note: 3x2: 3 expert copies (48 experts); WARNING: one copy's 16 experts fill 2 GPUs, fewer than top-4" \
        in out, out
    assert main(["simulate", *common, "--topology", "4x8"]) == 0
    out = capsys.readouterr().out
    assert "2 expert copies (32 experts)" in out and "WARNING" not in out, out
