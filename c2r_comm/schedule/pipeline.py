"""The pipelined MoE layer: C token chunks whose dispatch, experts and combine overlap, forward and backward.

Forward (one thread; every exchange is asynchronous, see dispatch/transport.py):

    layout + count exchange of every chunk            C small blocking collectives, first
    send(every chunk)                                  all dispatches in flight, in chunk order
    shared expert on all tokens                        while the first dispatch moves
    for c: wait dispatch(c); experts(c); combine_start(c) (its last stage put in flight); wait combine(c-1)

so later chunks' dispatches and chunk c-1's combine move while the experts compute chunk c.

Backward mirrors it. One custom autograd Function stands for the whole pipelined layer; its
backward runs each chunk's pieces with their own `torch.autograd.backward` calls, cut at the
exchanges: every piece that communicates (the backward of combine: a dispatch of gradients; the
backward of dispatch: a combine) runs on ONE communication thread, in a fixed order — combine
backward of chunks 0..C-1, then dispatch backward of chunks 0..C-1 — the same on every rank, so
collectives never cross. The calling thread meanwhile runs what does not communicate: the shared
expert's backward, then each chunk's expert input-gradient backward as soon as its gradient has
arrived, then the experts' weight gradients of all chunks at once (deferred_wgrad.py). While the
experts run backward on chunk c, chunk c+1's gradient dispatch is in flight; chunk c's dispatch
backward starts as soon as its input gradients are known, and the last ones travel while the
weight-gradient GEMMs run.

The exchange thread is for CPU tensors (gloo), where an exchange blocks the thread that waits on
it. On a GPU the autograd engine runs a CUDA backward, this layer's included, on its device thread;
a backward started from a second thread would queue on that busy thread and never run (an H200
run hung so). There the same pieces run in the same order on the calling thread. The backward
exchanges then overlap nothing yet. Each is one autograd Function whose backward starts the
exchange and at once makes the compute stream wait for it, so every later kernel queues behind
it. Forward overlap on a GPU is unaffected: every dispatch is issued before the first expert
kernel. Backward overlap on a GPU needs a link whose backward is split into start and wait.

Chunks are views of the layer's tokens (`tensor_split`: no copies); a rank may have fewer tokens
than chunks (empty chunks still take part in every exchange) and ranks may hold different token
counts. Each chunk has its own frozen dispatch handle, made by its own layout and count exchange
and reused by its combine and backward.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from c2r_comm.dispatch import DispatchHandle, Dispatcher, ExpertBatch
from c2r_comm.experts import GroupedExperts
from c2r_comm.schedule.deferred_wgrad import DeferredWeightGrads, deferred_experts


@dataclass(frozen=True)
class ChunkGraph:
    """One chunk's forward, cut into pieces at the exchanges (detached leaves at every cut)."""

    x_leaf: torch.Tensor  # the chunk's tokens (a view of the layer's input), leaf
    weight_leaf: torch.Tensor  # its routing weights, leaf
    batch: ExpertBatch  # what dispatch delivered: its graph reaches back to the two leaves
    expert_x_leaf: torch.Tensor  # batch.x_PD cut off
    expert_weight_leaf: Optional[torch.Tensor]  # batch.weight_P cut off (None: weights applied at combine)
    expert_out: torch.Tensor  # the experts' output: graph to the expert leaves and the expert weights
    combine_in_leaf: torch.Tensor  # expert_out cut off
    out: torch.Tensor  # combine's output for the chunk: graph to combine_in_leaf (and, alltoall, weight_leaf)
    handle: DispatchHandle


@dataclass(frozen=True)
class PipelineRun:
    """A pipelined forward, kept for its backward."""

    chunks: tuple[ChunkGraph, ...]
    weight_grads: DeferredWeightGrads  # the experts' weight gradients, computed once after every chunk's
    shared_x_leaf: Optional[torch.Tensor]
    shared_out: Optional[torch.Tensor]
    out_TD: torch.Tensor


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad)


def _backward(roots: Sequence[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
    """autograd.backward over the roots that are part of a graph (others carry no gradient)."""
    pairs = [(r, g) for r, g in zip(roots, grads) if r is not None and g is not None and r.requires_grad]
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])


class ChunkPipeline:
    """Runs a dispatcher, local experts and an optional shared expert over `degree` token chunks."""

    def __init__(self, dispatcher: Dispatcher, experts: GroupedExperts, shared_expert: Optional[nn.Module],
                 degree: int, exchange_thread: Optional[bool] = None):
        """exchange_thread: run backward's exchanges on their own thread (None: where the layer's
        tensors are on the CPU; see the module doc for why not on a GPU)."""
        if degree < 1:
            raise ValueError(f"overlap degree {degree}: allowed an integer >= 1")
        self.dispatcher, self.experts, self.shared_expert, self.degree = dispatcher, experts, shared_expert, degree
        self.exchange_thread = exchange_thread

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> PipelineRun:
        """Forward; the result's out_TD is differentiable w.r.t. x_TD, topk_weight_TK and every parameter."""
        if not torch.is_grad_enabled():  # inference: no graphs to keep, no Function
            return self.run_forward(x_TD, topk_idx_TK, topk_weight_TK)
        params = [p for m in (self.experts, self.shared_expert) if m is not None for p in m.parameters()]
        holder: list[PipelineRun] = []
        out_TD = _PipelinedMoE.apply(self, holder, x_TD, topk_weight_TK, topk_idx_TK, *params)
        run = holder[0]
        return PipelineRun(run.chunks, run.weight_grads, run.shared_x_leaf, run.shared_out, out_TD)

    # ---- forward -------------------------------------------------------------------------------
    def run_forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> PipelineRun:
        disp, C = self.dispatcher, self.degree
        xs, idxs, ws = x_TD.tensor_split(C), topk_idx_TK.tensor_split(C), topk_weight_TK.tensor_split(C)
        x_leaves = [_leaf(x, x_TD.requires_grad) for x in xs]
        w_leaves = [_leaf(w, topk_weight_TK.requires_grad) for w in ws]
        routes = [disp.exchange_counts(disp.layout(x, i, w), chunk=c)
                  for c, (x, i, w) in enumerate(zip(x_leaves, idxs, w_leaves))]
        # Every chunk's dispatch in flight at once: the links stream chunk after chunk while the
        # experts work through the chunks that have arrived.
        sends = [disp.send(x, w, r) for x, w, r in zip(x_leaves, w_leaves, routes)]
        shared_x, shared_out = None, None
        if self.shared_expert is not None:  # dense work while the first dispatch is in flight
            shared_x = _leaf(x_TD, x_TD.requires_grad)
            shared_out = self.shared_expert(shared_x)
        combines, outs, chunks = [None] * C, [None] * C, []
        weight_grads = DeferredWeightGrads(self.experts)
        for c in range(C):
            batch, handle = sends[c].wait()
            sends[c] = None
            ex = _leaf(batch.x_PD, batch.x_PD.requires_grad)
            ew = None if batch.weight_P is None else _leaf(batch.weight_P, batch.weight_P.requires_grad)
            y = deferred_experts(weight_grads, ex, batch.tokens_per_expert, batch.offsets_E, ew)
            y_leaf = _leaf(y, y.requires_grad)
            # A multi-stage combine (hierarchical) gets its last, cross-node stage in flight now.
            combines[c] = disp.combine_start(y_leaf, handle, weighted=ew is not None).advance()
            if c > 0:
                outs[c - 1] = combines[c - 1].wait()
            chunks.append((x_leaves[c], w_leaves[c], batch, ex, ew, y, y_leaf, handle))
        outs[C - 1] = combines[C - 1].wait()
        graphs = tuple(ChunkGraph(*parts[:7], outs[c], parts[7]) for c, parts in enumerate(chunks))
        out_TD = torch.cat(outs) if C > 1 else outs[0]
        if shared_out is not None:
            out_TD = out_TD + shared_out
        return PipelineRun(graphs, weight_grads, shared_x, shared_out, out_TD)

    # ---- backward ------------------------------------------------------------------------------
    def run_backward(self, run: PipelineRun, grad_TD: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        grad_TD = grad_TD.contiguous()
        grads = grad_TD.tensor_split(len(run.chunks))
        on_cpu = grad_TD.device.type == "cpu"
        if self.exchange_thread and not on_cpu:
            raise ValueError("exchange_thread=True needs CPU tensors: on a GPU the layer's backward runs on the "
                             "autograd engine's device thread, and a backward started from another thread would "
                             "wait for it forever")
        if self.exchange_thread if self.exchange_thread is not None else on_cpu:
            comm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="c2r-comm-exchange")
            try:
                self._backward_pieces(run, grads, grad_TD, comm.submit)
            finally:  # on an error drop the queued exchanges; the one running ends or times out
                comm.shutdown(wait=True, cancel_futures=True)
        else:
            self._backward_pieces(run, grads, grad_TD, _run_now)
        grad_x = _gather_grads([ch.x_leaf for ch in run.chunks], run.shared_x_leaf)
        grad_w = _gather_grads([ch.weight_leaf for ch in run.chunks], None)
        return grad_x, grad_w

    @staticmethod
    def _backward_pieces(run: PipelineRun, grads: Sequence[torch.Tensor], grad_TD: torch.Tensor, submit) -> None:
        """The mirrored pipeline. `submit` runs a communicating piece: on the exchange thread (a
        future) or at once (GPU: the exchange only queues work on the communication stream)."""
        # The communicating pieces, in one fixed order: combine backward of every chunk (each fills
        # its combine_in_leaf.grad), then dispatch backward (submitted below, in chunk order).
        combine_back = [submit(_backward, [ch.out], [g]) for ch, g in zip(run.chunks, grads)]
        if run.shared_out is not None:  # local work while chunk 0's gradients travel
            _backward([run.shared_out], [grad_TD])
        dispatch_back = []
        for ch, fut in zip(run.chunks, combine_back):
            fut.result()
            _backward([ch.expert_out], [ch.combine_in_leaf.grad])
            ew = ch.expert_weight_leaf
            dispatch_back.append(submit(_backward, [ch.batch.x_PD, ch.batch.weight_P],
                                        [ch.expert_x_leaf.grad, None if ew is None else ew.grad]))
        # The experts' weight gradients of every chunk at once, while the last chunks' input
        # gradients travel back (deferred_wgrad.py).
        run.weight_grads.flush()
        for fut in dispatch_back:
            fut.result()


@dataclass(frozen=True)
class _Done:
    """A piece already run (no exchange thread): the future interface of a finished call."""

    def result(self) -> None:
        return None


def _run_now(fn, *args) -> _Done:
    fn(*args)
    return _Done()


def _gather_grads(leaves: Sequence[torch.Tensor], extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The layer input's gradient from its chunk leaves (zeros where a chunk got none) plus `extra`'s."""
    if not leaves[0].requires_grad:
        return None
    parts = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    grad = torch.cat(parts) if len(parts) > 1 else parts[0]
    if extra is not None and extra.grad is not None:
        grad = grad + extra.grad
    return grad


class _PipelinedMoE(torch.autograd.Function):
    """The whole pipelined layer as one autograd node (parameters are inputs only so that the output
    requires grad when they do; their gradients accumulate inside the chunk backward calls)."""

    @staticmethod
    def forward(ctx, pipeline: ChunkPipeline, holder: list, x_TD, topk_weight_TK, topk_idx_TK, *params):
        with torch.enable_grad():
            run = pipeline.run_forward(x_TD, topk_idx_TK, topk_weight_TK)
        ctx.pipeline, ctx.run = pipeline, run
        holder.append(run)
        return run.out_TD.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        grad_x, grad_w = ctx.pipeline.run_backward(ctx.run, grad_TD)
        ctx.run = None  # free the chunk graphs
        return (None, None, grad_x, grad_w, None) + (None,) * (len(ctx.needs_input_grad) - 5)
