"""`c2r-comm check-model`: the cost model laid out again from a real bench run's JSON gives the same
bytes exactly (every dispatcher, with a plan file and without); bad input is refused clearly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from c2r_comm.cli import main
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real 2x2 bench --phases run (4 gloo ranks) on a synthetic trace with a random plan."""
    tmp = tmp_path_factory.mktemp("check")
    trace = tmp / "trace.npz"
    RoutingTrace.synthetic(600, 16, 4, num_layers=2, tokens_per_prompt=50, seed=5).save(trace)
    plan = tmp / "plan.json"
    PlanFile(Topology(2, 2), 16, {1: PlacementPlan.random(16, 4, seed=1)}, "random").save(plan)
    out = tmp / "run.json"
    proc = subprocess.run([sys.executable, "-m", "c2r_comm", "bench", "--topology", "2x2", "--trace", str(trace),
                           "--layer", "1", "--plan", str(plan), "--hidden-size", "32", "--ffn-hidden-size", "16",
                           "--tokens-per-rank", "100", "--iters", "2", "--warmup-iters", "0", "--phases",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trace, out


def test_model_bytes_equal_the_measured_run(bench_run, capsys, tmp_path):
    trace, out = bench_run
    report = tmp_path / "check.json"
    # Loopback run (no emulation): a huge tolerance, this checks bytes and the plumbing.
    code = main(["check-model", "--bench-json", str(out), "--trace", str(trace), "--inter-node-gbit", "10",
                 "--tolerance", "9", "--json", str(report)])
    checks = json.loads(report.read_text())
    assert {c["dispatcher"] for c in checks} == {"alltoall", "dedup", "hierarchical"}
    assert all(c["bytes_equal"] for c in checks), checks
    assert all(c["measured_mb"] == c["model_mb"] > 0 for c in checks)
    assert all(c["predicted_exchange_ms"] > 0 and c["measured_exchange_ms"] > 0 for c in checks)
    assert code == (0 if all(abs(c["ratio"] - 1) <= 9 for c in checks) else 1)
    assert "| 2x2 |" in capsys.readouterr().out


def test_a_tampered_record_is_caught(bench_run, tmp_path):
    trace, out = bench_run
    records = json.loads(out.read_text())
    records[0]["measurement"]["dispatch"]["bytes_cross_node"] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    report = tmp_path / "check.json"
    assert main(["check-model", "--bench-json", str(bad), "--trace", str(trace), "--inter-node-gbit", "10",
                 "--tolerance", "9", "--json", str(report)]) == 1
    assert [c["bytes_equal"] for c in json.loads(report.read_text())][0] is False


@pytest.mark.parametrize("content, words", [
    (None, ["--bench-json", "existing"]),
    ("{not json", ["--bench-json", "valid JSON"]),
    ("[]", ["non-empty list"]),
    ('[{"dispatcher": "dedup", "phases": null, "layer": 1}]', ["--phases"]),
])
def test_bad_bench_json_is_refused(tmp_path, capsys, content, words):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    trace = tmp_path / "trace.npz"
    RoutingTrace.synthetic(100, 16, 4, num_layers=1, tokens_per_prompt=50, seed=1).save(trace)
    assert main(["check-model", "--bench-json", str(path), "--trace", str(trace)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_an_unshaped_run_needs_the_rate_to_assume(bench_run, capsys):
    trace, out = bench_run  # a loopback run: no emulated rate in its records
    assert main(["check-model", "--bench-json", str(out), "--trace", str(trace)]) == 2
    assert "--inter-node-gbit" in capsys.readouterr().err


def test_unknown_profile_and_bad_tolerance(tmp_path, capsys):
    trace = tmp_path / "trace.npz"
    RoutingTrace.synthetic(100, 16, 4, num_layers=1, tokens_per_prompt=50, seed=1).save(trace)
    assert main(["check-model", "--bench-json", "x.json", "--trace", str(trace), "--hardware", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["check-model", "--bench-json", "x.json", "--trace", str(trace), "--tolerance", "0"]) == 2
    assert "--tolerance" in capsys.readouterr().err


def test_other_prompts_or_trace_than_the_benchmarks_are_refused(bench_run, capsys, tmp_path):
    """bench records the replayed trace (file, --prompts, tokens); check-model with other prompts or
    another trace would lay out other tokens and report 'bytes equal NO', so it is refused instead."""
    trace, out = bench_run
    source = json.loads(out.read_text())[0]["trace_source"]
    assert source["prompts"] is None and source["tokens"] == 600 and Path(source["file"]).samefile(trace)
    flags = ["--inter-node-gbit", "10", "--tolerance", "9"]
    assert main(["check-model", "--bench-json", str(out), "--trace", str(trace), "--prompts", "0:6", *flags]) == 2
    assert "'--prompts' = '0:6' is invalid: allowed no --prompts (the whole trace)" in capsys.readouterr().err
    # the same prompts written another way are the same: '0:' of this 12-prompt trace is all of it
    assert main(["check-model", "--bench-json", str(out), "--trace", str(trace), "--prompts", "0:", *flags]) != 2
    other = tmp_path / "other.npz"
    RoutingTrace.synthetic(500, 16, 4, num_layers=2, tokens_per_prompt=50, seed=5).save(other)
    assert main(["check-model", "--bench-json", str(out), "--trace", str(other), *flags]) == 2
    err = capsys.readouterr().err
    assert "'--trace'" in err and "600 tokens after --prompts, this one 500" in err, err
