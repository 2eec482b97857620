"""The README's main job, at a small size, as a real subprocess (torchrun + gloo ranks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from c2r_comm.cli import main
from c2r_comm.plan import PlacementPlan, PlanFile, distinct_per_token
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"


def _bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "c2r_comm", "bench", "--config", str(REPO / "configs" / "cpu_demo.yaml"),
           "--iters", "2", "--warmup-iters", "1", "--tokens-per-rank", "64", "--hidden-size", "32",
           "--ffn-hidden-size", "48", "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_readme_main_job_runs_and_reports_every_dispatcher(tmp_path):
    """`bash launch/demo.sh` exactly as the README says, at a small size (extra flags go to bench)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(["bash", "launch/demo.sh", "--iters", "2", "--warmup-iters", "1", "--tokens-per-rank", "64",
                           "--hidden-size", "32", "--ffn-hidden-size", "48", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.read_text())
    names = [r["dispatcher"] for r in records]
    assert names[:2] == ["alltoall", "dedup"]
    by = {r["dispatcher"]: r for r in records}
    assert "| dedup |" in proc.stdout and "fwd ms" in proc.stdout
    # Same tokens and routing: dedup never sends more rows than the baseline.
    assert by["dedup"]["copies_per_token_off_rank"] <= by["alltoall"]["copies_per_token_off_rank"]
    assert by["alltoall"]["measurement"]["tokens"] == 4 * 64
    assert by["dedup"]["config"]["parallel"]["gpus_per_node"] == 4
    for r in records:
        assert r["measurement"]["forward"]["median_ms"] > 0 and r["measurement"]["backward"]["median_ms"] > 0


def test_single_process_world_runs_without_a_launcher(tmp_path):
    proc, records = _bench(tmp_path, "--topology", "1x1", "--num-experts", "4", "--top-k", "2")
    assert [r["dispatcher"] for r in records] == ["alltoall", "dedup", "hierarchical"]
    for r in records:  # one rank: nothing leaves it
        assert r["measurement"]["dispatch"]["rows_local"] == 64 * (2 if r["dispatcher"] == "alltoall" else 1)
        assert r["copies_per_token_off_rank"] == 0


@pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces (beside the repo)")
def test_trace_driven_counts_match_an_independent_count(tmp_path):
    tokens = 128
    proc, records = _bench(tmp_path, "--trace", str(TRACE), "--layer", "12,13", "--topology", "1x4",
                           "--tokens-per-rank", str(tokens), "--dispatcher", "alltoall,dedup")
    assert [(r["layer"], r["dispatcher"]) for r in records] == [(12, "alltoall"), (12, "dedup"), (13, "alltoall"),
                                                                (13, "dedup")]
    assert "cross-node vs alltoall" in proc.stdout  # the per-dispatcher summary over layers
    records = [r for r in records if r["layer"] == 12]
    ids = np.load(TRACE)["expert_ids"][: 4 * tokens, 12, :].astype(np.int64)
    e2r = np.asarray(PlacementPlan.contiguous(64, 4).expert_to_rank)
    src = np.repeat(np.arange(4), tokens)
    remote_pairs = (e2r[ids] != src[:, None]).sum()
    # distinct remote ranks = distinct ranks - (1 if the source rank itself is among them)
    remote_ranks = distinct_per_token(e2r, ids).sum() - (e2r[ids] == src[:, None]).any(1).sum()
    by = {r["dispatcher"]: r for r in records}
    assert by["alltoall"]["measurement"]["dispatch"]["rows_same_node"] == remote_pairs
    assert by["dedup"]["measurement"]["dispatch"]["rows_same_node"] == remote_ranks
    assert by["dedup"]["measurement"]["dispatch"]["rows_cross_node"] == 0


@pytest.mark.parametrize("flags, words", [
    (["--topology", "3x3"], ["model.num_experts", "multiple"]),
    (["--layer", "0,1"], ["--layer", "several layers need --trace"]),
    (["--layer", "3"], ["--layer", "only with --trace, a plan (--plan or placement.plan) or c2r routing"]),
    pytest.param(["--trace", str(TRACE), "--top-k", "2"], ["--top-k", "6 or left out"],
                 marks=pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces")),
    pytest.param(["--trace", str(TRACE), "--num-experts", "16"], ["--num-experts", "64 or left out"],
                 marks=pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces")),
    (["--dispatcher", "magic"], ["--dispatcher", "allowed"]),
    (["--prompts", "0:10"], ["--prompts", "only together with --trace"]),
    pytest.param(["--trace", str(TRACE), "--topology", "1x4", "--prompts", "800:999", "--tokens-per-rank", "5000"],
                 ["--tokens-per-rank", "at most 4011"],
                 marks=pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces")),
])
def test_bad_flag_value_fails_before_launch(flags, words, capsys, no_launch):
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_phases_and_overlap_are_timed_and_written(tmp_path):
    """bench --phases prints each phase's median and writes them (forward and backward) to JSON,
    with the CPU accounting; --overlap-degree adds the serial and pipelined layer, exchange and
    experts alone, and the efficiency, per dispatcher. One launch for both."""
    # big enough that an iteration's CPU time is well above the kernel's accounting tick
    proc, records = _bench(tmp_path, "--topology", "2x1", "--num-experts", "4", "--top-k", "2", "--phases",
                           "--tokens-per-rank", "512", "--hidden-size", "128", "--ffn-hidden-size", "256",
                           "--overlap-degree", "2")
    assert "phases (ms" in proc.stdout and "fwd count_exchange" in proc.stdout and "bwd dispatch" in proc.stdout
    assert "host CPU seconds" in proc.stdout
    assert "overlap (ms" in proc.stdout and "serial/overlapped" in proc.stdout
    assert {r["dispatcher"] for r in records} == {"alltoall", "dedup", "hierarchical"}
    for r in records:
        ph = r["phases"]
        assert set(ph["forward"]) == {"router", "layout", "count_exchange", "send", "experts", "combine"}
        assert set(ph["backward"]) == {"combine", "experts", "dispatch"}
        assert all(t["median_ms"] >= 0 for d in ("forward", "backward") for t in ph[d].values())
        assert ph["forward"]["experts"]["median_ms"] > 0 and ph["backward"]["dispatch"]["median_ms"] > 0
        assert r["measurement"]["cpu_user_s"] > 0
        assert set(ph["forward_cpu_s"]) == set(ph["forward"]) and ph["backward_cpu_s"]["experts"] > 0
        ov = r["overlap"]
        assert ov["degree"] == 2 and ov["requested"] == 2
        assert ov["serial_ms"] == r["measurement"]["total"]["median_ms"] > 0 and ov["overlapped_ms"] > 0
        assert ov["exchange_ms"] > 0 and ov["experts_ms"] > 0
        smaller = min(ov["exchange_ms"], ov["experts_ms"])
        assert ov["efficiency"] == pytest.approx((ov["serial_ms"] - ov["overlapped_ms"]) / smaller)
        assert r["config"]["schedule"]["overlap_degree"] == 1  # the table rows are the serial layer
        assert ov["serial_peak_mb"] == r["measurement"]["peak_memory_mb"] > 0 and ov["overlapped_peak_mb"] > 0


def test_bad_overlap_degree_fails_before_launch(capsys, no_launch):
    with pytest.raises(SystemExit) as exc:  # argparse's own exit, with the allowed values named
        main(["bench", "--overlap-degree", "0"])
    assert exc.value.code == 2
    assert "argument --overlap-degree: '0': allowed an integer 1..64 or 'auto'" in capsys.readouterr().err


def test_overlap_efficiency_is_not_reported_at_one_chunk():
    """At C = 1 (auto may pick it) the 'overlapped' layer is the serial one timed again: its
    efficiency is noise over a small denominator, so the table says n/a and the JSON null."""
    from c2r_comm.bench.overlap import OverlapResult, format_overlap

    one = OverlapResult(1, "auto", exchange_ms=10.0, experts_ms=500.0, serial_ms=520.0, overlapped_ms=480.0)
    two = OverlapResult(2, 2, exchange_ms=10.0, experts_ms=500.0, serial_ms=520.0, overlapped_ms=515.0)
    assert one.efficiency is None and two.efficiency == pytest.approx(0.5)
    table = format_overlap([("dedup", one), ("alltoall", two)])
    assert "| dedup | 1 (auto) |" in table and "| n/a (C = 1) |" in table and "| 0.50 |" in table


def test_layer_defaults_to_the_configs_placement_layer_and_c2r_takes_a_layer(tmp_path):
    """Without --layer the benchmarked (plan, trace) layer is the config's placement.layer, with a
    trace as without; --layer without a trace or plan is meaningful for c2r routing (its lists are
    per layer), so it is accepted there."""
    import yaml

    from c2r_comm.cli import parser_for
    from c2r_comm.cli.bench_cmd import resolve_config

    plan = tmp_path / "plan.json"
    PlanFile(Topology(1, 2), 8, {1: PlacementPlan.random(8, 2, seed=0)}, "random").save(plan)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"num_experts": 8, "top_k": 2},
                                   "placement": {"plan": str(plan), "layer": 1}, "parallel": {"gpus_per_node": 2}}))

    def resolve(*argv):
        return resolve_config(parser_for(["bench"]).parse_args(["bench", *argv]))
    config, _, layers = resolve("--config", str(cfg))
    assert layers == [1] and config.placement.layer == 1  # was [0]: "plan file has no plan for layer 0"
    trace = tmp_path / "t.npz"
    RoutingTrace.synthetic(200, 8, 2, num_layers=3, tokens_per_prompt=20, seed=1).save(trace)
    assert resolve("--config", str(cfg), "--trace", str(trace), "--tokens-per-rank", "50")[2] == [1]
    c2r = tmp_path / "c2r.yaml"
    c2r.write_text(yaml.safe_dump({"routing": {"kind": "c2r", "top_t": 3, "collaborators": str(tmp_path / "l.npz")},
                                   "model": {"num_experts": 8, "top_k": 2}, "parallel": {"gpus_per_node": 2}}))
    config, _, layers = resolve("--config", str(c2r), "--layer", "2")
    assert layers == [2] and config.placement.layer == 2
