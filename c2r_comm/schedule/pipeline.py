"""The pipelined MoE layer: C token chunks whose dispatch, experts and combine overlap, forward and backward.

Forward (one thread; every exchange is asynchronous, see dispatch/transport.py):

    layout + count exchange of every chunk            C small blocking collectives, first
    send(every chunk)                                  all dispatches in flight, in chunk order
    shared expert on all tokens                        while the first dispatch moves
    for c: wait dispatch(c); experts(c); combine_start(c) (its last stage put in flight); wait combine(c-1)

so later chunks' dispatches and chunk c-1's combine move while the experts compute chunk c.

Backward mirrors it. One custom autograd Function stands for the whole pipelined layer; its
backward runs each chunk's pieces with their own backward calls, cut at the exchanges. The pieces
that communicate (the backward of combine: a dispatch of gradients; the backward of dispatch: a
combine) start their exchanges in one fixed order, the same on every rank: combine backward of
chunks 0..C-1, then dispatch backward of chunks 0..C-1. In between runs what does not
communicate: the shared expert's backward, each chunk's expert input-gradient backward as soon as
its gradient has arrived, then the experts' weight gradients of all chunks at once
(deferred_wgrad.py). While the experts run backward on chunk c, later chunks' gradient dispatches
are in flight; chunk c's dispatch backward starts as soon as its input gradients are known; they all
travel while the weight-gradient GEMMs run and are waited on after them.

Two ways to run it (`exchange_thread`):
  * split (on a GPU; on the CPU with exchange_thread=False): forward passes a transport.LinkTape
    to every send and combine, which cuts their graphs at the exchanges, and backward runs each
    communicating piece as start and wait (transport.backward_through). On a GPU a start only
    queues the collective on the communication stream and a wait makes the compute stream wait for
    it, so the expert kernels issued between them run while the bytes move. A hierarchical piece
    has two exchanges: up front only the first stage of each chunk's combine backward (the
    cross-node one) starts; its node-local stage starts when chunk c is waited on, after chunk
    c-1's dispatch backward has started, and a dispatch backward waits its node-local stage before
    it starts the cross-node one (advance()). The order is still the program's, the same on every rank.
  * exchange thread (the CPU default): each communicating piece runs whole (autograd, packing,
    the blocking exchange) on one extra thread, so on gloo its CPU work also runs beside the
    experts (emulated 2x2 on 2 cores: even with split at 0.1 Gbit/s, its backward about 3 %
    shorter at 0.2 Gbit/s; docs/benchmarks.md, "Split backward").
    Not on a GPU: there the autograd engine runs the layer's backward on its device thread, and a
    backward started from another thread would queue behind it and never run (an H200 run hung so).

Chunks are views of the layer's tokens (`tensor_split`: no copies); a rank may have fewer tokens
than chunks (empty chunks still take part in every exchange) and ranks may hold different token
counts. Each chunk has its own frozen dispatch handle, made by its own layout and count exchange
and reused by its combine and backward.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from c2r_comm.dispatch import DispatchHandle, Dispatcher, ExpertBatch
from c2r_comm.dispatch.transport import LinkTape, backward_from, backward_through
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
    # Split backward (no exchange thread): the dispatch's and the combine's graphs cut at their
    # exchanges (transport.LinkTape); None: whole pieces, run on the exchange thread.
    dispatch_tape: Optional[LinkTape] = None
    combine_tape: Optional[LinkTape] = None


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
    def uses_exchange_thread(self, device: torch.device) -> bool:
        """Backward's exchanges on their own thread (CPU default), else split into start and wait."""
        return self.exchange_thread if self.exchange_thread is not None else device.type == "cpu"

    def run_forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> PipelineRun:
        disp, C = self.dispatcher, self.degree
        if self.exchange_thread and x_TD.device.type != "cpu":  # the same on every rank: raised before any collective
            raise ValueError("exchange_thread=True needs CPU tensors: on a GPU the layer's backward runs on the "
                             "autograd engine's device thread, and a backward started from another thread would "
                             "wait for it forever")
        split = torch.is_grad_enabled() and not self.uses_exchange_thread(x_TD.device)
        dispatch_tapes = [LinkTape() if split else None for _ in range(C)]
        combine_tapes = [LinkTape() if split else None for _ in range(C)]
        xs, idxs, ws = x_TD.tensor_split(C), topk_idx_TK.tensor_split(C), topk_weight_TK.tensor_split(C)
        x_leaves = [_leaf(x, x_TD.requires_grad) for x in xs]
        w_leaves = [_leaf(w, topk_weight_TK.requires_grad) for w in ws]
        routes = [disp.exchange_counts(disp.layout(x, i, w), chunk=c)
                  for c, (x, i, w) in enumerate(zip(x_leaves, idxs, w_leaves))]
        # Every chunk's dispatch in flight at once: the links stream chunk after chunk while the
        # experts work through the chunks that have arrived.
        sends = [disp.send(x, w, r, tape) for x, w, r, tape in zip(x_leaves, w_leaves, routes, dispatch_tapes)]
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
            combines[c] = disp.combine_start(y_leaf, handle, ew is not None, combine_tapes[c]).advance()
            if c > 0:
                outs[c - 1] = combines[c - 1].wait()
            chunks.append((x_leaves[c], w_leaves[c], batch, ex, ew, y, y_leaf, handle))
        outs[C - 1] = combines[C - 1].wait()
        graphs = tuple(ChunkGraph(*parts[:7], outs[c], parts[7], dispatch_tapes[c], combine_tapes[c])
                       for c, parts in enumerate(chunks))
        out_TD = torch.cat(outs) if C > 1 else outs[0]
        if shared_out is not None:
            out_TD = out_TD + shared_out
        return PipelineRun(graphs, weight_grads, shared_x, shared_out, out_TD)

    # ---- backward ------------------------------------------------------------------------------
    def run_backward(self, run: PipelineRun, grad_TD: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        grad_TD = grad_TD.contiguous()
        grads = grad_TD.tensor_split(len(run.chunks))
        if run.chunks[0].combine_tape is not None:
            _mirrored_backward(run, grads, grad_TD, backward_through)
        else:
            comm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="c2r-comm-exchange")
            try:
                _mirrored_backward(run, grads, grad_TD, _OnThread(comm.submit))
            finally:  # on an error drop the queued exchanges; the one running ends or times out
                comm.shutdown(wait=True, cancel_futures=True)
        grad_x = _gather_grads([ch.x_leaf for ch in run.chunks], run.shared_x_leaf)
        grad_w = _gather_grads([ch.weight_leaf for ch in run.chunks], None)
        return grad_x, grad_w


def _mirrored_backward(run: PipelineRun, grads: Sequence[torch.Tensor], grad_TD: torch.Tensor, start) -> None:
    """The mirrored pipeline. `start(tape, roots, grads)` starts one communicating piece's backward
    and returns what `wait()`s for it (and `advance()`s a multi-stage one): transport.backward_through
    (split) or _OnThread (the exchange thread). The gradient dispatch of every chunk (the backward of
    combine) starts first, in chunk order; chunk c's expert backward runs once its gradients have
    arrived, while later chunks' are in flight, and chunk c's dispatch backward (a combine) starts
    right after it. On a GPU a start only queues the collective on the communication stream and a
    wait makes the compute stream wait for it, so the expert kernels issued in between run while
    the bytes move."""
    combine_back = [start(ch.combine_tape, [ch.out], [g]) for ch, g in zip(run.chunks, grads)]
    if run.shared_out is not None:  # local work while chunk 0's gradients travel
        backward_from([run.shared_out], [grad_TD])
    dispatch_back = []
    for ch, pending in zip(run.chunks, combine_back):
        pending.wait()
        backward_from([ch.expert_out], [ch.combine_in_leaf.grad])
        ew = ch.expert_weight_leaf
        # advance(): a multi-stage dispatch (hierarchical, split) gets its last, cross-node stage in
        # flight now instead of when it is waited on (its node-local stage is waited first).
        dispatch_back.append(start(ch.dispatch_tape, [ch.batch.x_PD, ch.batch.weight_P],
                                   [ch.expert_x_leaf.grad, None if ew is None else ew.grad]).advance())
    # The experts' weight gradients of every chunk at once, while the dispatch backward exchanges
    # travel (deferred_wgrad.py). They are waited on only after it: waiting on chunk c-1's before
    # would free its buffers earlier (emulated 2x2: no difference in peak memory showed) but hold
    # the weight gradients back behind the link (0.1 Gbit/s, exchange thread: backward 0.77 of
    # serial against 0.70; split: even; docs/benchmarks.md, "Split backward").
    run.weight_grads.flush()
    for pending in dispatch_back:
        pending.wait()


@dataclass(frozen=True)
class _OnThread:
    """Starts a communicating piece's whole backward (autograd, packing, the blocking exchange) on
    the exchange thread; the forward made no tape (tape is None), so the piece's graph is whole."""
    submit: Callable[..., Future]

    def __call__(self, tape: None, roots, grads) -> "_Submitted":
        if tape is not None:  # a cut graph would stop backward_from at the cut, the exchange never run
            raise ValueError("the exchange thread runs whole pieces: the forward must not cut them (no LinkTape)")
        return _Submitted(self.submit(backward_from, roots, grads))


@dataclass(frozen=True)
class _Submitted:
    future: Future

    def advance(self) -> "_Submitted":  # the thread runs the piece whole; nothing to put in flight
        return self

    def wait(self) -> None:
        self.future.result()


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
