"""examples/replica_load_analysis.py: its bound over the layers' mean is a lower bound, and the
script runs end to end (stream, global choice, bounds) on a small replica plan."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from replica_cases import brute_min_cover

from c2r_comm.cli import plan_cmd
from c2r_comm.placement.metrics import dealt_source_ranks, placement_metrics
from c2r_comm.plan import PlacementPlan
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "replica_load_analysis.py"


@pytest.fixture(scope="module")
def analysis():
    spec = importlib.util.spec_from_file_location("replica_load_analysis", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_load_bound_never_exceeds_the_best_choice(analysis):
    """Toy layers whose choices are (load, GPUs) points; each layer's curve B(c) = the least GPUs at
    load <= c is exact here, so the bound must not exceed the best mix of choices whose mean load is
    within the cap (enumerated), and it must bind somewhere (above the unconstrained minimum)."""
    rng = np.random.default_rng(3)
    caps = [1.02, 1.05, 1.1, 1.2]
    binds = 0
    for _ in range(40):
        layers = [[(1.0 + rng.uniform(0, 0.3), rng.uniform(2.5, 3.5)) for _ in range(4)] for _ in range(3)]
        curves = []
        for points in layers:
            floor = min(load for load, _ in points)
            at = lambda c: min((g for load, g in points if load <= c + 1e-12), default=np.inf)  # noqa: E731
            curves.append([(c, at(c)) for c in [floor] + [c for c in caps if c > floor]]
                          + [(np.inf, min(g for _, g in points))])
        for cap in caps:
            best = min((np.mean([g for _, g in mix]) for mix in itertools.product(*layers)
                        if np.mean([load for load, _ in mix]) <= cap), default=np.inf)
            bound = max(analysis.mean_load_bound(curves, mu, cap) for mu in np.linspace(0.0, 20.0, 401))
            assert bound <= best + 1e-9
            unconstrained = np.mean([min(g for _, g in points) for points in layers])
            binds += bound > unconstrained + 1e-6
    assert binds > 0


def test_stream_signal_moves_ties_off_the_rank_the_others_load(analysis):
    """Rank 0's copies draw source 0's tokens (its own copy) and half of source 1's (a tie with rank
    2); sources 2 and 3 tie between ranks 0 and 1. Without a signal each balances its own rows (rank
    0: over 2 x the mean); with the lagged signal, from the third step on, they leave rank 0; lag < 1 is refused."""
    plan = PlacementPlan((0, 0, 1, 1, 2, 2, 3, 3), 4, ((2,), (0,), (1,), (4,)))  # e0 on {0, 1}, e1 on {0, 2}
    B = 200
    step = np.concatenate([np.full(B, 0), np.full(B, 1), np.full(2 * B, 0)])[:, None]  # sources 0, 1, 2, 3
    ids = np.concatenate([step, step])  # 4 steps of 4 x B tokens
    plain_total, plain_step = analysis.stream_loads(plan, 4, ids, B, None)
    signal_total, signal_step = analysis.stream_loads(plan, 4, ids, B, 2)
    assert plain_step > 2.0
    assert signal_total < plain_total - 0.15 and signal_step < plain_step - 0.1  # steps 0, 1: no signal yet
    with pytest.raises(ValueError, match="lag = 0 is invalid"):
        analysis.stream_loads(plan, 4, ids, B, 0)


def test_exchange_pass_moves_ties_off_the_rank_the_others_load(analysis):
    """Top-1, the stream test's step once: source 0 pins its tokens on rank 0 (its own copy), sources
    1-3 tie between rank 0 and another. Each batch balanced on its own loads rank 0 with over 2 x the
    mean; after one pass with the others' rows of the same step the ties leave rank 0."""
    plan = PlacementPlan((0, 0, 1, 1, 2, 2, 3, 3), 4, ((2,), (0,), (1,), (4,)))  # e0 on {0, 1}, e1 on {0, 2}
    B = 200
    ids = np.concatenate([np.full(B, 0), np.full(B, 1), np.full(2 * B, 0)])[:, None]
    source_T = dealt_source_ranks(len(ids), 4)
    plain = placement_metrics(plan, Topology(1, 4), ids)
    assert plain.gpu_load_max_over_mean > 2.0
    for damping in (1.0, 0.5):
        _, load = analysis.exchange_pass(plan, 4, ids, source_T, damping)
        assert load < plain.gpu_load_max_over_mean - 0.2  # 2.23 -> 2.0 (D = 1), 1.76 (D = 0.5)


def test_exchange_pass_keeps_every_cover_minimal(analysis):
    """Top-2: tokens of experts {0, 2} (both on ranks 0 and 1) cover with one GPU only when both
    choices go to the same rank; source 0 holds both, source 1's tokens {1, 3} need two GPUs. The pass
    moves whole tokens off rank 0 (D = 0.5: 2.26 -> 1.76) and never splits one: GPUs per token stays
    the brute-force minimum."""
    plan = PlacementPlan((0, 0, 1, 1, 2, 2, 3, 3), 4, ((2,), (0,), (1,), (4,)))  # e0, e2 on {0, 1}; e1 on {0, 2}
    B = 200
    ids = np.concatenate([np.tile([0, 2], (B, 1)), np.tile([1, 3], (B, 1)), np.tile([0, 2], (2 * B, 1))])
    source_T = dealt_source_ranks(len(ids), 4)
    plain = placement_metrics(plan, Topology(1, 4), ids)
    minimum = np.mean([brute_min_cover(plan, t) for t in ids.tolist()])
    assert minimum == plain.gpus_per_token == 1.25
    for damping in (1.0, 0.5):
        gpus, load = analysis.exchange_pass(plan, 4, ids, source_T, damping)
        assert gpus == minimum
    assert load < plain.gpu_load_max_over_mean - 0.2


def test_analysis_runs_on_a_small_replica_plan(tmp_path, analysis, capsys, monkeypatch):
    trace = RoutingTrace.synthetic(1200, 16, 3, num_layers=1, num_clusters=4, in_cluster=0.85, zipf_a=0.5,
                                   tokens_per_prompt=40, seed=5)
    trace.save(tmp_path / "t.npz")
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    assert plan_cmd.run(parser.parse_args(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--method",
                                           "hypergraph", "--fit-prompts", "0:20", "--eval-prompts", "20:30",
                                           "--replica-slots", "1", "--out", str(tmp_path / "p.json"),
                                           "--no-png"])) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["x", "--trace", str(tmp_path / "t.npz"), "--plan", str(tmp_path / "p.json"),
                                      "--prompts", "20:30", "--stream", "25", "--global-rounds", "4",
                                      "--bound-iters", "10", "--mean-caps", "1.05,1.2", "--copy-load-cap", "1.1",
                                      "--exchange-pass", "0.5"])
    analysis.main()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("0 |"))
    values = [float(v) for v in row.split("|")[1:]]
    assert len(values) == 14  # 4 base, 4 stream, 2 exchange pass, 4 global columns
    assert "lower bound on mean GPUs per token with the layers' mean load <= 1.05" in out
    monkeypatch.setattr(sys, "argv", ["x", "--trace", str(tmp_path / "t.npz"), "--plan", str(tmp_path / "p.json"),
                                      "--prompts", "20:30", "--layers", "3"])
    with pytest.raises(SystemExit, match=r"layers \[3\] are not in the plan"):
        analysis.main()
    monkeypatch.setattr(sys, "argv", ["x", "--trace", str(tmp_path / "t.npz"), "--plan", str(tmp_path / "p.json"),
                                      "--prompts", "20:30", "--exchange-pass", "0"])
    with pytest.raises(SystemExit, match=r"--exchange-pass 0.0 is invalid"):
        analysis.main()
