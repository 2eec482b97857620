"""On a CUDA machine: the MoE layer at world size 1 on NCCL, every dispatcher, against a float64
single-process reference on the CPU (fp32: the experts' loop path; bf16: the grouped-GEMM path
where the GPU has it), two micro-batches in flight on the GPU's streams, and the pipelined layer
(split backward) against the serial one, also with every collective held back on the GPU so that a
missing wait would read a receive buffer before NCCL wrote it; and no host sync outside the count
exchange (CUDA's sync detector). Skipped without CUDA
(launch/gpu_checks.sh runs it on a lent GPU)."""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from c2r_comm.config import config_from_dict
from c2r_comm.dispatch import DISPATCHERS
from c2r_comm.experts import init_expert_weights, reference_moe
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import build_moe_layer
from c2r_comm.topology import Topology

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL at world size 1)")

E, K, D, F, T, SEED = 16, 4, 128, 64, 300, 5


@pytest.fixture(scope="module")
def nccl_world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    yield build_process_groups(Topology(1, 1), timeout_s=60)
    dist.destroy_process_group()


def _config(dtype: str, degree: int = 1, shared: int = 0, hidden: int = D):
    return config_from_dict({"model": {"hidden_size": hidden, "ffn_hidden_size": F, "num_experts": E, "top_k": K,
                                       "num_shared_experts": shared},
                             "parallel": {"nodes": 1, "gpus_per_node": 1},
                             "run": {"tokens_per_rank": T, "seed": SEED, "dtype": dtype, "device": "cuda"},
                             "schedule": {"overlap_degree": degree}})


def _inputs(dtype: torch.dtype, seed: int, tokens: int = T, hidden: int = D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K, generator=g)
    grad = torch.randn(tokens, hidden, generator=g)
    return x, idx, w / w.sum(1, keepdim=True), grad


def _reference(x, idx, w, grad):
    experts = [tuple(t.double() for t in init_expert_weights(e, D, F, SEED)) for e in range(E)]
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out = reference_moe(xr, idx, wr, experts)
    (out * grad.double()).sum().backward()
    return out.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-4), ("bfloat16", 6e-2)])
def test_layer_on_cuda_matches_float64_reference(nccl_world_of_one, dispatcher, dtype, tol):
    _matches_float64_reference(nccl_world_of_one, dispatcher, dtype, tol)


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
def test_layer_with_held_back_collectives_matches_float64_reference(nccl_world_of_one, collectives_held_back,
                                                                     dispatcher):
    """Every collective late on the GPU (collectives_held_back below), against the CPU reference: a
    read of a receive buffer before its wait would not agree with it."""
    _matches_float64_reference(nccl_world_of_one, dispatcher, "float32", 2e-4)


def _matches_float64_reference(world, dispatcher: str, dtype: str, tol: float) -> None:
    layer = build_moe_layer(_config(dtype), world, torch.device("cuda"), dispatcher=dispatcher)
    x, idx, w, grad = _inputs(torch.float32, seed=1)
    xd = x.to("cuda", getattr(torch, dtype)).clone().requires_grad_()
    wd = w.cuda().clone().requires_grad_()
    out = layer.forward_routed(xd, idx.cuda(), wd).out_TD
    (out * grad.to(out)).sum().backward()
    ref_out, ref_gx, ref_gw = _reference(x, idx, w, grad)
    scale = ref_out.abs().max().item()
    assert (out.double().cpu() - ref_out).abs().max().item() <= tol * scale
    assert (xd.grad.double().cpu() - ref_gx).abs().max().item() <= tol * ref_gx.abs().max().item()
    assert (wd.grad.double().cpu() - ref_gw).abs().max().item() <= tol * ref_gw.abs().max().item()


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
def test_two_micro_batches_in_flight_on_cuda(nccl_world_of_one, dispatcher):
    """Both sends issued before either wait, combines waited in reverse order: same as blocking calls."""
    _two_micro_batches_in_flight(nccl_world_of_one, dispatcher)


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
def test_two_micro_batches_in_flight_with_held_back_collectives(nccl_world_of_one, collectives_held_back,
                                                                dispatcher):
    """The same with every collective late on the GPU (collectives_held_back below)."""
    _two_micro_batches_in_flight(nccl_world_of_one, dispatcher)


def _two_micro_batches_in_flight(world, dispatcher: str) -> None:
    layer = build_moe_layer(_config("float32"), world, torch.device("cuda"), dispatcher=dispatcher)
    disp, experts = layer.dispatcher, layer.experts
    batches = [[t.cuda() for t in _inputs(torch.float32, seed=s)] for s in (2, 3)]
    leaves = [(x.clone().requires_grad_(), idx, w.clone().requires_grad_(), g) for x, idx, w, g in batches]

    def blocking():
        outs = []
        for x, idx, w, _ in leaves:
            batch, handle = disp.dispatch(x, idx, w)
            outs.append(disp.combine(experts(batch.x_PD, batch.tokens_per_expert, batch.offsets_E), handle))
        return outs

    def in_flight():
        routes = [disp.exchange_counts(disp.layout(x, idx, w)) for x, idx, w, _ in leaves]
        pending = [disp.send(x, w, r) for (x, _, w, _), r in zip(leaves, routes)]
        done = [p.wait() for p in pending]
        starts = [disp.combine_start(experts(b.x_PD, b.tokens_per_expert, b.offsets_E), h) for b, h in done]
        return [starts[1].wait(), starts[0].wait()][::-1]

    results = []
    for run in (blocking, in_flight):
        layer.zero_grad(set_to_none=True)
        for x, _, w, _ in leaves:
            x.grad = w.grad = None
        outs = run()
        sum((o * g).sum() for o, (_, _, _, g) in zip(outs, leaves)).backward()
        results.append([o.detach() for o in outs] + [t.grad.clone() for x, _, w, _ in leaves for t in (x, w)]
                       + [p.grad.clone() for p in experts.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _pipelined_vs_serial(world, dispatcher: str, dtype: str, shared: int, steps: int, tokens: int, hidden: int):
    """Output and every gradient (accumulated over `steps` fwd+bwd of the same batch) of the layer at
    overlap_degree 1 and 2; degree 2 runs the split backward (start and wait of each reverse exchange
    on the autograd device thread; deferred weight gradients)."""
    x, idx, w, grad = _inputs(torch.float32, seed=4, tokens=tokens, hidden=hidden)
    results = []
    for degree in (1, 2):
        layer = build_moe_layer(_config(dtype, degree, shared, hidden), world, torch.device("cuda"),
                                dispatcher=dispatcher)
        xd = x.to("cuda", getattr(torch, dtype)).clone().requires_grad_()
        wd = w.cuda().clone().requires_grad_()
        for _ in range(steps):
            out = layer.forward_routed(xd, idx.cuda(), wd)
            assert len(out.handles) == degree
            (out.out_TD * grad.to(out.out_TD)).sum().backward()
        results.append([out.out_TD.detach().float(), xd.grad.float(), wd.grad.float()]
                       + [p.grad.float() for p in layer.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    return results


def _assert_each_close(got: list, want: list, tol: float) -> None:
    """Every tensor within tol x the largest magnitude of its counterpart (at least 1e-6)."""
    for a, b in zip(got, want):
        scale = max(b.abs().max().item(), 1e-6)
        assert (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_pipelined_layer_on_cuda_equals_serial(nccl_world_of_one, dispatcher, dtype, tol):
    """overlap_degree 2 (chunks; the split backward on the autograd device thread, where an exchange
    thread would hang; deferred weight gradients; bf16: grouped GEMMs) gives the serial layer's
    output and gradients on the GPU."""
    _assert_each_close(*_pipelined_vs_serial(nccl_world_of_one, dispatcher, dtype, 0, 1, T, D), tol)


@pytest.fixture
def collectives_held_back(monkeypatch):
    """Every collective is issued from a side stream that first spins the GPU for ~20 ms, so NCCL
    (which waits on the issuing stream) runs it late while the compute stream goes on. A consumer
    that read a receive buffer without waiting on the work, or a buffer freed while NCCL still
    used it, would then see stale rows."""
    from c2r_comm.dispatch.transport import Exchange
    start = Exchange._start
    cycles = 40_000_000  # about 20 ms at the 1.7-2 GHz of an H100 / H200

    def held_back(self, send, recv):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(cycles)
            return start(self, send, recv)

    monkeypatch.setattr(Exchange, "_start", held_back)


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
def test_pipelined_layer_with_held_back_collectives_equals_serial(nccl_world_of_one, collectives_held_back,
                                                                  dispatcher):
    """The stream plumbing under stress: a shared expert (its backward runs while chunk 0's gradients
    travel), two steps (buffers the allocator hands out again), 2,048 tokens of hidden 512, and
    every collective late on the GPU. Degree 2 still gives degree 1's output and gradients."""
    _assert_each_close(*_pipelined_vs_serial(nccl_world_of_one, dispatcher, "float32", 1, 2, 2048, 512), 1e-5)


@pytest.mark.parametrize("dispatcher", sorted(DISPATCHERS))
@pytest.mark.parametrize("dtype,degree", [("float32", 1), ("bfloat16", 1), ("bfloat16", 2)])
def test_only_the_count_exchange_syncs_the_host_on_cuda(nccl_world_of_one, monkeypatch, dispatcher, dtype, degree):
    """CUDA's own sync detector (torch.cuda.set_sync_debug_mode "error": any .item(), D2H copy,
    nonzero, ... raises) over a layer step, forward and backward, except inside the count exchange:
    the GPU's truth for what tests/test_host_syncs.py checks by operator name on the CPU."""
    import c2r_comm.dispatch.base as base

    layer = build_moe_layer(_config(dtype, degree, shared=1), nccl_world_of_one, torch.device("cuda"),
                            dispatcher=dispatcher)
    x, idx, w, grad = [t.cuda() for t in _inputs(torch.float32, seed=4)]
    xd, wd = x.to(getattr(torch, dtype)).requires_grad_(), w.clone().requires_grad_()
    counted = base.exchange_counts

    def the_one_sync(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return counted(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(2)

    monkeypatch.setattr(base, "exchange_counts", the_one_sync)
    for step in range(2):  # the first step may build cached tables
        torch.cuda.set_sync_debug_mode(2 if step else 0)
        try:
            out = layer.forward_routed(xd, idx, wd).out_TD
            (out * grad.to(out)).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(xd.grad).all()
