"""Timed forward + backward of a MoE layer, and the rows and bytes its dispatcher sends.

Times are per iteration the slowest rank's (a collective step ends when its last rank does).
Rows and bytes come from the ExchangePlan every rank's layout() produced, combined over ranks
(world traffic matrix), the same numbers the cost model and the handles' CommStats use.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from c2r_comm.bench.timing import Timing, barrier, sync
from c2r_comm.dispatch import CommStats, ExchangePlan, traffic_stats
from c2r_comm.layer import MoELayer
from c2r_comm.progress import progress

if TYPE_CHECKING:
    from c2r_comm.bench.phases import PhaseTimes


@dataclass(frozen=True)
class Measurement:
    tokens: int  # over all ranks
    dispatch: CommStats  # summed over ranks
    combine: CommStats
    forward: Timing
    backward: Timing
    # Host CPU seconds per iteration (fwd+bwd), summed over ranks, median over iterations: user
    # (torch ops, Python) and sys (kernel: socket copies, page faults of fresh allocations). With
    # more ranks than cores, wall time ~ (user + sys) / cores: the run is CPU-bound.
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0


@dataclass(frozen=True)
class BenchRecord:
    dispatcher: str
    placement: str
    routing: str
    topology: str
    config: dict
    measurement: Measurement
    layer: Optional[int] = None  # trace layer the routing came from (None: the router)
    phases: Optional["PhaseTimes"] = None  # per-phase medians (bench --phases)

    @property
    def tokens(self) -> int:
        return self.measurement.tokens

    @property
    def dispatch(self) -> CommStats:
        return self.measurement.dispatch

    @property
    def combine(self) -> CommStats:
        return self.measurement.combine

    def per_token(self, rows: int) -> float:
        return rows / self.tokens if self.tokens else 0.0

    @property
    def mb_sent(self) -> float:
        """Off-rank bytes, dispatch + combine, all ranks, one iteration."""
        return (self.dispatch.bytes_off_rank + self.combine.bytes_off_rank) / 1e6

    @property
    def cross_node_mb(self) -> float:
        return (self.dispatch.bytes_cross_node + self.combine.bytes_cross_node) / 1e6

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(copies_per_token_same_node=self.per_token(self.dispatch.rows_same_node),
                 copies_per_token_cross_node=self.per_token(self.dispatch.rows_cross_node),
                 copies_per_token_off_rank=self.per_token(self.dispatch.rows_off_rank),
                 mb_sent=self.mb_sent, cross_node_mb=self.cross_node_mb)
        return d


def world_stats(plan: ExchangePlan, topology, device: torch.device, group: Any) -> tuple[CommStats, CommStats, int]:
    """(dispatch, combine, tokens) over all ranks: every rank's plan traffic summed (one all_reduce,
    outside the timed region)."""
    t = torch.cat([plan.traffic().reshape(-1), torch.tensor([plan.num_tokens])]).to(device)
    dist.all_reduce(t, group=group)
    t = t.cpu()
    traffic = t[:-1].reshape(len(plan.stages), plan.world_size, plan.world_size)
    dispatch, combine = traffic_stats(traffic, plan.stages, topology)
    return dispatch, combine, int(t[-1])


def measure_layer(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor, warmup: int, iters: int,
                  routing: Optional[tuple[torch.Tensor, torch.Tensor]], group: Any,
                  label: str, show_progress: bool) -> Measurement:
    """Run warm-up + timed iterations; routing=None uses the layer's router on x_TD."""
    device = x_TD.device
    fwd, bwd, cpu = [], [], []
    handle = None
    for i in progress(range(warmup + iters), warmup + iters, label, enabled=show_progress):
        layer.zero_grad(set_to_none=True)
        x = x_TD.detach().requires_grad_()
        barrier(group, device)
        sync(device)
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out = layer(x) if routing is None else layer.forward_routed(x, *routing)
        sync(device)
        t1 = time.perf_counter()
        ((out.out_TD * grad_TD).sum() + out.aux_loss).backward()
        sync(device)
        t2, r2 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        handle = out.handle
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            cpu.append((r2.ru_utime - r0.ru_utime, r2.ru_stime - r0.ru_stime))
    # Slowest rank per iteration.
    times = torch.tensor([fwd, bwd], dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    fwd, bwd = times.cpu().tolist()
    cpu_t = torch.tensor(cpu, dtype=torch.float64, device=device)
    dist.all_reduce(cpu_t, group=group)  # summed over ranks, per iteration
    user_s, sys_s = cpu_t.cpu().median(0).values.tolist()
    d_stats, c_stats, tokens = world_stats(handle.route.plan, layer.dispatcher.topology, device, group)
    return Measurement(tokens, d_stats, c_stats, Timing.of(fwd), Timing.of(bwd), user_s, sys_s)
