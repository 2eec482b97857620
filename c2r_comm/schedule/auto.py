"""`schedule.overlap_degree: auto`: how many chunks to pipeline, from one serial step's timing.

Pipelining C chunks turns a layer's exchange + experts into about max(E, X) + min(E, X) / C plus a
per-chunk cost (one more count exchange and smaller, less efficient kernels per chunk). One serial
forward is timed: its exchange E_f and expert time X_f. A step's backward moves the same bytes
again and computes about twice the forward's expert FLOPs, so the step's totals are estimated as
E = 2 E_f and X = 3 X_f. The rule:
  min(E, X) < 0.1 max(E, X)  -> C = 1  (little to hide: chunking would cost more than it saves)
  E >= 2 X                   -> C = 4  (link-bound: more, smaller chunks keep the link busy and
                                        their extra compute hides behind it)
  E >= X and R >= 4 x 32     -> C = 4  (R: the rows one local expert got in the timed forward, on
                                        average, on the rank with the fewest: with 4 chunks an
                                        expert still gets about 32 rows or more per chunk, so a
                                        chunk costs little more than its share of the rows)
  otherwise                  -> C = 2  (small chunks re-read every expert's weights for few rows)
Checked on the CPU (docs/benchmarks.md, issue 11, "At the issue's size": emulated 2x2 on 2 cores,
hierarchical, FFN 256, one afternoon, one launch per row, exchange 1.06x-1.96x the experts): at
2,048 tokens per rank (703 rows per expert) C = 4 beat C = 2 at 0.2 and 0.3 Gbit/s (1.02-1.04x
against 1.08-1.13x max(exchange, experts); 1.17-1.20x against 1.36x) and C = 8 gained nothing
more; at 512 tokens (159 rows) the two were even (1.17x / 1.18x at 0.2 Gbit/s, 1.61x / 1.63x at
0.5). On earlier days (older code, a busier machine) C = 2 led at 512 tokens. The smallest tested
was about 40 rows per expert and chunk; 32 is an extrapolation below it. Where the experts exceed
the exchange, and on a GPU, whose GEMMs likely want more rows, the rows test is not measured; the
first keeps C = 2.
E_f is the forward's exchange time (count exchange, send until delivered, combine until returned)
that compute could hide, X_f its expert time, each the slowest rank's (one all_reduce MAX), so
every rank picks the same C. On a GPU all of the exchange's wall time can hide behind the
experts. When the experts run on the CPU they compete with the exchange for the machine's cores, so
only the part of the exchange during which the cores sat idle counts: wall time x the machine's
idle share over the exchange (from /proc/stat; gloo over loopback keeps every core busy copying or
computing for other ranks, nothing to hide; a slow link is mostly waiting). Without /proc/stat all
of it counts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.dispatch import DispatchHandle, Dispatcher

NEGLIGIBLE_RATIO = 0.1
LINK_BOUND_RATIO = 2.0
ROWS_PER_EXPERT_CHUNK = 32  # rows per local expert and chunk (on average) for C = 4 off the link-bound case


def choose_overlap_degree(exchange_s: float, experts_s: float, rows_per_expert: float = 0.0) -> int:
    """The rule in the module doc, on a step's (forward + backward) exchange and expert times and
    the rows one local expert gets (the fewest over ranks; 0: unknown, no C = 4 on that account)."""
    exchange_s, experts_s = max(exchange_s, 0.0), max(experts_s, 0.0)
    lo, hi = sorted((exchange_s, experts_s))
    if hi == 0 or lo < NEGLIGIBLE_RATIO * hi:
        return 1
    if exchange_s >= LINK_BOUND_RATIO * experts_s:
        return 4
    if exchange_s >= experts_s and rows_per_expert >= 4 * ROWS_PER_EXPERT_CHUNK:
        return 4
    return 2


@dataclass(frozen=True)
class SerialTiming:
    out_TD: torch.Tensor
    handle: DispatchHandle
    exchange_s: float  # wall time
    experts_s: float
    exchange_idle_share: float = 1.0  # the machine's idle share of its cores during the exchange

    @property
    def rows_per_expert(self) -> float:
        """Rows one local expert got in this forward, on average (host counts of the count exchange)."""
        counts = self.handle.tokens_per_expert
        return self.handle.num_rows / len(counts) if counts else 0.0

    @property
    def hideable_exchange_s(self) -> float:
        """What overlap can hide: all of it on a GPU; with CPU experts only the idle cores' share."""
        if self.out_TD.device.type == "cuda":
            return self.exchange_s
        return self.exchange_s * min(1.0, max(0.0, self.exchange_idle_share))


def machine_cpu_ticks() -> tuple[float, float]:
    """(idle, total) CPU ticks of the whole machine since boot (Linux /proc/stat); (0, 0) elsewhere."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields[:8])  # idle + iowait; no guest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def serial_forward(dispatcher: Dispatcher, experts: nn.Module, shared_expert: Optional[nn.Module],
                   x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                   timed: bool = False) -> SerialTiming:
    """The serial layer forward: dispatch -> experts -> combine (+ shared expert). Untimed it adds no
    sync; timed (`timed_serial_forward`) the times are filled in, else 0."""
    return timed_serial_forward(dispatcher, experts, shared_expert, x_TD, topk_idx_TK, topk_weight_TK,
                                timer=None if not timed else time.perf_counter)


def timed_serial_forward(dispatcher: Dispatcher, experts: nn.Module, shared_expert: Optional[nn.Module],
                         x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                         timer: Optional[Callable[[], float]] = time.perf_counter,
                         cpu_ticks: Callable[[], tuple[float, float]] = machine_cpu_ticks) -> SerialTiming:
    """The serial layer forward, timing exchange and experts (wall clock `timer`; `cpu_ticks`: the
    machine's (idle, total) CPU tick counters). timer=None: no timing and no device syncs."""
    device = x_TD.device

    def mark() -> tuple[float, tuple[float, float]]:
        if timer is None:
            return 0.0, (0.0, 0.0)
        _sync(device)
        return timer(), cpu_ticks()

    t0, c0 = mark()
    batch, handle = dispatcher.dispatch(x_TD, topk_idx_TK, topk_weight_TK)
    # Dispatchers that weight at the experts hand over weight_P; the experts apply it to their
    # [P, F] activation (cheaper than scaling [P, D] outputs) and combine only sums.
    t1, c1 = mark()
    y_PD = experts(batch.x_PD, batch.tokens_per_expert, batch.offsets_E, batch.weight_P)
    t2, c2 = mark()
    out_TD = dispatcher.combine(y_PD, handle, weighted=batch.weight_P is not None)
    t3, c3 = mark()
    if shared_expert is not None:
        out_TD = out_TD + shared_expert(x_TD)
    idle = (c1[0] - c0[0]) + (c3[0] - c2[0])
    total = (c1[1] - c0[1]) + (c3[1] - c2[1])
    return SerialTiming(out_TD, handle, (t1 - t0) + (t3 - t2), t2 - t1, idle / total if total > 0 else 1.0)


@dataclass(frozen=True)
class OverlapChoice:
    degree: int
    exchange_s: float  # slowest rank's forward exchange, wall
    hideable_exchange_s: float  # slowest rank's forward exchange that compute could hide
    experts_s: float  # slowest rank's forward experts
    rows_per_expert: float = 0.0  # the fewest over ranks of the rows one local expert got


def agree_overlap_degree(timing: SerialTiming, group: Any) -> OverlapChoice:
    """C from the slowest rank's forward times (one all_reduce MAX, so every rank picks the same C),
    chosen on the step estimate (2 x hideable E_f, 3 X_f) and the fewest rows per local expert."""
    device = timing.out_TD.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor([timing.exchange_s, timing.hideable_exchange_s, timing.experts_s, -timing.rows_per_expert],
                     dtype=torch.float64, device=device)  # the rows negated: MAX gives the fewest
    with guard(group_site("overlap degree agreement", group)):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    exchange_s, hideable_s, experts_s, neg_rows = t.tolist()
    return OverlapChoice(choose_overlap_degree(2 * hideable_s, 3 * experts_s, -neg_rows), exchange_s, hideable_s,
                         experts_s, -neg_rows)
