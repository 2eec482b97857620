"""Where a MoE layer's time goes: each dispatch phase timed on its own, forward and backward.

Forward runs the dispatcher's phases one by one (layout, count exchange, send + wait, experts,
combine + wait). Backward is cut at the phase boundaries with detached leaves, so each piece
runs alone: combine's backward (the return exchange reversed), the experts' backward, then
dispatch's backward (the dispatch exchange reversed). Between phases the device is synchronised,
so phases do not overlap here: the phase times add up to a serial step (a little slower than
the plain timed run). Per iteration the slowest rank's time counts for each phase.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from c2r_comm.bench.measure import Timing, barrier, sync
from c2r_comm.layer import MoELayer
from c2r_comm.progress import progress

FORWARD_PHASES = ("router", "layout", "count_exchange", "send", "experts", "combine")
BACKWARD_PHASES = ("combine", "experts", "dispatch")


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    forward: dict[str, Timing]  # phase -> median / p10 / p90 over iterations (slowest rank)
    backward: dict[str, Timing]


class _Clock:
    def __init__(self, device: torch.device):
        self.device, self.samples, self._t = device, {}, 0.0

    def start(self) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.samples.setdefault(name, []).append(now - self._t)
        self._t = now

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        out = fn()
        self.lap(name)
        return out


def _one_step(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor,
              routing: Optional[tuple[torch.Tensor, torch.Tensor]], fwd: _Clock, bwd: _Clock) -> None:
    disp, experts = layer.dispatcher, layer.experts
    x = x_TD.detach().requires_grad_()
    fwd.start()
    if routing is None:
        out = fwd.run("router", lambda: layer.router(x))
        idx, weight, aux = out.topk_idx_TK, out.topk_weight_TK, out.aux_loss
    else:
        (idx, weight), aux = routing, None
        fwd.lap("router")
    plan = fwd.run("layout", lambda: disp.layout(x, idx, weight))
    route = fwd.run("count_exchange", lambda: disp.exchange_counts(plan))
    batch, handle = fwd.run("send", lambda: disp.send(x, weight, route).wait())
    x_PD = batch.x_PD.detach().requires_grad_()
    y_PD = fwd.run("experts", lambda: experts(x_PD, batch.tokens_per_expert, batch.offsets_E))
    y_leaf = y_PD.detach().requires_grad_()
    w_leaf = handle.combine_weight.detach().requires_grad_()
    cut = dataclasses.replace(handle, combine_weight=w_leaf)
    out_TD = fwd.run("combine", lambda: disp.combine_start(y_leaf, cut).wait())

    bwd.start()
    loss = (out_TD * grad_TD).sum()
    bwd.run("combine", lambda: loss.backward())
    bwd.run("experts", lambda: y_PD.backward(y_leaf.grad))
    roots = [(batch.x_PD, x_PD.grad), (handle.combine_weight, w_leaf.grad)]
    if aux is not None and aux.requires_grad:
        roots.append((aux, torch.ones_like(aux)))
    roots = [(t, g) for t, g in roots if t.requires_grad]
    bwd.run("dispatch", lambda: torch.autograd.backward([t for t, _ in roots], [g for _, g in roots]) if roots else None)


def measure_phases(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor, warmup: int, iters: int,
                   routing: Optional[tuple[torch.Tensor, torch.Tensor]], group: Any, label: str,
                   show_progress: bool) -> PhaseTimes:
    device = x_TD.device
    fwd, bwd = _Clock(device), _Clock(device)
    for i in progress(range(warmup + iters), warmup + iters, label + " phases", enabled=show_progress):
        layer.zero_grad(set_to_none=True)
        barrier(group, device)
        _one_step(layer, x_TD, grad_TD, routing, fwd, bwd)
        if i < warmup:
            fwd.samples.clear()
            bwd.samples.clear()
    names = [("f", p) for p in FORWARD_PHASES] + [("b", p) for p in BACKWARD_PHASES]
    times = torch.tensor([(fwd if d == "f" else bwd).samples[p] for d, p in names], dtype=torch.float64,
                         device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    rows = times.cpu().tolist()
    per = {(d, p): Timing.of(r) for (d, p), r in zip(names, rows)}
    return PhaseTimes({p: per["f", p] for p in FORWARD_PHASES}, {p: per["b", p] for p in BACKWARD_PHASES})
