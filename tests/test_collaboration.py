"""Collaboration profiler: brute-force counts, metrics, rank merging, the shared trace, the CLI."""
from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from c2r_comm.cli import profile_cmd
from c2r_comm.config import ConfigError
from c2r_comm.plan import PlacementPlan, distinct_per_token, expert_to_node
from c2r_comm.routing.collaboration import CollaborationProfiler, CollaborationStats
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology
from ranks import run_ranks

SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"


def random_ids(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])


def brute_force(ids_TK: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    counts, loads = np.zeros((E, E), dtype=np.int64), np.zeros(E, dtype=np.int64)
    for row in ids_TK.tolist():
        for e in row:
            loads[e] += 1
        for i, j in itertools.permutations(row, 2):
            counts[i, j] += 1
    return counts, loads


def test_counts_equal_brute_force():
    E, K = 10, 3
    prof = CollaborationProfiler(2, E)
    batches = [[random_ids(37, E, K, seed=s), random_ids(11, E, K, seed=s + 100)] for s in range(3)]
    for b0, b1 in batches:
        prof.update(0, b0)
        prof.update(1, b1)
    prof.update(1, torch.zeros(0, K, dtype=torch.long))  # an empty batch is fine
    stats = prof.stats()
    for l in range(2):
        ids = torch.cat([b[l] for b in batches]).numpy()
        counts, loads = brute_force(ids, E)
        assert np.array_equal(stats.counts_LEE[l], counts)
        assert np.array_equal(stats.loads_LE[l], loads)
        assert stats.tokens_L[l] == len(ids)
    assert stats.top_k == K and (np.diagonal(stats.counts_LEE, axis1=1, axis2=2) == 0).all()


def test_collaborators_exclude_self_and_break_ties_by_id():
    counts = np.array([[0, 3, 3, 1, 0],
                       [3, 0, 0, 5, 0],
                       [3, 0, 0, 0, 0],
                       [1, 5, 0, 0, 2],
                       [0, 0, 0, 2, 0]], dtype=np.int64)[None]
    stats = CollaborationStats(counts, np.ones((1, 5)), np.array([10]), top_k=2)
    lists = stats.collaborators(4)[0]
    assert lists.tolist() == [[1, 2, 3, 4], [3, 0, 2, 4], [0, 1, 3, 4], [1, 4, 0, 2], [3, 0, 1, 2]]
    assert stats.collaborators(2)[0].tolist() == lists[:, :2].tolist()
    for bad in (0, 5):
        with pytest.raises(ConfigError, match=f"'routing.top_t' = {bad} is invalid"):
            stats.collaborators(bad)


def test_breadth_entropy_and_load_cv():
    E = 6
    counts = np.zeros((1, E, E), dtype=np.int64)
    counts[0, 0, 1:] = counts[0, 1:, 0] = 5  # expert 0: five equal partners
    counts[0, 1, 2] = counts[0, 2, 1] = 95  # expert 1: one dominant partner besides 0
    loads = np.array([[10, 20, 30, 40, 0, 20]])
    stats = CollaborationStats(counts, loads, np.array([40]), top_k=3)
    b = stats.breadth(0.8)[0]
    assert b[0] == 4  # 4 of 5 equal partners cover exactly 80%
    assert b[1] == 1  # 95 of 100
    assert stats.breadth(1.0)[0][0] == 5
    ent = stats.partner_entropy()[0]
    assert ent[0] == pytest.approx(math.log2(5))
    assert ent[3] == pytest.approx(0.0)  # only partner is 0
    assert stats.load_cv()[0] == pytest.approx(loads.std() / loads.mean())
    empty = CollaborationStats(np.zeros((1, 4, 4)), np.zeros((1, 4)), np.zeros(1), top_k=2)
    assert np.isnan(empty.load_cv()[0]) and empty.breadth()[0].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="coverage"):
        stats.breadth(0.0)


def test_distinct_groups_and_save_load(tmp_path):
    E, K, topo = 16, 4, Topology(2, 2)
    plan = PlacementPlan.random(E, topo.world_size, seed=3)
    prof = CollaborationProfiler(1, E, plan=plan, topology=topo)
    ids = random_ids(300, E, K, seed=9)
    prof.update(0, ids[:123])
    prof.update(0, ids[123:])
    stats = prof.stats()
    gpus = distinct_per_token(np.asarray(plan.expert_to_rank), ids.numpy()).mean()
    nodes = distinct_per_token(expert_to_node(plan, topo), ids.numpy()).mean()
    assert stats.expected_gpus_per_token()[0] == pytest.approx(gpus)
    assert stats.expected_nodes_per_token()[0] == pytest.approx(nodes)
    stats.save(tmp_path / "s.npz")
    back = CollaborationStats.load(tmp_path / "s.npz")
    for name in ("counts_LEE", "loads_LE", "tokens_L", "gpu_sum_L", "node_sum_L", "expert_to_rank", "layer_ids"):
        assert np.array_equal(getattr(back, name), getattr(stats, name)), name
    assert back.top_k == K and back.gpus_per_node == 2
    with pytest.raises(ValueError, match="needs a placement plan"):
        CollaborationStats(stats.counts_LEE, stats.loads_LE, stats.tokens_L, K).expected_gpus_per_token()


def test_profiler_rejects_bad_input():
    prof = CollaborationProfiler(2, 8)
    with pytest.raises(ValueError, match=r"0\.\.7, found 0\.\.8"):
        prof.update(0, torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="same expert twice"):
        prof.update(0, torch.tensor([[3, 3]]))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        prof.update(2, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[tokens, k\]"):
        prof.update(0, torch.tensor([0, 1]))
    prof.update(0, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="k = 3 but earlier updates had k = 2"):
        prof.update(0, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="layer 5 was not profiled"):
        prof.stats().row_of_layer(5)
    with pytest.raises(ValueError, match="distinct layer indices"):
        CollaborationStats(np.zeros((2, 4, 4)), np.zeros((2, 4)), np.zeros(2), 2, layer_ids=np.array([3, 3]))


# ---- merging across gloo ranks --------------------------------------------------------------
def merge_worker(rank: int, world: int, E: int, K: int) -> dict:
    topo = Topology(1, 4)
    prof = CollaborationProfiler(2, E, plan=PlacementPlan.contiguous(E, 4), topology=topo)
    for l in range(2):
        prof.update(l, random_ids(20 + 7 * rank, E, K, seed=1000 * l + rank))
    prof.all_reduce()
    s = prof.stats()
    return {"counts": s.counts_LEE, "loads": s.loads_LE, "tokens": s.tokens_L, "gpus": s.gpu_sum_L,
            "nodes": s.node_sum_L}


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_equals_single_process(world):
    E, K = 8, 3
    results = run_ranks(world, merge_worker, E, K)
    prof = CollaborationProfiler(2, E, plan=PlacementPlan.contiguous(E, 4), topology=Topology(1, 4))
    for rank in range(world):
        for l in range(2):
            prof.update(l, random_ids(20 + 7 * rank, E, K, seed=1000 * l + rank))
    ref = prof.stats()
    for r in results:
        assert np.array_equal(r["counts"], ref.counts_LEE)
        assert np.array_equal(r["loads"], ref.loads_LE)
        assert np.array_equal(r["tokens"], ref.tokens_L)
        assert np.array_equal(r["gpus"], ref.gpu_sum_L) and np.array_equal(r["nodes"], ref.node_sum_L)


# ---- the shared DeepSeek-V2-Lite trace ------------------------------------------------------
@pytest.fixture(scope="module")
def shared_trace():
    if not SHARED_TRACE.is_file():
        pytest.skip(f"shared trace {SHARED_TRACE} is not present")
    return RoutingTrace.load(SHARED_TRACE)


@pytest.mark.parametrize("gpus,expected", [(8, 4.55), (4, 3.29)])
def test_shared_trace_gpus_per_token(shared_trace, gpus, expected):
    topo = Topology(1, gpus)
    prof = CollaborationProfiler(1, 64, plan=PlacementPlan.contiguous(64, gpus), topology=topo)
    for block in shared_trace.select_layers([12]).batches(20000):
        prof.update_layers(block)
    stats = prof.stats()
    assert stats.tokens_L[0] == 94165
    assert stats.expected_gpus_per_token()[0] == pytest.approx(expected, abs=0.02)


def run_profile(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    profile_cmd.add_arguments(parser)
    return profile_cmd.run(parser.parse_args(argv))


def test_cli_on_shared_trace(shared_trace, tmp_path, capsys):
    out = tmp_path / "stats.npz"
    assert run_profile(["--trace", str(SHARED_TRACE), "--layers", "11:13", "--prompts", "0:500",
                        "--topology", "2x4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("11 ", "12 "))]
    assert [r[0] for r in rows] == ["11", "12"] and len(rows[0]) == 7  # with E[nodes/tok] for 2 nodes
    stats = CollaborationStats.load(out)
    assert stats.layer_ids.tolist() == [11, 12]
    sub = shared_trace.select_prompts(0, 500)
    ids = sub.layer(12)
    assert stats.tokens_L[1] == len(ids)
    assert float(rows[1][5]) == pytest.approx(distinct_per_token(np.arange(64) // 8, ids).mean(), abs=1e-3)


def test_cli_synthetic_heatmap_and_errors(tmp_path, capsys):
    trace = RoutingTrace.synthetic(2000, 16, 4, num_layers=2, num_clusters=4, seed=1)
    trace.save(tmp_path / "t.npz")
    pytest.importorskip("matplotlib")
    png = tmp_path / "h.png"
    assert run_profile(["--trace", str(tmp_path / "t.npz"), "--topology", "1x4", "--heatmap", str(png),
                        "--heatmap-layer", "1"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="do not split 16 experts"):
        run_profile(["--trace", str(tmp_path / "t.npz"), "--topology", "1x3"])
    with pytest.raises(ValueError, match="--heatmap-layer 1 was not profiled"):
        run_profile(["--trace", str(tmp_path / "t.npz"), "--layers", "0", "--heatmap", str(png),
                     "--heatmap-layer", "1"])
    with pytest.raises(ValueError, match="--layers 'x' is invalid"):
        run_profile(["--trace", str(tmp_path / "t.npz"), "--layers", "x"])
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        run_profile(["--trace", str(tmp_path / "t.npz"), "--layers", "5"])
