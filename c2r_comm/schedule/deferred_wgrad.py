"""Local experts for the pipelined layer: input gradients per chunk, weight gradients once per layer.

In a pipelined backward each chunk's expert backward holds up that chunk's dispatch backward (the
exchange of its input gradients). Its weight gradients are not needed by anyone until the layer's
backward ends, and per chunk they are expensive: every chunk writes (and accumulates) a full
[L, D, F] gradient per projection whatever its row count (on a CPU, 16 experts of 2,048 x 256 with
12 rows each per chunk: the chunked backward took 3.2x the serial one at 4 chunks). So, as Lancet
does, the chunk backward here computes only the input gradients (x and the routing weight) and
keeps what the weight gradients need; `DeferredWeightGrads.flush()` then computes them for all
chunks at once (one GEMM per expert and projection over every chunk's rows), while the dispatch
backward exchanges are in flight (waited on after it), and adds them to the parameters' `.grad`.

SwiGLU per expert (rows x, weights Wg, Wu [D, F], Wd [F, D], optional row scale s):
  hg = x Wg, hu = x Wu, a = silu(hg) * hu, y = (a * s) Wd
Backward with gy: g_as = gy Wd^T, g_a = g_as * s, g_s = sum_f g_as * a,
  g_hu = g_a * silu(hg), g_hg = g_a * hu * silu'(hg), gx = g_hg Wg^T + g_hu Wu^T;
  deferred: gWd = (a * s)^T gy, gWg = x^T g_hg, gWu = x^T g_hu.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from c2r_comm.experts import (GroupedExperts, SwiGLUSaved, per_expert_outer, swiglu_rows_backward,
                               swiglu_rows_forward)


class DeferredWeightGrads:
    """Weight-gradient inputs of every chunk of one pipelined backward; `flush()` turns them into
    the experts' weight gradients, added to `.grad` directly. Autograd's AccumulateGrad does not run
    for them, so hooks registered with register_post_accumulate_grad_hook on the expert weights do
    not fire (gradient hooks of data-parallel wrappers see the shared expert and router weights but
    not these: reduce expert gradients after backward)."""

    def __init__(self, experts: GroupedExperts):
        self.experts = experts
        self._chunks: list[tuple[tuple[torch.Tensor, ...], tuple[int, ...], Optional[torch.Tensor]]] = []

    def add(self, tensors: tuple[torch.Tensor, ...], counts: tuple[int, ...], offsets_E: Optional[torch.Tensor]) -> None:
        """One chunk's (x, a*s, gy, g_hg, g_hu), rows grouped by expert with `counts` rows each."""
        self._chunks.append((tuple(t.detach() for t in tensors), counts, offsets_E))

    @torch.no_grad()
    def flush(self) -> None:
        """One GEMM per expert and projection over all chunks' rows (rows regrouped by expert: one
        cat of views per tensor, no index built on the host)."""
        if not self._chunks:
            return
        ex = self.experts
        L = ex.num_local_experts
        counts = [sum(ch[1][e] for ch in self._chunks) for e in range(L)]
        chunks, self._chunks = self._chunks, []
        pieces = [[t.split(list(ch[1])) for t in ch[0]] for ch in chunks]  # chunk -> tensor -> expert
        offsets_all = [ch[2] for ch in chunks]
        del chunks
        rows = []
        for i in range(5):  # regroup one tensor at a time, dropping the chunks' copies as we go
            rows.append(torch.cat([pieces[c][i][e] for e in range(L) for c in range(len(pieces))]))
            for c in range(len(pieces)):
                pieces[c][i] = None
        x, a_s, gy, g_hg, g_hu = rows
        del rows, pieces
        grouped = ex.grouped_mm_path() and x.shape[0] > 0 and x.dtype == ex.w_gate_LDF.dtype
        offsets = None
        if grouped:  # the chunks' end offsets add up to those of the summed counts (on the device)
            offsets = sum(offsets_all) if all(o is not None for o in offsets_all) else \
                torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        grads = (per_expert_outer(x, g_hg, counts, offsets, grouped),
                 per_expert_outer(x, g_hu, counts, offsets, grouped),
                 per_expert_outer(a_s, gy, counts, offsets, grouped))
        for p, g in zip((ex.w_gate_LDF, ex.w_up_LDF, ex.w_down_LFD), grads):
            if p.requires_grad:
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)


class DeferredSwiGLU(torch.autograd.Function):
    """GroupedExperts' forward whose backward gives input gradients now and weight gradients later."""

    @staticmethod
    def forward(ctx, sink: DeferredWeightGrads, counts: tuple[int, ...], offsets_E: Optional[torch.Tensor],
                x_PD: torch.Tensor, weight_P: Optional[torch.Tensor], *weights: torch.Tensor) -> torch.Tensor:
        ex = sink.experts
        w_gate, w_up, w_down = weights
        grouped = ex.grouped_mm_path() and x_PD.shape[0] > 0 and x_PD.dtype == w_gate.dtype
        if grouped:
            x_PD = x_PD.contiguous()
            if offsets_E is None:
                offsets_E = torch.tensor(counts, device=x_PD.device).cumsum(0).to(torch.int32)
        y, saved = swiglu_rows_forward(x_PD, weight_P, w_gate, w_up, w_down, counts, offsets_E, grouped)
        ctx.sink, ctx.counts, ctx.offsets, ctx.grouped = sink, counts, offsets_E, grouped
        ctx.has_weight = weight_P is not None
        ctx.save_for_backward(saved.x, saved.hg, saved.hu, saved.a, saved.a_s,
                              weight_P if weight_P is not None else x_PD.new_zeros(0), w_gate, w_up, w_down)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy_PD: torch.Tensor):
        x, hg, hu, a, a_s, weight_P, w_gate, w_up, w_down = ctx.saved_tensors
        counts, offsets, grouped = ctx.counts, ctx.offsets, ctx.grouped
        gy_PD = gy_PD.contiguous()
        gx, g_weight, g_hg, g_hu = swiglu_rows_backward(SwiGLUSaved(x, hg, hu, a, a_s), gy_PD,
                                                        weight_P if ctx.has_weight else None, w_gate, w_up, w_down,
                                                        counts, offsets, grouped)
        ctx.sink.add((x, a_s, gy_PD, g_hg, g_hu), counts, offsets)
        return None, None, None, gx, g_weight, None, None, None


def deferred_experts(sink: DeferredWeightGrads, x_PD: torch.Tensor, tokens_per_expert: Sequence[int],
                     offsets_E: Optional[torch.Tensor], weight_P: Optional[torch.Tensor]) -> torch.Tensor:
    """GroupedExperts(x_PD, ...) with the weight gradients going to `sink` (see module doc)."""
    ex = sink.experts
    counts = tuple(int(n) for n in tokens_per_expert)
    if len(counts) != ex.num_local_experts or sum(counts) != x_PD.shape[0]:
        raise ValueError(f"tokens_per_expert {list(counts)} does not match {ex.num_local_experts} local experts "
                         f"and {x_PD.shape[0]} rows")
    return DeferredSwiGLU.apply(sink, counts, offsets_E, x_PD, weight_P, ex.w_gate_LDF, ex.w_up_LDF, ex.w_down_LFD)
