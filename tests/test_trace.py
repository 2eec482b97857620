"""RoutingTrace: the shared file format, selection, batching, the synthetic generator, save/load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.routing.trace import RoutingTrace, parse_range

SHARED_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"


@pytest.fixture(scope="module")
def shared_trace():
    if not SHARED_TRACE.is_file():
        pytest.skip(f"shared trace {SHARED_TRACE} is not present")
    return RoutingTrace.load(SHARED_TRACE)


def test_shared_trace_layout(shared_trace):
    t = shared_trace
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_prompts, t.num_experts) == (94165, 26, 6, 999, 64)
    assert t.expert_ids.dtype == np.int64
    with np.load(SHARED_TRACE) as z:
        raw = z["expert_ids"]
        assert np.array_equal(t.layer(12), raw[:, 12, :])
        offs = z["prompt_offsets"]
    sub = t.select_prompts(10, 20)
    assert sub.num_prompts == 10 and sub.num_tokens == offs[20] - offs[10]
    assert np.array_equal(sub.expert_ids, raw[offs[10]:offs[20]])
    assert np.array_equal(sub.prompt_offsets, offs[10:21] - offs[10])
    last = t.select_prompts(-1, None)
    assert last.num_tokens == offs[-1] - offs[-2]
    two = t.select_layers([12, 3])
    assert np.array_equal(two.expert_ids[:, 0], raw[:, 12]) and np.array_equal(two.expert_ids[:, 1], raw[:, 3])


def test_batches_cover_every_token_in_order():
    t = RoutingTrace.synthetic(1000, 16, 2, num_layers=3, seed=2)
    blocks = list(t.batches(300))
    assert [b.shape[0] for b in blocks] == [300, 300, 300, 100]
    assert np.array_equal(np.concatenate(blocks), t.expert_ids)
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        next(t.batches(0))


def test_rank_block():
    t = RoutingTrace.synthetic(100, 8, 2, seed=0)
    assert np.array_equal(t.rank_block(0, 2, 30), t.layer(0)[60:90])
    with pytest.raises(ValueError, match="needs rows 90:120"):
        t.rank_block(0, 3, 30)
    with pytest.raises(ValueError, match="must be >= 0"):
        t.rank_block(0, -1, 30)


def test_save_load_roundtrip(tmp_path):
    t = RoutingTrace.synthetic(500, 32, 4, num_layers=2, tokens_per_prompt=37, seed=4)
    t.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(back.expert_ids, t.expert_ids)
    assert np.array_equal(back.prompt_offsets, t.prompt_offsets) and back.num_experts == 32
    # Ids above int16 must survive a save (they used to wrap).
    big = RoutingTrace(np.array([[[40000, 1]], [[3, 39999]]]), np.array([0, 2]), 40001)
    big.save(tmp_path / "big.npz")
    assert np.array_equal(RoutingTrace.load(tmp_path / "big.npz").expert_ids, big.expert_ids)


def connected_components(counts_EE: np.ndarray) -> list[set]:
    E, seen, comps = len(counts_EE), set(), []
    for s in range(E):
        if s in seen:
            continue
        comp, stack = set(), [s]
        while stack:
            e = stack.pop()
            if e not in comp:
                comp.add(e)
                stack.extend(np.flatnonzero(counts_EE[e]).tolist())
        seen |= comp
        comps.append(comp)
    return comps


def test_synthetic_clusters_and_zipf_loads():
    E, K, C = 32, 4, 4
    clean = RoutingTrace.synthetic(4000, E, K, num_layers=2, num_clusters=C, in_cluster=1.0, seed=7)
    assert (np.sort(clean.expert_ids, -1)[..., 1:] != np.sort(clean.expert_ids, -1)[..., :-1]).all()
    prof = CollaborationProfiler(2, E)
    prof.update_layers(clean.expert_ids)
    stats = prof.stats()
    for l in range(2):
        comps = connected_components(stats.counts_LEE[l])
        assert sorted(len(c) for c in comps) == [E // C] * C  # experts co-activate only inside a cluster
    assert connected_components(stats.counts_LEE[0]) != connected_components(stats.counts_LEE[1])  # per-layer shuffle
    # Clusters are shuffled, so contiguous groups of E/C experts are not the clusters.
    assert set(range(E // C)) not in connected_components(stats.counts_LEE[0])

    def load_cv(zipf_a: float) -> float:
        t = RoutingTrace.synthetic(8000, E, K, num_clusters=C, in_cluster=0.0, zipf_a=zipf_a, seed=7)
        p = CollaborationProfiler(1, E)
        p.update_layers(t.expert_ids)
        return float(p.stats().load_cv()[0])

    assert load_cv(0.0) < 0.1 < 0.5 < load_cv(1.2)
    again = RoutingTrace.synthetic(4000, E, K, num_layers=2, num_clusters=C, in_cluster=1.0, seed=7)
    assert np.array_equal(again.expert_ids, clean.expert_ids)


def test_synthetic_prompt_offsets():
    t = RoutingTrace.synthetic(130, 8, 2, tokens_per_prompt=64, seed=0)
    assert t.prompt_offsets.tolist() == [0, 64, 128, 130]
    assert RoutingTrace.synthetic(0, 8, 2).num_tokens == 0


def test_parse_range():
    assert parse_range("3:10") == (3, 10)
    assert parse_range(":5") == (None, 5)
    assert parse_range("-2:") == (-2, None)
    assert parse_range(None) == (None, None)
    for bad in ("3", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="is invalid"):
            parse_range(bad)


def test_bad_input_errors(tmp_path):
    t = RoutingTrace.synthetic(100, 8, 2, num_layers=2, seed=0)
    with pytest.raises(ValueError, match="expert ids must lie in 0..7"):
        RoutingTrace(np.full((2, 1, 2), 8), np.array([0, 2]), 8)
    with pytest.raises(ValueError, match=r"\[tokens, layers, k\]"):
        RoutingTrace(np.zeros((2, 2)), np.array([0, 2]), 8)
    with pytest.raises(ValueError, match="prompt_offsets must rise"):
        RoutingTrace(np.zeros((2, 1, 2)), np.array([0, 1]), 8)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        RoutingTrace(np.zeros((0, 1, 2)), np.array([0]), 0)
    with pytest.raises(ValueError, match="selects no prompt"):
        t.select_prompts(50, 60)
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        t.select_layers([0, 2])
    with pytest.raises(ValueError, match="at least one layer"):
        t.select_layers([])
    with pytest.raises(ValueError, match="does not exist"):
        RoutingTrace.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", other=np.zeros(2))
    with pytest.raises(ValueError, match="no 'expert_ids'"):
        RoutingTrace.load(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="divisible by num_clusters"):
        RoutingTrace.synthetic(10, 10, 2, num_clusters=4)
    with pytest.raises(ValueError, match="divisible by num_clusters"):
        RoutingTrace.synthetic(10, 8, 2, num_clusters=0)
    with pytest.raises(ValueError, match="in_cluster"):
        RoutingTrace.synthetic(10, 8, 2, in_cluster=1.5)
    with pytest.raises(ValueError, match="tokens_per_prompt"):
        RoutingTrace.synthetic(10, 8, 2, tokens_per_prompt=0)
