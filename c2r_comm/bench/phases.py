"""Where a MoE layer's time goes: each dispatch phase timed on its own, forward and backward.

Forward runs the dispatcher's phases one by one (layout, count exchange, send + wait, experts,
combine + wait). Backward is cut at the phase boundaries with detached leaves, so each piece
runs alone: combine's backward (the return exchange reversed), the experts' backward, then
dispatch's backward (the dispatch exchange reversed). Before each phase the ranks meet at a
barrier and the device is synchronised, so a phase's time is its own (not time spent waiting
for a slower rank to finish the previous phase) and phases do not overlap: the phase times add
up to a serial step without skew. Per iteration the slowest rank's time counts for each phase.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from c2r_comm.bench.timing import Timing, barrier, sync
from c2r_comm.comm_failures import group_site, guard
from c2r_comm.layer import MoELayer

FORWARD_PHASES = ("router", "layout", "count_exchange", "send", "experts", "combine")
BACKWARD_PHASES = ("combine", "experts", "dispatch")


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    forward: dict[str, Timing]  # phase -> median / p10 / p90 over iterations (slowest rank)
    backward: dict[str, Timing]
    # phase -> median host CPU seconds (user + sys, every thread) summed over ranks: with more ranks
    # than cores, where the CPU goes, which wall times of concurrent ranks hide
    forward_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)
    backward_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)


class _Clock:
    """Times phases one at a time: barrier + sync, run, sync."""

    def __init__(self, device: torch.device, group: Any):
        self.device, self.group, self.samples, self.cpu = device, group, {}, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        barrier(self.group, self.device)
        sync(self.device)
        t0, c0 = time.perf_counter(), _cpu_s()
        out = fn()
        sync(self.device)
        self.samples.setdefault(name, []).append(time.perf_counter() - t0)
        self.cpu.setdefault(name, []).append(_cpu_s() - c0)
        return out

    def clear(self) -> None:
        self.samples.clear()
        self.cpu.clear()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _one_step(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor,
              routing: Optional[tuple[torch.Tensor, torch.Tensor]], fwd: _Clock, bwd: _Clock) -> None:
    disp = layer.dispatcher
    x = x_TD.detach().requires_grad_()

    def select_experts():  # the router (or the given routing), then capacity mode's limit, if any
        out = layer.router(x) if routing is None else None
        idx, weight = routing if out is None else (out.topk_idx_TK, out.topk_weight_TK)
        return layer.limit_routing(idx, weight) + (None if out is None else out.aux_loss,)

    idx, weight, drop, aux = fwd.run("router", select_experts)
    experts = layer.experts_for(drop)
    plan = fwd.run("layout", lambda: disp.layout(x, idx, weight))
    route = fwd.run("count_exchange", lambda: disp.exchange_counts(plan))
    batch, handle = fwd.run("send", lambda: disp.send(x, weight, route).wait())
    x_PD = batch.x_PD.detach().requires_grad_()
    weighted = batch.weight_P is not None  # weights applied by the experts, else by combine
    w_P = batch.weight_P.detach().requires_grad_() if weighted else None
    y_PD = fwd.run("experts", lambda: experts(x_PD, batch.tokens_per_expert, batch.offsets_E, w_P))
    y_leaf = y_PD.detach().requires_grad_()
    w_leaf = handle.combine_weight.detach().requires_grad_()
    cut = handle if weighted else dataclasses.replace(handle, combine_weight=w_leaf)
    out_TD = fwd.run("combine", lambda: disp.combine_start(y_leaf, cut, weighted).wait())

    loss = (out_TD * grad_TD).sum()
    bwd.run("combine", lambda: loss.backward())
    bwd.run("experts", lambda: y_PD.backward(y_leaf.grad))
    roots = [(batch.x_PD, x_PD.grad)]
    roots.append((batch.weight_P, w_P.grad) if weighted else (handle.combine_weight, w_leaf.grad))
    if aux is not None and aux.requires_grad:
        roots.append((aux, torch.ones_like(aux)))
    roots = [(t, g) for t, g in roots if t.requires_grad]
    bwd.run("dispatch", lambda: torch.autograd.backward([t for t, _ in roots], [g for _, g in roots]) if roots else None)


def measure_phases(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor, warmup: int, iters: int,
                   routing: Optional[tuple[torch.Tensor, torch.Tensor]], group: Any, label: str,
                   show_progress: bool) -> PhaseTimes:
    device = x_TD.device
    fwd, bwd = _Clock(device, group), _Clock(device, group)
    for i in tqdm(range(warmup + iters), desc=label + " phases", disable=not show_progress, file=sys.stderr):
        layer.zero_grad(set_to_none=True)
        _one_step(layer, x_TD, grad_TD, routing, fwd, bwd)
        if i < warmup:
            fwd.clear()
            bwd.clear()
    names = [("f", p) for p in FORWARD_PHASES] + [("b", p) for p in BACKWARD_PHASES]
    clock = {"f": fwd, "b": bwd}
    times = torch.tensor([clock[d].samples[p] for d, p in names], dtype=torch.float64, device=device)
    cpu = torch.tensor([clock[d].cpu[p] for d, p in names], dtype=torch.float64, device=device)
    with guard(group_site("benchmark phase-time reduction", group)):
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(cpu, group=group)
    per = {(d, p): Timing.of(r) for (d, p), r in zip(names, times.cpu().tolist())}
    cpu_s = {(d, p): float(torch.tensor(r).median()) for (d, p), r in zip(names, cpu.cpu().tolist())}
    return PhaseTimes({p: per["f", p] for p in FORWARD_PHASES}, {p: per["b", p] for p in BACKWARD_PHASES},
                      {p: cpu_s["f", p] for p in FORWARD_PHASES}, {p: cpu_s["b", p] for p in BACKWARD_PHASES})
