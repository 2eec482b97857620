"""`c2r-comm sweep`: spec validation, expansion into launches, emulated command lines, plan/profile
caching, a real tiny sweep (JSON, markdown, PNGs), failing and unreadable launches reported with
their missing cells while the others complete, SIGTERM stopping every process of the running
launch, and the up-front warning when emulation is unavailable."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from procs import processes_with
import yaml

from c2r_comm.bench import netns
from c2r_comm.bench.sweep_report import write_reports
from c2r_comm.bench.sweep_run import SweepJobs, SweepResult, launch_argv, plan_step, profile_step, run_sweep, \
    sweep_jobs
from c2r_comm.bench.sweep_spec import load_sweep_spec, spec_from_dict
from c2r_comm.cli import build_parser, main, sweep_cmd
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
    ({"topologies": ["1x2", "1x3"]}, "topologies[1]", "model.num_experts = 16: allowed a multiple of the number"),
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
    ({"overlap_degrees": [1, 0]}, "overlap_degrees[1]", "token chunks"),
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
    spec.write_text(yaml.safe_dump({**TINY, "topologies": ["1x2"], "overlap_degrees": [0]}))
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
    assert "--inter-node-gbit" not in unshaped and "--layer" not in unshaped  # no trace: the config's layer
    # The emulate command parses these argv as a rate and an inner bench command line.
    args = build_parser().parse_args(argv[3:])
    assert args._module.endswith("emulate_cmd") and args.inter_node_gbit == 0.1 and args.intra_node_gbit == 10
    assert "bench" in args.inner
    plain = spec_from_dict(_with_trace(trace_path, topologies=["2x2"]), tmp_path)
    assert launch_argv(plain, plain.launches()[0], cfg, out)[3:5] == ["bench", "--config"]


def test_plans_and_profiles_are_cached_by_the_trace_file_and_every_setting(trace_path, tmp_path, monkeypatch):
    trace = tmp_path / "t.npz"
    trace.write_bytes(trace_path.read_bytes())
    spec = spec_from_dict(_with_trace(trace, topologies=["1x2", "2x2"], placements=["occult_greedy"],
                                      routings=[{"kind": "c2r", "top_t": 5}]), tmp_path)
    out, topo = tmp_path / "out", spec.topologies[0]

    def outputs(s=spec, method="occult_greedy", t=topo) -> tuple[Path, Path]:
        return plan_step(s, method, t, out).output, profile_step(s, out).output

    plan, profile = outputs()
    assert outputs() == (plan, profile)  # the same inputs reuse the cached files
    refit = dataclasses.replace(spec, trace=dataclasses.replace(spec.trace, fit_prompts="0:40"))
    changed = [outputs(method="hypergraph")[0], outputs(t=spec.topologies[1])[0], *outputs(refit)]
    assert plan not in changed and profile not in changed and len(set(changed)) == 4
    st = trace.stat()
    os.utime(trace, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the trace was regenerated
    regenerated = outputs()
    assert regenerated[0] != plan and regenerated[1] != profile
    with trace.open("ab") as fh:  # a different size
        fh.write(b"\0")
    os.utime(trace, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert set(outputs()).isdisjoint(regenerated)
    from c2r_comm.bench import sweep_run
    from c2r_comm.placement.planners import PlannerOptions
    monkeypatch.setattr(sweep_run, "PlannerOptions", lambda: PlannerOptions(load_tolerance=1.2))
    assert outputs()[0] not in (plan, regenerated[0])  # the planner's settings changed


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
    garbled_json = out / "raw" / "garbled.json"
    garbled = dataclasses.replace(
        jobs.launches[0], launch=dataclasses.replace(jobs.launches[0].launch, index=8), json_path=garbled_json,
        argv=(sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(garbled_json)!r}); "
                                    "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('[{not json')"))
    result = run_sweep(spec, SweepJobs(jobs.steps, jobs.launches + (broken, garbled)), out, REPO,
                       show_progress=False)

    assert [f.what for f in result.failures] == [f"launch {broken.launch.name}", f"launch {garbled.launch.name}"]
    failure, unreadable = result.failures
    assert failure.exit_code == 3 and "rank 0 fell over" in failure.stderr_tail
    assert unreadable.exit_code == 0 and unreadable.reason.startswith(f"unreadable {garbled_json}")
    assert result.missing == tuple((j.launch.name, d) for j in (broken, garbled) for d in ("alltoall", "dedup"))
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
    assert doc["missing"][0] == {"launch": broken.launch.name, "dispatcher": "alltoall"} and len(doc["missing"]) == 4
    md = md_path.read_text()
    assert md.count("| 1x2 | - | topk |") == 4 and "| 1.00x |" in md
    assert f"launch {broken.launch.name}: exit code 3" in md and "rank 0 fell over" in md
    assert f"launch {garbled.launch.name}: unreadable {garbled_json}" in md
    missing_section = md[md.index("## missing cells (4 of 4)"):]
    assert all(f"- {j.launch.name}: {d}" in missing_section for j in (broken, garbled) for d in ("alltoall", "dedup"))

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


def test_sigterm_stops_the_running_launch_and_all_its_processes(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "topologies": ["1x2"], "dispatchers": ["alltoall"], "iters": 10**9,
                                    "launch_timeout_s": 3600}))
    out = tmp_path / f"out-{uuid.uuid4().hex}"  # in the command line of the sweep and of every process it starts
    marker = str(out)
    sweep = subprocess.Popen([sys.executable, "-m", "c2r_comm", "sweep", "--spec", str(spec), "--out", marker,
                              "--no-plots", "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 240
        # the sweep, bench and bench's 2 ranks (sessions of their own)
        while len(processes_with(marker)) < 4 and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before its launch ran: {sweep.communicate()}")
        assert len(processes_with(marker)) >= 4, f"only {processes_with(marker)} started in 240 s"
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == 128 + signal.SIGTERM, err
        assert "SIGTERM" in err and "stopped" in err
        deadline = time.monotonic() + 5
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):  # only this run's processes: the marker is unique
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()


def test_a_stopped_launch_also_stops_the_processes_that_left_its_group(tmp_path):
    """As torchrun's ranks do (sessions of their own): found by the tag in their environment."""
    spec = spec_from_dict({**TINY, "topologies": ["1x2"], "launch_timeout_s": 1}, tmp_path)
    job = sweep_jobs(spec, tmp_path / "out").launches[0]
    marker = f"orphan-{uuid.uuid4().hex}"
    orphan = [sys.executable, "-c", f"import time; time.sleep(600)  # {marker}"]
    leader = f"import subprocess, time; subprocess.Popen({orphan!r}, start_new_session=True); time.sleep(600)"
    try:
        result = run_sweep(spec, SweepJobs((), (dataclasses.replace(job, argv=(sys.executable, "-c", leader)),)),
                           tmp_path / "out", REPO, show_progress=False)
        assert "timed out after 1 s" in result.failures[0].reason
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_unavailable_emulation_is_warned_up_front_and_recorded(tmp_path, monkeypatch, capsys):
    def unavailable() -> None:
        raise netns.EmulationUnavailable("creating network namespaces needs root")

    ran = []
    monkeypatch.setattr(netns, "check_available", unavailable)
    monkeypatch.setattr(sweep_cmd, "run_sweep", lambda spec, *_, **__: ran.append(spec) or SweepResult((), ()))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "topologies": ["2x2"], "emulate": True, "rates": [0.1, None]}))
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--no-plots", "--quiet"]) == 0 and ran
    err = capsys.readouterr().err
    assert "warning: no emulated nodes here (creating network namespaces needs root)" in err
    assert "unshaped" in err and err.index("warning") < err.index("cells in")  # said before anything runs
    md = (out / "sweep.md").read_text()
    assert "**Emulation unavailable** (creating network namespaces needs root): every cell ran plainly" in md
    assert json.loads((out / "sweep.json").read_text())["emulation_unavailable"] == \
        "creating network namespaces needs root"


def test_shipped_sweep_specs_load():
    if not (REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz").is_file():
        pytest.skip("needs ../shared/traces (beside the repo)")
    rate = load_sweep_spec(REPO / "configs" / "sweeps" / "rate_sweep_2x2.yaml", base_dir=REPO)
    assert rate.emulate and rate.rates_gbit == (0.1, 0.2, 0.5, 1.0, None) and rate.num_cells == 30
    assert rate.base.model.hidden_size == 2048 and rate.base.run.tokens_per_rank == 512 and rate.base.run.iters >= 10
    smoke = load_sweep_spec(REPO / "configs" / "sweeps" / "smoke.yaml", base_dir=REPO)
    assert not smoke.emulate and len(smoke.launches()) == 4
