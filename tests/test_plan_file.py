"""Plan files from the planner: round trip, mismatch errors, the `plan` CLI, the real trace."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from c2r_comm.cli import plan_cmd
from c2r_comm.placement.planners import PlannerOptions
from c2r_comm.placement.trace_plan import plan_trace
from c2r_comm.plan import PlanFile, load_layer_plan
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_TRACE = SHARED / "traces" / "deepseek_v2_lite_prefill_dev.npz"


@pytest.fixture(scope="module")
def trace() -> RoutingTrace:
    return RoutingTrace.synthetic(2400, 16, 3, num_layers=3, num_clusters=4, in_cluster=0.85, zipf_a=0.5,
                                  tokens_per_prompt=40, seed=11)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    return plan_cmd.run(parser.parse_args(argv))


def test_plan_file_round_trips(tmp_path, trace):
    topo = Topology(2, 2)
    result = plan_trace(trace.select_prompts(0, 40), trace.select_prompts(40, None), topo, "hypergraph", [0, 2],
                        PlannerOptions(), fit_info={"trace": "synthetic"})
    path = tmp_path / "plan.json"
    result.plan_file.save(path)
    loaded = PlanFile.load(path)
    assert loaded.layers == result.plan_file.layers
    assert loaded.topology == topo and loaded.num_experts == 16 and loaded.method == "hypergraph"
    assert loaded.fit["trace"] == "synthetic" and loaded.fit["load_tolerance"] == 1.10
    assert loaded.metrics[2]["eval"]["gpus_per_token"] == pytest.approx(result.reports[1].metrics["hypergraph"].gpus_per_token)
    assert load_layer_plan(str(path), 2, topo, 16) == result.plan_file.layers[2]
    doc = json.loads(path.read_text())
    assert set(doc) == {"topology", "num_experts", "layers", "method", "fit"}
    assert set(doc["layers"]) == {"0", "2"}


def test_plan_file_mismatch_is_a_clear_error(tmp_path, trace):
    result = plan_trace(trace.select_prompts(0, 40), trace.select_prompts(40, None), Topology(1, 4), "occult_greedy",
                        [1], compare=())
    path = tmp_path / "plan.json"
    result.plan_file.save(path)
    with pytest.raises(ValueError, match="topology 1x4 but the run uses 2x2"):
        load_layer_plan(str(path), 1, Topology(2, 2), 16)
    with pytest.raises(ValueError, match="16 experts but the run has 32"):
        load_layer_plan(str(path), 1, Topology(1, 4), 32)
    with pytest.raises(ValueError, match="no plan for layer 0"):
        load_layer_plan(str(path), 0, Topology(1, 4), 16)


def test_plan_cli_writes_plan_table_and_png(tmp_path, trace, capsys):
    trace_path = tmp_path / "t.npz"
    trace.save(trace_path)
    out = tmp_path / "p.json"
    rc = run_cli(["--trace", str(trace_path), "--topology", "2x2", "--method", "hypergraph", "--layers", "0,1",
                  "--fit-prompts", "0:40", "--eval-prompts", "40:", "--polish-kicks", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "GPUs/token" in printed.out and "remote nodes" in printed.out and "occult" in printed.out
    assert " mean |" in printed.out
    assert "on the fit tokens: worst layer" in printed.out and "met in 2/2 layers" in printed.out
    assert "2/2" in printed.err  # progress bar reached the end
    plan = PlanFile.load(out)
    assert sorted(plan.layers) == [0, 1] and plan.fit["fit_prompts"] == "0:40"
    assert plan.fit["polish_kicks"] == 2
    assert all(plan.metrics[layer]["fit_gpu_load_max_over_mean"] <= 1.10 + 1e-9 for layer in (0, 1))
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_plan_cli_rejects_bad_arguments(tmp_path, trace):
    trace_path = tmp_path / "t.npz"
    trace.save(trace_path)
    base = ["--trace", str(trace_path), "--method", "contiguous", "--out", str(tmp_path / "p.json"), "--no-png"]
    with pytest.raises(ValueError, match="'--topology' = '2by2' is invalid"):
        run_cli(base + ["--topology", "2by2"])
    with pytest.raises(ValueError, match="--layers '7' is invalid: allowed indices 0..2"):
        run_cli(base + ["--topology", "1x4", "--layers", "7"])
    with pytest.raises(ValueError, match="give --eval-prompts"):
        run_cli(base + ["--topology", "1x4", "--fit-prompts", "0:"])
    with pytest.raises(ValueError, match="'--topology' = '1x3' is invalid: allowed a GPU count that divides"):
        run_cli(base + ["--topology", "1x3", "--fit-prompts", "0:40"])


def test_real_trace_layer_beats_contiguous():
    if not REAL_TRACE.is_file():
        pytest.skip(f"real trace not found at {REAL_TRACE} (see ../shared/traces/README.md)")
    real = RoutingTrace.load(REAL_TRACE)
    result = plan_trace(real.select_prompts(0, 300), real.select_prompts(800, 999), Topology(1, 8), "hypergraph", [3])
    m = result.reports[0].metrics
    assert m["hypergraph"].gpus_per_token < 0.75 * m["contiguous"].gpus_per_token
    assert m["hypergraph"].experts_per_gpu == 8
    assert result.reports[0].plans["hypergraph"].balance.met


def test_plan_cli_replica_flags_reach_the_plan_file(tmp_path, trace, capsys):
    trace.save(tmp_path / "t.npz")
    out = tmp_path / "r.json"
    assert run_cli(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--method", "hypergraph", "--layers", "0",
                    "--fit-prompts", "0:40", "--eval-prompts", "40:60", "--replica-slots", "1",
                    "--replica-pinned-load-cap", "none", "--copy-load-cap", "1.1", "--replica-pinned-blocks", "3",
                    "--out", str(out), "--no-png"]) == 0
    pf = PlanFile.load(out)
    assert pf.layers[0].replica_slots == 1 and pf.layers[0].copy_load_cap == 1.1
    assert pf.fit["replica_pinned_load_cap"] is None and pf.fit["copy_load_cap"] == 1.1
    assert pf.fit["replica_pinned_blocks"] == 3
    with pytest.raises(ValueError, match="replica_pinned_blocks = 0 is invalid"):
        run_cli(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--method", "hypergraph",
                 "--replica-slots", "1", "--replica-pinned-blocks", "0", "--out", str(out), "--no-png"])
    with pytest.raises(SystemExit):
        run_cli(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--method", "hypergraph",
                 "--copy-load-cap", "high", "--out", str(out)])
    assert "'high' is not a number or 'none'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="copy_load_cap = 0.5 is invalid"):
        run_cli(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--method", "hypergraph",
                 "--replica-slots", "1", "--copy-load-cap", "0.5", "--out", str(out), "--no-png"])


def test_replica_plans_are_refused_by_peers_and_replanning_before_launch(tmp_path, monkeypatch, capsys):
    """bench --peers and train-demo --replan-every cannot run a replica plan: refused before any rank
    starts, with the flag named; the plan file is read once per command (by the plan check)."""
    from replica_cases import replica_plan

    from c2r_comm.bench import peers
    from c2r_comm.cli import main

    path = tmp_path / "replicas.json"
    plan = replica_plan(4, 2, 1, seed=0)
    PlanFile(Topology(1, 2), 4, {0: plan, 1: plan}, "test").save(path)
    monkeypatch.setattr(peers, "megatron_importable", lambda: True)
    loads = []
    real_load = PlanFile.load.__func__
    monkeypatch.setattr(PlanFile, "load", classmethod(lambda cls, p: loads.append(p) or real_load(cls, p)))
    assert main(["bench", "--topology", "1x2", "--num-experts", "4", "--top-k", "2", "--plan", str(path),
                 "--peers", "megatron"]) == 2
    assert "--peers" in (err := capsys.readouterr().err) and "no peers with a replica plan" in err
    assert len(loads) == 1
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("some words to train on. " * 200)
    assert main(["train-demo", "--text", str(tmp_path / "text"), "--topology", "1x2", "--num-experts", "4",
                 "--top-k", "2", "--layers", "2", "--plan", str(path), "--replan-every", "2"]) == 2
    assert "--replan-every" in (err := capsys.readouterr().err) and "0 with a replica plan" in err
    assert len(loads) == 2
