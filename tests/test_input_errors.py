"""Issue 14: bad input fails early (before any rank starts), with one clear message, exit code 2.

Commands run in-process through `c2r_comm.cli.main`; bench's self-launch is replaced by a stub that
fails the test, so "refused before any rank starts" is checked directly. One subprocess run checks
the same end to end (fast, no torchrun traceback).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import run_ranks

from c2r_comm.cli import bench_cmd, main
from c2r_comm.config import ConfigError, RunConfig, load_config
from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden-size", "32", "--ffn-hidden-size", "48", "--tokens-per-rank", "16", "--iters", "1",
         "--warmup-iters", "0", "--dispatcher", "dedup"]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _refused(capsys, *argv) -> str:
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _plan(path: Path, topology=(1, 4), experts=16, layers=(0,), edit=None) -> str:
    doc = PlanFile(Topology(*topology), experts,
                   {l: PlacementPlan.contiguous(experts, topology[0] * topology[1]) for l in layers}, "x").to_json()
    if edit:
        edit(doc)
    path.write_text(json.dumps(doc, indent=1))
    return str(path)


def _set(*keys, value):
    def edit(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _trace(path: Path, ids, **extra) -> str:
    np.savez(path, expert_ids=ids, **extra)
    return str(path)


def _distinct_ids(tokens=64, experts=16, k=4, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([[rng.permutation(experts)[:k] for _ in range(layers)] for _ in range(tokens)])


# ---- 3: errors found late: refused in the launcher, before any rank starts ------------------------
PLAN_CASES = {
    "other_topology": (dict(topology=(1, 2)), ["plan file is for topology 1x2 but the run uses 1x4"]),
    "other_expert_count": (dict(experts=8), ["plan file is for 8 experts but the run has 16"]),
    "missing_layer": (dict(layers=(1,)), ["no plan for layer 0", "it has layers [1]"]),
    "layers_is_a_list": (dict(edit=lambda d: d.update(layers=list(d["layers"].values()))),
                         ["field 'layers'", "allowed an object keyed by 0-based layer index"]),
    "gpus_per_node_float": (dict(edit=_set("topology", "gpus_per_node", value=4.9)),
                            ["'topology.gpus_per_node' = 4.9", "an integer >= 1"]),
    "gpus_per_node_bool": (dict(topology=(1, 1), edit=_set("topology", "gpus_per_node", value=True)),
                           ["'topology.gpus_per_node' = True", "an integer >= 1"]),
    "float_ranks": (dict(edit=_set("layers", "0", "expert_to_rank", value=[r + 0.5 for r in range(4)] * 4)),
                    ["'layers.0.expert_to_rank[0]' = 0.5", "a list of integers"]),
    "ranks_as_string": (dict(edit=_set("layers", "0", "expert_to_rank", value="0123")),
                        ["'layers.0.expert_to_rank' = '0123'", "a list of integers"]),
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_bad_plan_refused_before_any_rank_starts(tmp_path, capsys, no_launch, case):
    kwargs, words = PLAN_CASES[case]
    plan = _plan(tmp_path / "plan.json", **kwargs)
    err = _refused(capsys, "bench", "--topology", "1x4", "--plan", plan, *SMALL)
    assert plan in err and "--plan" in err, err
    assert all(w in err for w in words), err


def test_corrupt_or_missing_plan_names_file_and_line(tmp_path, capsys, no_launch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"topology": {"nodes": 1,\n "gpus_per_node": 4}\n "num_experts": 16}')
    err = _refused(capsys, "bench", "--topology", "1x4", "--plan", str(bad), *SMALL)
    assert f"plan file {bad} is not valid JSON: line 3, column 2" in err, err
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert f"plan file {binary} is not a JSON text file" in _refused(capsys, "bench", "--plan", str(binary), *SMALL)
    missing = tmp_path / "missing.json"
    assert f"plan file {missing} does not exist" in _refused(capsys, "bench", "--plan", str(missing), *SMALL)


def test_plan_layers_checked_for_every_benchmarked_layer(tmp_path, capsys, no_launch):
    trace = _trace(tmp_path / "t.npz", _distinct_ids(layers=3))
    plan = _plan(tmp_path / "plan.json", topology=(1, 2), layers=(0, 1))
    err = _refused(capsys, "bench", "--trace", trace, "--layer", "all", "--topology", "1x2", "--plan", plan, *SMALL)
    assert "no plan for layer 2" in err, err


def test_profile_checks_its_plan_before_profiling(tmp_path, capsys):
    trace = _trace(tmp_path / "t.npz", _distinct_ids())
    plan = _plan(tmp_path / "plan.json", topology=(1, 2))
    err = _refused(capsys, "profile", "--trace", trace, "--topology", "1x4", "--heatmap", str(tmp_path / "h.png"),
                   "--plan", plan)
    assert f"--plan {plan}: plan file is for topology 1x2 but the run uses 1x4" in err, err
    assert "load_cv" not in capsys.readouterr().out  # nothing was profiled (or printed) first


def test_device_cuda_without_enough_gpus_refused_before_launch(capsys, no_launch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _refused(capsys, "bench", "--topology", "1x2", "--device", "cuda", *SMALL)
    assert "'run.device' = 'cuda'" in err and "2 local ranks but 1 GPUs" in err and "'cpu' or 'auto'" in err, err


def test_unwritable_json_refused_before_launch(tmp_path, capsys, no_launch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path, words in ((tmp_path, "this is a directory"), (a_file / "out.json", f"{a_file} is not a directory")):
        err = _refused(capsys, "bench", "--json", str(path), *SMALL)
        assert f"'--json' = '{path}'" in err and words in err, err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _refused(capsys, "bench", "--json", str(locked / "out.json"), *SMALL)
        assert "a path in a writable directory" in err, err


def test_writable_json_check_leaves_nothing_behind(tmp_path):
    bench_cmd.check_writable(str(tmp_path / "new" / "dir" / "out.json"), "--json")  # write_json creates folders
    bench_cmd.check_writable(str(tmp_path / "out.json"), "--json")
    assert list(tmp_path.iterdir()) == []


def test_late_error_subprocess_is_fast_one_line_no_torchrun(tmp_path):
    plan = _plan(tmp_path / "plan.json", topology=(1, 2))
    start = time.monotonic()
    config = str(REPO / "configs" / "cpu_demo.yaml")  # 1x4
    proc = subprocess.run([sys.executable, "-m", "c2r_comm", "bench", "--config", config, "--plan", plan, *SMALL],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"c2r-comm bench: error: --plan {plan}: plan file is for topology 1x2 but the run uses 1x4"]
    assert "torch.distributed" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert time.monotonic() - start < 45


# ---- 4: no uncaught tracebacks ------------------------------------------------------------------
def test_malformed_yaml_names_file_and_line(tmp_path, capsys, no_launch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n  top_k: [1, 2\nrun:\n  iters: 2\n")
    err = _refused(capsys, "bench", "--config", str(bad))
    assert f"'--config' = '{bad}'" in err and "a valid YAML file (line 4, column 4" in err, err
    with pytest.raises(ConfigError, match="line 4"):
        load_config(bad)


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e300"])
def test_timeout_must_be_finite_and_positive(capsys, no_launch, value):
    err = _refused(capsys, "bench", "--timeout-s", value, *SMALL)
    assert "'run.timeout_s'" in err and "a finite number of seconds > 0" in err, err
    with pytest.raises(ConfigError, match="finite"):
        RunConfig(timeout_s=float(value))


# ---- 5 / 6: traces: nothing coerced, messages that say what is wrong ------------------------------
def test_float_expert_ids_refused(tmp_path, capsys, no_launch):
    path = _trace(tmp_path / "f.npz", _distinct_ids().astype(np.float32) + 0.7)
    err = _refused(capsys, "bench", "--trace", path, "--topology", "1x2", *SMALL)
    assert f"routing trace {path}: 'expert_ids' has dtype float32, allowed integers only" in err, err
    with pytest.raises(ValueError, match="must hold integers, got dtype float64"):
        RoutingTrace(np.ones((2, 1, 2)), np.array([0, 2]), 4)


def test_not_an_npz_archive(tmp_path):
    for name, write in (("text.npz", lambda p: p.write_text("hello")),
                        ("array.npz", lambda p: np.save(open(p, "wb"), np.zeros(3)))):
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=re.escape(f"routing trace {path} is not an npz archive")):
            RoutingTrace.load(path)


@pytest.mark.parametrize("ids, words", [
    (-np.ones((10, 1, 2), np.int64), "has no valid expert ids: all are negative"),
    (np.zeros((0, 1, 2), np.int64), "is empty: expert_ids has shape (0, 1, 2)"),
    (np.zeros((10, 1, 0), np.int64), "is empty: expert_ids has shape (10, 1, 0)"),
])
def test_trace_without_usable_ids(tmp_path, capsys, ids, words):
    path = _trace(tmp_path / "t.npz", ids)
    err = _refused(capsys, "profile", "--trace", path, "--topology", "1x1")
    assert f"routing trace {path} {words}" in err, err


# ---- 6: dispatch dtype disagreement names dtypes; 7: what dispatch does with a repeated expert ------
def _dispatch_worker(rank, world):
    from c2r_comm.dispatch import InputError, build_dispatcher
    from c2r_comm.experts import GroupedExperts
    from c2r_comm.groups import build_process_groups

    E, D = 4, 8
    groups = build_process_groups(Topology(1, world), timeout_s=30)
    disp = build_dispatcher("dedup", PlacementPlan.contiguous(E, world), groups, D)
    experts = GroupedExperts.for_rank(disp.plan, rank, D, 6)
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(rank))
    try:
        disp.dispatch(x.double() if rank == 1 else x, torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2))
        message = None
    except InputError as exc:
        message = str(exc)

    def layer(idx, w):
        batch, handle = disp.dispatch(x, torch.tensor(idx), torch.tensor(w))
        return disp.combine(experts(batch.x_PD, batch.tokens_per_expert), handle)
    repeated = layer([[3, 3], [1, 2]], [[0.25, 0.5], [0.5, 0.5]])
    summed = layer([[3, 0], [1, 2]], [[0.75, 0.0], [0.5, 0.5]])
    return message, torch.allclose(repeated, summed, atol=1e-6)


@pytest.fixture(scope="module")
def dispatch_results():
    return run_ranks(2, _dispatch_worker, timeout_s=60)


def test_dtype_disagreement_names_dtypes(dispatch_results):
    for message, _ in dispatch_results:
        assert "top-k / dtypes differ across ranks" in message
        assert "rank 0: k=2, x float32, topk_weight float32; rank 1: k=2, x float64, topk_weight float32" in message


def test_dispatch_sums_a_repeated_expert(dispatch_results):
    """Documented in docs/routing.md: each (token, expert) choice is computed and the outputs summed."""
    assert all(same for _, same in dispatch_results)


# ---- 7: one rule for repeated experts, enforced at trace load --------------------------------------
def test_repeated_expert_refused_by_bench_plan_and_profile_alike(tmp_path, capsys, no_launch):
    ids = _distinct_ids()
    ids[9, 1, 2] = ids[9, 1, 0]
    path = _trace(tmp_path / "dup.npz", ids)
    expected = (f"routing trace {path}: a token selects the same expert twice: token 9 of layer 1 selects expert "
                f"{ids[9, 1, 0]} more than once (a token's expert ids must be distinct)")
    errors = [_refused(capsys, "bench", "--trace", path, "--topology", "1x2", *SMALL),
              _refused(capsys, "plan", "--trace", path, "--topology", "1x2", "--method", "contiguous",
                       "--out", str(tmp_path / "p.json"), "--no-png"),
              _refused(capsys, "profile", "--trace", path, "--topology", "1x2")]
    assert [e.split(": error: ", 1)[1] for e in errors] == [expected] * 3, errors
    with pytest.raises(ValueError, match="token 9 of layer 1"):
        RoutingTrace(ids, np.array([0, len(ids)]), 16)


def test_array_checks_share_the_rule_and_wording():
    ids = np.array([[0, 1], [3, 3]])
    with pytest.raises(ValueError, match=r"same expert twice: token 1 of layer 1 selects expert 3 more than once "
                                         r"\(a token's expert ids must be distinct\)"):
        CollaborationProfiler(2, 8).update(1, torch.tensor(ids))
    with pytest.raises(ValueError, match=r"same expert twice: token 1 selects expert 3 more than once "
                                         r"\(a token's expert ids must be distinct\)"):
        TokenHypergraph.from_ids(ids, 8)
    assert "a token's expert ids are distinct" in (REPO / "docs" / "routing.md").read_text()


def test_plan_for_a_gpu_count_that_does_not_divide_the_experts_is_refused_before_planning(tmp_path, capsys):
    """One line, before the planner (and its progress bar) starts."""
    path = _trace(tmp_path / "t.npz", _distinct_ids())
    err = _refused(capsys, "plan", "--trace", path, "--topology", "1x3", "--method", "hypergraph",
                   "--out", str(tmp_path / "p.json"), "--no-png")
    assert "'--topology' = '1x3'" in err and "divides the trace's 16 experts (3 GPUs do not)" in err, err
    assert "planning layers" not in err
