"""`c2r-comm sweep`: spec validation, expansion into launches, emulated command lines, a real tiny
sweep (JSON, markdown, PNGs), a failing launch reported while the others complete."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from c2r_comm.bench.sweep_run import SweepJobs, launch_argv, run_sweep, sweep_jobs, write_reports
from c2r_comm.bench.sweep_spec import load_sweep_spec, spec_from_dict
from c2r_comm.cli import build_parser, main
from c2r_comm.config import ConfigError
from c2r_comm.routing.trace import RoutingTrace

REPO = Path(__file__).resolve().parents[1]
TINY = {"base": {"model": {"hidden_size": 32, "ffn_hidden_size": 32}, "run": {"tokens_per_rank": 32}},
        "iters": 2, "warmup_iters": 1}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "syn.npz"
    RoutingTrace.synthetic(num_tokens=4096, num_experts=16, top_k=4, num_layers=2, tokens_per_prompt=64).save(path)
    return path  # 64 prompts of 64 tokens


def _with_trace(trace_path: Path, **fields) -> dict:
    return {**TINY, "trace": str(trace_path), "layer": 1, "fit_prompts": "0:48", "eval_prompts": "48:", **fields}


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, allowed_part", [
    ({"dispatcher": ["dedup"]}, "dispatcher", "known sweep fields"),
    ({"dispatchers": ["nccl_magic"]}, "dispatchers[0]", "alltoall"),
    ({"dispatchers": []}, "dispatchers", "non-empty list"),
    ({"topologies": ["2by2"]}, "topologies[0]", "NODESxGPUS_PER_NODE"),
    ({"topologies": ["1x2", "1x3"]}, "topologies[1]", "divides model.num_experts = 16"),
    ({"placements": ["metis"]}, "placements[0]", "occult_greedy"),
    ({"placements": ["hypergraph"]}, "placements[0]", "needs `trace`"),
    ({"placements": [{"plan": "missing.json"}]}, "placements[0].plan", "no such file"),
    ({"routings": ["trace"]}, "routings[0]", "set `trace`"),
    ({"routings": [{"kind": "c2r", "top_t": 2}]}, "routings[0].top_t", "top_k-1"),
    ({"routings": [{"kind": "c2r", "top_t": 5}]}, "routings[0].collaborators", "c2r-comm profile"),
    ({"routings": [{"kind": "device_constrained"}]}, "routings[0].max_groups", "integer >= 1"),
    ({"routings": [{"kind": "device_constrained", "max_groups": 1, "level": "rack"}]}, "routings[0].level", "'node'"),
    ({"routings": [{"kind": "topk", "top_t": 3}]}, "routings[0].top_t", "fields of a topk routing"),
    ({"rates": [0.1]}, "rates", "emulate: true"),
    ({"emulate": True, "rates": [0, None]}, "rates[0]", "Gbit/s > 0"),
    ({"emulate": True, "rates": [0.1, 0.1]}, "rates[1]", "at most once"),
    ({"emulate": "yes"}, "emulate", "true or false"),
    ({"overlap_degrees": [1, 2]}, "overlap_degrees[1]", "overlap scheduler"),
    ({"iters": 0}, "iters", "integer >= 1"),
    ({"warmup_iters": -1}, "warmup_iters", "integer >= 0"),
    ({"launch_timeout_s": 0}, "launch_timeout_s", "seconds > 0"),
    ({"fit_prompts": "0:10"}, "fit_prompts", "only together with `trace`"),
    ({"base": {"parallel": {"nodes": 2}}}, "base.parallel", "topologies"),
    ({"base": {"run": {"iters": 5}}}, "base.run.iters", "sweep's `iters`"),
    ({"base": {"model": {"hidden_size": "big"}}}, "base.model.hidden_size", "an integer"),
    ({"base": {"model": {"num_experts": 16, "top_k": 20}}}, "base.model.top_k", "top_k <= num_experts"),
    ({"base": {"config": "nope.yaml"}}, "base.config", "no such file"),
])
def test_bad_spec_names_field_value_and_allowed(tmp_path, fields, field, allowed_part):
    data = {**TINY, "topologies": ["1x2"], **fields}
    if "base" in fields:
        data["base"] = fields["base"]
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data, tmp_path)
    assert info.value.field_name == field
    assert allowed_part in info.value.allowed
    assert f"'{field}'" in str(info.value) and repr(info.value.value) in str(info.value)


@pytest.mark.parametrize("fields, field, allowed_part", [
    ({"layer": 2}, "layer", "0..1"),
    ({"fit_prompts": "0:", "eval_prompts": None, "placements": ["occult_greedy"]}, "fit_prompts", "score plans"),
    ({"eval_prompts": "70:80"}, "eval_prompts", "selecting some"),
    ({"topologies": ["1x2", "4x4"]}, "base.run.tokens_per_rank", "at most 64"),  # 1024 eval tokens / 16 ranks
])
def test_bad_trace_fields(trace_path, tmp_path, fields, field, allowed_part):
    data = {k: v for k, v in _with_trace(trace_path, **{"topologies": ["1x2"], **fields}).items() if v is not None}
    data["base"] = {"model": {"hidden_size": 32}, "run": {"tokens_per_rank": 100}} if field.startswith("base") \
        else data["base"]
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data, tmp_path)
    assert info.value.field_name == field and allowed_part in info.value.allowed


def test_plan_file_must_fit_every_topology(trace_path, tmp_path):
    plan = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "c2r_comm", "plan", "--trace", str(trace_path), "--topology", "1x2", "--method",
           "contiguous", "--layers", "1", "--fit-prompts", "0:48", "--eval-prompts", "48:", "--out", str(plan),
           "--no-png"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=120)
    ok = spec_from_dict(_with_trace(trace_path, topologies=["1x2"], placements=[{"plan": "p.json"}]), tmp_path)
    assert ok.placements[0].plan_file == str(plan) and ok.placements[0].label == "plan p.json"
    with pytest.raises(ConfigError, match="topology 1x2 but the run uses 2x2") as info:
        spec_from_dict(_with_trace(trace_path, topologies=["1x2", "2x2"], placements=[{"plan": "p.json"}]), tmp_path)
    assert info.value.field_name == "placements[0].plan"


def test_bad_spec_fails_in_the_cli_before_anything_runs(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "topologies": ["1x2"], "overlap_degrees": [2]}))
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out)]) == 2
    assert "overlap_degrees[0]" in capsys.readouterr().err
    assert not out.exists()


# ---- expansion --------------------------------------------------------------------------------

def test_cells_expand_and_share_one_launch_per_topology_routing_placement_rate(trace_path, tmp_path):
    spec = spec_from_dict(_with_trace(
        trace_path, dispatchers=["alltoall", "dedup"], topologies=["1x2", "2x2"],
        routings=["trace", {"kind": "c2r", "top_t": 5}, {"kind": "device_constrained", "max_groups": 1}],
        placements=["contiguous", "occult_greedy"], emulate=True, rates=[0.5, None]), tmp_path)
    launches = spec.launches()
    assert len(launches) == 2 * 3 * 2 * 2 and spec.num_cells == 2 * len(launches)
    keys = {(str(l.topology), l.routing.label, l.placement.label, l.rate_gbit) for l in launches}
    assert len(keys) == len(launches) and len({l.name for l in launches}) == len(launches)
    assert all(l.dispatchers == ("alltoall", "dedup") and l.overlap_degree == 1 for l in launches)
    assert spec.base.model.num_experts == 16 and spec.base.model.top_k == 4  # from the trace

    jobs = sweep_jobs(spec, tmp_path / "out")
    plans = sorted(s.output.name for s in jobs.steps if s.kind == "plan")
    assert [p.split("_layer")[0] for p in plans] == ["occult_greedy_1x2", "occult_greedy_2x2"]  # once per topology
    assert [s.kind for s in jobs.steps].count("profile") == 1  # c2r lists profiled once
    for job in jobs.launches:
        config = yaml.safe_load(job.config_yaml)
        launch = job.launch
        assert (config["parallel"]["nodes"], config["parallel"]["gpus_per_node"]) == \
            (launch.topology.nodes, launch.topology.gpus_per_node)
        assert config["placement"]["layer"] == 1
        plan_steps = [s for s in job.needs if s.kind == "plan"]
        if launch.placement.method == "occult_greedy":
            assert config["placement"]["plan"] == str(plan_steps[0].output) and str(launch.topology) in \
                plan_steps[0].output.name
        else:
            assert config["placement"]["plan"] is None and not plan_steps
        if launch.routing.kind == "c2r":
            assert config["routing"]["collaborators"] == str(next(s.output for s in job.needs if s.kind == "profile"))
            assert config["routing"]["top_t"] == 5
        assert config["routing"]["kind"] == ("topk" if launch.routing.kind == "trace" else launch.routing.kind)


def test_emulated_rate_cells_run_bench_under_emulate(trace_path, tmp_path):
    spec = spec_from_dict(_with_trace(trace_path, topologies=["2x2"], routings=["trace", "topk"], emulate=True,
                                      rates=[0.1, None], intra_node_gbit=10), tmp_path)
    by_rate = {(l.routing.kind, l.rate_gbit): l for l in spec.launches()}
    cfg, out = tmp_path / "c.yaml", tmp_path / "r.json"
    argv = launch_argv(spec, by_rate["trace", 0.1], cfg, out)
    head = [sys.executable, "-m", "c2r_comm", "emulate", "--nodes", "2", "--gpus-per-node", "2",
            "--inter-node-gbit", "0.1", "--intra-node-gbit", "10", "--", "bench"]
    assert argv[:len(head)] == head
    bench = argv[len(head):]
    assert bench[:8] == ["--config", str(cfg), "--topology", "2x2", "--dispatcher", "alltoall,dedup,hierarchical",
                         "--json", str(out)]
    assert bench[8:] == ["--layer", "1", "--trace", str(trace_path.resolve()), "--prompts", "48:"]
    unshaped = launch_argv(spec, by_rate["topk", None], cfg, out)
    assert "--inter-node-gbit" not in unshaped and unshaped[unshaped.index("--") + 1:][-2:] == ["--layer", "1"]
    # The emulate command parses these argv as a rate and an inner bench command line.
    args = build_parser().parse_args(argv[3:])
    assert args._module.endswith("emulate_cmd") and args.inter_node_gbit == 0.1 and args.intra_node_gbit == 10
    assert "bench" in args.inner
    plain = spec_from_dict(_with_trace(trace_path, topologies=["2x2"]), tmp_path)
    assert launch_argv(plain, plain.launches()[0], cfg, out)[3:5] == ["bench", "--config"]


# ---- running ----------------------------------------------------------------------------------

def test_tiny_sweep_writes_json_markdown_plots_and_reports_a_failing_launch(trace_path, tmp_path):
    spec = spec_from_dict(_with_trace(trace_path, dispatchers=["alltoall", "dedup"], topologies=["1x2"],
                                      routings=["topk"], placements=["contiguous", "occult_greedy"]), tmp_path)
    out = tmp_path / "out"
    jobs = sweep_jobs(spec, out)
    assert len(jobs.launches) == 2 and len(jobs.steps) == 1
    broken = dataclasses.replace(
        jobs.launches[0], launch=dataclasses.replace(jobs.launches[0].launch, index=7),
        argv=(sys.executable, "-c", "import sys; print('rank 0 fell over', file=sys.stderr); sys.exit(3)"))
    result = run_sweep(spec, SweepJobs(jobs.steps, jobs.launches + (broken,)), out, REPO, show_progress=False)

    assert [f.what for f in result.failures] == [f"launch {broken.launch.name}"]
    failure = result.failures[0]
    assert failure.exit_code == 3 and "rank 0 fell over" in failure.stderr_tail
    assert [(r["sweep"]["placement"], r["dispatcher"]) for r in result.records] == \
        [("contiguous", "alltoall"), ("contiguous", "dedup"), ("occult_greedy", "alltoall"), ("occult_greedy", "dedup")]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for r in result.records:
        m = r["measurement"]
        assert r["git_commit"] == (head or "unknown") and r["machine"]["cpu_count"] >= 1 and r["machine"]["torch"]
        assert r["config"]["parallel"]["gpus_per_node"] == 2 and r["config"]["run"]["iters"] == 2
        assert 0 < m["total"]["p10_ms"] <= m["total"]["median_ms"] <= m["total"]["p90_ms"]
        assert m["peak_memory_mb"] > 10  # a torch process's RSS
        assert r["sweep"]["topology"] == "1x2" and r["sweep"]["inter_node_gbit"] is None
    assert "peak MB/rank" in (out / "logs" / f"{jobs.launches[0].launch.name}.out").read_text()  # bench's table

    json_path, md_path = write_reports(spec, result, out, REPO)
    doc = json.loads(json_path.read_text())
    assert len(doc["records"]) == 4 and doc["failures"][0]["exit_code"] == 3
    md = md_path.read_text()
    assert md.count("| 1x2 | - | topk |") == 4 and "| 1.00x |" in md
    assert f"launch {broken.launch.name}: exit code 3" in md and "rank 0 fell over" in md

    pytest.importorskip("matplotlib")
    from c2r_comm.bench.sweep_plots import save_sweep_plots
    paths = save_sweep_plots(result.records, out)
    assert sorted(p.name for p in paths) == ["bytes.png", "speedup.png", "time.png"]  # one rate: no rate plot
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_cli_dry_run_prints_launches_and_a_timeout_fails_the_sweep(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "topologies": ["1x2"], "dispatchers": ["dedup"], "launch_timeout_s": 0.5}))
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "1 cells in 1 bench launches" in printed and "c2r_comm bench --config" in printed
    assert not out.exists()
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--no-plots", "--quiet"]) == 1
    assert "timed out after 0.5 s" in capsys.readouterr().err
    assert "timed out" in (out / "sweep.md").read_text()


def test_shipped_sweep_specs_load():
    if not (REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz").is_file():
        pytest.skip("needs ../shared/traces (beside the repo)")
    rate = load_sweep_spec(REPO / "configs" / "sweeps" / "rate_sweep_2x2.yaml", base_dir=REPO)
    assert rate.emulate and rate.rates_gbit == (0.1, 0.2, 0.5, 1.0, None) and rate.num_cells == 30
    assert rate.base.model.hidden_size == 2048 and rate.base.run.tokens_per_rank == 512 and rate.base.run.iters >= 10
    smoke = load_sweep_spec(REPO / "configs" / "sweeps" / "smoke.yaml", base_dir=REPO)
    assert not smoke.emulate and len(smoke.launches()) == 4
