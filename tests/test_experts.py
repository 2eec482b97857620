"""GroupedExperts: loop and grouped-GEMM paths against a float64 per-expert reference; bench-experts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2r_comm import experts as experts_mod
from c2r_comm.bench.experts_bench import ExpertsBenchConfig, run_experts_bench, split_rows
from c2r_comm.experts import (GroupedExperts, expert_offsets, grouped_mm_available, grouped_mm_op,
                              grouped_mm_shapes_ok, grouped_swiglu, init_expert_weights, looped_swiglu, swiglu)

REPO = Path(__file__).resolve().parents[1]
IDS, D, FF, SEED = (5, 2, 7, 0), 16, 24, 3
SPLITS = {
    "mixed_with_empty": (3, 0, 6, 0),
    "all_in_one": (0, 0, 9, 0),
    "zero_rows": (0, 0, 0, 0),
    "all_nonempty": (2, 5, 1, 4),
}


def _reference(x_PD: torch.Tensor, counts, weight_dtype=torch.float64):
    """Separate float64 leaf weights per expert (rounded to weight_dtype first), one SwiGLU per expert:
    output, weight grads, input grad."""
    ws = [tuple(w.double().requires_grad_() for w in init_expert_weights(e, D, FF, SEED, weight_dtype)) for e in IDS]
    x = x_PD.detach().double().requires_grad_()
    out = torch.cat([swiglu(c, *w) for c, w in zip(torch.split(x, list(counts)), ws)])
    out.backward(_grad_out(out))
    return out.detach(), [torch.stack([w[i].grad for w in ws]) for i in range(3)], x.grad


def _grad_out(out_PD: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(out_PD.shape, generator=g, dtype=torch.float64).to(out_PD.device, out_PD.dtype)


def _run(experts: GroupedExperts, x_PD: torch.Tensor, counts, offsets_E=None):
    x = x_PD.detach().clone().requires_grad_()
    out = experts(x, counts, offsets_E)
    out.backward(_grad_out(out))
    return out.detach(), [w.grad for w in (experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD)], x.grad


def _rows(counts, dtype=torch.float64):
    return torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _assert_same(got, want, **tol):
    out, grads, x_grad = got
    torch.testing.assert_close(out.double(), want[0].double(), **tol)
    assert all(g is not None for g in grads), "every weight gets a gradient, empty experts included"
    for g, w in zip(grads, want[1]):
        torch.testing.assert_close(g.double(), w.double(), **tol)
    torch.testing.assert_close(x_grad.double(), want[2].double(), **tol)


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_loop_path_equals_float64_per_expert_reference(split):
    counts = SPLITS[split]
    x = _rows(counts)
    experts = GroupedExperts(IDS, D, FF, SEED, dtype=torch.float64)
    assert not experts.grouped_mm_path()
    _assert_same(_run(experts, x, counts), _reference(x, counts), rtol=1e-12, atol=1e-12)
    if sum(counts):  # empty experts' weights get exactly zero
        for g in _run(GroupedExperts(IDS, D, FF, SEED, dtype=torch.float64), x, counts)[1]:
            assert all(g[i].abs().max() == 0 for i, n in enumerate(counts) if n == 0)


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_offsets_path_gives_the_same_result(split):
    counts = SPLITS[split]
    x = _rows(counts, torch.float32)
    offsets_E = expert_offsets(torch.tensor(counts))
    want = _run(GroupedExperts(IDS, D, FF, SEED), x, counts)
    _assert_same(_run(GroupedExperts(IDS, D, FF, SEED), x, counts, offsets_E), want, rtol=0, atol=0)


def test_loop_path_is_one_autograd_node_with_no_per_expert_select_or_unbind():
    """The loop path's backward writes each expert's weight gradient into the stacked gradient: no
    SelectBackward per expert (zero-fill of the whole gradient each) and no UnbindBackward (a stack
    copy of all of them)."""
    counts = SPLITS["mixed_with_empty"]
    out = GroupedExperts(IDS, D, FF, SEED)(_rows(counts, torch.float32), counts)
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert names.count("_LoopSwiGLUBackward") == 1
    assert not any(n.startswith(("SelectBackward", "UnbindBackward")) for n in names)


def test_expert_offsets_are_int32_cumulative_ends():
    off = expert_offsets(torch.tensor([3, 0, 5, 0]))
    assert off.dtype == torch.int32 and off.tolist() == [3, 3, 8, 8]
    assert expert_offsets(torch.tensor([0, 0], dtype=torch.int32)).tolist() == [0, 0]
    assert expert_offsets(torch.zeros(0, dtype=torch.int64)).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grouped_mm_is_not_the_default_on_cpu(dtype):
    assert grouped_mm_available("cpu", dtype) is False
    assert grouped_mm_available(torch.device("cpu"), dtype) is False
    if not torch.cuda.is_available():
        assert grouped_mm_available("cuda", torch.bfloat16) is False


def test_forward_falls_back_to_the_loop_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("grouped path taken")
    monkeypatch.setattr(experts_mod, "grouped_swiglu", fail)
    counts = SPLITS["all_nonempty"]
    x = _rows(counts, torch.float32)
    experts = GroupedExperts(IDS, D, FF, SEED)
    got = _run(experts, x, counts, expert_offsets(torch.tensor(counts)))
    assert experts.grouped_mm_path() is False
    _assert_same(got, _reference(x, counts), rtol=1e-4, atol=1e-5)


def test_grouped_mm_shape_rule_is_16_byte_rows():
    assert grouped_mm_shapes_ok(512, 256, torch.float32)
    assert grouped_mm_shapes_ok(2048, 1408, torch.bfloat16)
    assert not grouped_mm_shapes_ok(6, 8, torch.float32)
    assert not grouped_mm_shapes_ok(8, 12, torch.bfloat16)
    with pytest.raises(ValueError, match="16 bytes"):
        GroupedExperts(IDS, 6, 8, use_grouped_mm=True)


def test_bad_offsets_are_refused():
    counts = SPLITS["all_nonempty"]
    experts = GroupedExperts(IDS, D, FF, SEED)
    with pytest.raises(ValueError, match="int32"):
        experts(_rows(counts, torch.float32), counts, torch.tensor([2, 7, 8, 12]))  # int64
    with pytest.raises(ValueError, match="does not match"):
        experts(_rows(counts, torch.float32), (1, 1, 1, 1))


def _cpu_grouped_mm_takes(dtype) -> bool:
    op = grouped_mm_op()
    if op is None:
        return False
    try:
        op(torch.zeros(4, 8, dtype=dtype), torch.zeros(2, 8, 8, dtype=dtype),
           offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_grouped_mm_takes(torch.float32), reason="this torch has no fp32 grouped_mm on CPU")
@pytest.mark.parametrize("split", ["mixed_with_empty", "all_in_one", "all_nonempty"])
def test_grouped_path_equals_loop_path_on_cpu(split):
    counts = SPLITS[split]
    x = _rows(counts, torch.float32)
    ws = [w.detach().requires_grad_() for w in GroupedExperts(IDS, D, FF, SEED).parameters()]

    def run(fn):
        for w in ws:
            w.grad = None
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.backward(_grad_out(out))
        return out.detach(), [w.grad.clone() for w in ws], xx.grad

    got = run(lambda xx: grouped_swiglu(xx, *ws, expert_offsets(torch.tensor(counts))))
    _assert_same(got, run(lambda xx: looped_swiglu(xx, counts, *ws)), rtol=1e-5, atol=1e-5)
    _assert_same(got, _reference(x, counts), rtol=1e-4, atol=1e-5)
    # Forced through the module too, with a broadcast output gradient (out.sum()).
    experts = GroupedExperts(IDS, D, FF, SEED, use_grouped_mm=True)
    assert experts.grouped_mm_path()
    experts(x, counts).sum().backward()
    assert all(w.grad is not None for w in experts.parameters())


@pytest.mark.skipif(not grouped_mm_available("cuda", torch.bfloat16), reason="needs a GPU with a fused bf16 grouped_mm")
@pytest.mark.parametrize("split", ["mixed_with_empty", "all_in_one", "all_nonempty"])
def test_grouped_path_is_the_default_on_gpu_and_matches_the_reference(split):
    counts = SPLITS[split]
    x = _rows(counts, torch.bfloat16).cuda()
    experts = GroupedExperts(IDS, D, FF, SEED, dtype=torch.bfloat16, device="cuda")
    assert experts.grouped_mm_path()
    got = _run(experts, x, counts, expert_offsets(torch.tensor(counts, device="cuda")))
    want = _reference(x.cpu(), counts, torch.bfloat16)
    _assert_same(tuple(t.cpu() if torch.is_tensor(t) else [g.cpu() for g in t] for t in got), want,
                 rtol=3e-2, atol=3e-2)


def test_split_rows_is_seeded_and_complete():
    counts = split_rows(4096, 16, seed=0)
    assert len(counts) == 16 and sum(counts) == 4096 and counts == split_rows(4096, 16, seed=0)
    assert counts != split_rows(4096, 16, seed=1)
    assert split_rows(0, 3, seed=0) == (0, 0, 0)


def test_bench_measures_every_implementation_on_the_same_rows():
    res = run_experts_bench(ExpertsBenchConfig(num_experts=3, hidden_size=8, ffn_hidden_size=12, rows=20, iters=2,
                                               warmup=0))
    names = [r.name for r in res.results]
    assert names[:2] == ["grouped_experts", "per_expert_params"] and "stacked_index" in names
    assert set(names) | set(res.skipped) >= {"grouped_experts", "per_expert_params", "grouped_mm", "stacked_index"}
    assert all(r.max_abs_diff < 1e-5 and r.timing.median_ms > 0 for r in res.results)
    assert res.ratio("per_expert_params") == 1.0 and sum(res.tokens_per_expert) == 20
    with pytest.raises(ValueError, match="dtype"):
        run_experts_bench(ExpertsBenchConfig(dtype="int8"))


def test_bench_chunked_rows_and_the_pipelines_deferred_weight_gradients():
    """--chunks: every implementation runs the rows as chunks (outputs in the original order), and
    deferred_wgrad (the pipelined layer's experts) joins them, on the same rows and weights."""
    res = run_experts_bench(ExpertsBenchConfig(num_experts=3, hidden_size=8, ffn_hidden_size=12, rows=20, iters=2,
                                               warmup=0, chunks=3, dtype="float64"))
    names = {r.name for r in res.results}
    assert {"grouped_experts", "per_expert_params", "deferred_wgrad"} <= names
    assert all(r.max_abs_diff < 1e-12 for r in res.results)
    with pytest.raises(ValueError, match="chunks"):
        run_experts_bench(ExpertsBenchConfig(chunks=0))


def test_bench_experts_command_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "experts.json"
    cmd = [sys.executable, "-m", "c2r_comm", "bench-experts", "--iters", "1", "--warmup", "0", "--rows", "64",
           "--num-experts", "4", "--hidden-size", "32", "--ffn-hidden-size", "48", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| experts | path | fwd+bwd ms p50 (p10-p90) |" in proc.stdout
    assert "| grouped_experts | loop |" in proc.stdout and "| per_expert_params | loop |" in proc.stdout
    assert "grouped_experts / per_expert_params = " in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["config"]["rows"] == 64 and rec["config"]["dtype"] == "float32" and rec["threads"] == 1
    assert sum(rec["tokens_per_expert"]) == 64 and len(rec["tokens_per_expert"]) == 4
    by = {r["name"]: r for r in rec["results"]}
    assert {"grouped_experts", "per_expert_params", "stacked_index"} <= set(by)
    for r in by.values():
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["path"] in ("loop", "grouped_mm")
    assert rec["ratios"]["grouped_experts/per_expert_params"] == pytest.approx(
        by["grouped_experts"]["median_ms"] / by["per_expert_params"]["median_ms"])
    assert "stacked_index/per_expert_params" in rec["ratios"]


def test_bench_experts_command_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "c2r_comm", "bench-experts", "--device", "cuda", "--iters", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.parametrize("grouped", [False, True])
def test_weight_per_row_scales_outputs_and_gets_its_gradient(grouped):
    """weight_P multiplies each output row (applied to the activation) with the right gradients."""
    if grouped and grouped_mm_op() is None:
        pytest.skip("this torch has no grouped_mm")
    counts = SPLITS["mixed_with_empty"]
    x = _rows(counts, torch.float32)
    w = torch.rand(x.shape[0], requires_grad=True)
    experts = GroupedExperts(IDS, D, FF, SEED, use_grouped_mm=grouped)
    ref = GroupedExperts(IDS, D, FF, SEED, use_grouped_mm=False)
    g = torch.randn(x.shape[0], D)
    out = experts(x, counts, expert_offsets(torch.tensor(counts)), w)
    (out * g).sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    want = ref(x, counts) * w_ref.unsqueeze(1)
    (want * g).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(experts.w_down_LFD.grad, ref.w_down_LFD.grad, rtol=1e-4, atol=1e-4)
