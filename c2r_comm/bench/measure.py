"""Timed forward + backward of a MoE layer, and the rows and bytes its dispatcher sends.

Times are per iteration the slowest rank's (a collective step ends when its last rank does).
Rows and bytes come from the ExchangePlan every rank's layout() produced, combined over ranks
(world traffic matrix), the same numbers the cost model and the handles' CommStats use.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from c2r_comm.bench.timing import Timing, barrier, sync
from c2r_comm.bench.wire import InterfaceBytes, interface_bytes
from c2r_comm.comm_failures import group_site, guard
from c2r_comm.dispatch import CommStats, ExchangePlan, traffic_stats
from c2r_comm.layer import MoELayer

if TYPE_CHECKING:
    from c2r_comm.bench.overlap import OverlapResult
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
    # Wall time of forward + backward together per iteration (slowest rank); None in old records.
    total: Optional[Timing] = None
    # Peak memory of one rank during the timed iterations, max over ranks, MB (1e6 bytes). CUDA:
    # torch.cuda.max_memory_allocated (tensors only) after reset_peak_memory_stats. CPU: the process
    # peak RSS (getrusage ru_maxrss), which includes the Python/torch runtime; on Linux its high-water
    # mark is reset (/proc/self/clear_refs) when the timed iterations start, elsewhere it is the
    # high-water mark of the whole process so far (then earlier dispatchers of one launch count too).
    peak_memory_mb: float = 0.0
    # Bytes the node links really carried per timed iteration (forward + backward), summed over
    # nodes, from the interface counters of each node's first rank (bench/wire.py): what crossed
    # between emulated nodes, TCP/IP headers included. None when the launcher named no interface.
    wire_bytes_sent: Optional[float] = None
    wire_bytes_received: Optional[float] = None
    # Capacity mode (routing.capacity_factor), summed over ranks, one iteration: choices routed
    # before the limit, choices it dropped, tokens that lost every choice. None: dropless.
    routed_choices: Optional[int] = None
    dropped_choices: Optional[int] = None
    dropped_tokens: Optional[int] = None
    # Replica plans: the replica gradient sync of one training step (ReplicaGradSync.stats: among each
    # expert's holders, all ranks), which the benchmark's forward + backward does not run. None: no replicas.
    replica_sync: Optional[CommStats] = None


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
    overlap: Optional["OverlapResult"] = None  # serial vs pipelined (bench --overlap-degree)
    # bench --trace: {"file", "prompts", "tokens"} of the replayed trace, so a record can be replayed
    # again (`c2r-comm check-model` checks its --trace and --prompts against it)
    trace_source: Optional[dict] = None

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
        if self.overlap is not None:
            d["overlap"].update(efficiency=self.overlap.efficiency, speedup=self.overlap.speedup,
                                overlapped_vs_max=self.overlap.vs_max)
        return d


def world_stats(plans: Sequence[ExchangePlan], topology, device: torch.device,
                group: Any) -> tuple[CommStats, CommStats, int]:
    """(dispatch, combine, tokens) over all ranks and all of one step's token chunks: every rank's
    plan traffic summed (one all_reduce, outside the timed region)."""
    first = plans[0]
    traffic = torch.stack([p.traffic() for p in plans]).sum(0).reshape(-1)
    t = torch.cat([traffic, torch.tensor([sum(p.num_tokens for p in plans)])]).to(device)
    with guard(group_site("benchmark traffic reduction", group)):
        dist.all_reduce(t, group=group)
    t = t.cpu()
    traffic = t[:-1].reshape(len(first.stages), first.world_size, first.world_size)
    dispatch, combine = traffic_stats(traffic, first.stages, topology)
    return dispatch, combine, int(t[-1])


def measure_layer(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor, warmup: int, iters: int,
                  routing: Optional[tuple[torch.Tensor, torch.Tensor]], group: Any,
                  label: str, show_progress: bool, network_interface: Optional[str] = None) -> Measurement:
    """Run warm-up + timed iterations; routing=None uses the layer's router on x_TD.
    network_interface: the node link whose counters measure wire bytes (see Measurement)."""
    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        out = layer(x) if routing is None else layer.forward_routed(x, *routing)
        return out.out_TD, out.aux_loss, (out.handles, out.capacity_drop)

    topology = layer.dispatcher.topology
    meas, (handles, capacity) = measure_module(layer, step, x_TD, grad_TD, warmup, iters, group, topology, label,
                                               show_progress, network_interface)
    d_stats, c_stats, tokens = world_stats([h.route.plan for h in handles], topology, x_TD.device, group)
    meas = replace(meas, tokens=tokens, dispatch=d_stats, combine=c_stats)
    sync = layer.replica_grad_sync
    if sync is not None:
        experts = layer.experts
        meas = replace(meas, replica_sync=sync.stats(experts.hidden_size, experts.ffn_size,
                                                     experts.w_gate_LDF.element_size()))
    if capacity is not None:  # the last iteration's drops, summed over ranks (outside the timed region)
        drops = torch.stack([capacity.routed_choices, capacity.dropped_choices, capacity.dropped_tokens]).to(x_TD.device)
        with guard(group_site("benchmark drop count reduction", group)):
            dist.all_reduce(drops, group=group)
        routed, dropped, lost = drops.cpu().tolist()
        meas = replace(meas, routed_choices=routed, dropped_choices=dropped, dropped_tokens=lost)
    return meas


def measure_module(module: torch.nn.Module, step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, Any]],
                   x_TD: torch.Tensor, grad_TD: torch.Tensor, warmup: int, iters: int, group: Any, topology,
                   label: str, show_progress: bool,
                   network_interface: Optional[str] = None) -> tuple[Measurement, Any]:
    """measure_layer's timing loop for any module (the benchmark's peers use it too): step(x) runs the
    forward and returns (out_TD, aux_loss, keep); backward is of (out_TD * grad_TD).sum() + aux_loss.
    Returns the Measurement without traffic (tokens 0, empty CommStats: the caller fills them in with
    dataclasses.replace) and the last iteration's `keep`."""
    device = x_TD.device
    wire_start = None
    fwd, bwd, total, cpu = [], [], [], []
    keep = None
    for i in tqdm(range(warmup + iters), desc=label, disable=not show_progress, file=sys.stderr):
        if i == warmup:
            reset_peak_memory(device)
        module.zero_grad(set_to_none=True)
        x = x_TD.detach().requires_grad_()
        barrier(group, device)
        sync(device)
        if i == warmup:
            wire_start = interface_bytes(network_interface)
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out_TD, aux_loss, last = step(x)
        sync(device)
        t1 = time.perf_counter()
        ((out_TD * grad_TD).sum() + aux_loss).backward()
        sync(device)
        t2, r2 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        keep = last
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            total.append(t2 - t0)
            cpu.append((r2.ru_utime - r0.ru_utime, r2.ru_stime - r0.ru_stime))
    wire_sent, wire_received = _wire_per_iteration(wire_start, network_interface, iters, topology, group, device)
    # Slowest rank per iteration.
    times = torch.tensor([fwd, bwd, total, [peak_memory_mb(device)] * iters], dtype=torch.float64, device=device)
    cpu_t = torch.tensor(cpu, dtype=torch.float64, device=device)
    with guard(group_site("benchmark time reduction", group)):
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(cpu_t, group=group)  # summed over ranks, per iteration
    fwd, bwd, total, peak = times.cpu().tolist()
    user_s, sys_s = cpu_t.cpu().median(0).values.tolist()
    return Measurement(0, CommStats(), CommStats(), Timing.of(fwd), Timing.of(bwd), user_s, sys_s, Timing.of(total),
                       peak[0], wire_sent, wire_received), keep


def _wire_per_iteration(start: Optional[InterfaceBytes], network_interface: Optional[str], iters: int,
                        topo, group: Any, device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(sent, received) bytes per timed iteration over every node's link (its first rank reads the
    counters; all ranks of a node share the link). One all_reduce, outside the timed region."""
    barrier(group, device)  # every rank's last messages are out before the counters are read
    end = interface_bytes(network_interface)
    rank = dist.get_rank(group)
    first_of_node = topo.local_index_of(rank) == 0
    mine = [1.0, float(end.sent - start.sent), float(end.received - start.received)] \
        if (start is not None and end is not None and first_of_node) else [0.0, 0.0, 0.0]
    t = torch.tensor(mine, dtype=torch.float64, device=device)
    with guard(group_site("benchmark wire-counter reduction", group)):
        dist.all_reduce(t, group=group)
    nodes_read, sent, received = t.cpu().tolist()
    if nodes_read < topo.nodes:  # some node had no interface to read: no number rather than a partial one
        return None, None
    return sent / iters, received / iters


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (see Measurement.peak_memory_mb)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS to the current RSS (proc(5), clear_refs)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # no /proc or not allowed: the window is the whole process so far (documented)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # ru_maxrss is KiB on Linux
