"""What each rank of `c2r-comm bench` runs (bench_cmd.py checks the arguments and launches): the
layer per dispatcher, timed, with its phases, overlap and peers; rank 0 prints and writes the records."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
from typing import Optional, Sequence

import torch

from c2r_comm.bench.measure import BenchRecord, measure_layer
from c2r_comm.bench.overlap import OverlapResult, format_overlap
from c2r_comm.bench.peers import bench_peers
from c2r_comm.bench.phases import measure_phases
from c2r_comm.bench.profile import profile_layer
from c2r_comm.bench.rank_launcher import set_parent_death_signal
from c2r_comm.bench.report import format_phases, format_summary, format_table, write_json
from c2r_comm.bootstrap import init_distributed, report_to_launcher, shutdown
from c2r_comm.cli.bench_cmd import topology_of
from c2r_comm.comm_failures import EXIT_COMM_ERROR, CommError
from c2r_comm.config import Config, with_overrides
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import DTYPES, build_moe_layer
from c2r_comm.routing.trace import RoutingTrace


def run_rank(args: argparse.Namespace, config: Config, trace: Optional[RoutingTrace], layers: list[int],
             names: list[str], peers: Sequence[str]) -> int:
    if args.die_with_parent:
        set_parent_death_signal(signal.SIGKILL)
    try:
        ctx = init_distributed(config.run.timeout_s, config.run.device)
        return _bench_ranks(args, config, trace, layers, names, peers, ctx)
    except CommError as exc:  # one line, no traceback: the error names rank, peers and phase
        print(f"c2r-comm bench: {exc}", file=sys.stderr, flush=True)
        report_to_launcher(exc)
        return EXIT_COMM_ERROR
    finally:
        shutdown()


def _bench_ranks(args: argparse.Namespace, config: Config, trace: Optional[RoutingTrace], layers: list[int],
                 names: list[str], peers: Sequence[str], ctx) -> int:
    config.check_world_size(ctx.world_size)
    groups = build_process_groups(topology_of(config), config.run.timeout_s)
    records = [r for layer in layers for r in
               bench_all(with_overrides(config, {"placement.layer": layer}), trace, names, groups, ctx.device,
                         show=ctx.rank == 0, phases=args.phases, network_interface=args.wire_interface,
                         peers=peers, profile_dir=args.profile, overlap_degree=args.overlap_degree)]
    if trace is not None:
        source = {"file": os.path.abspath(args.trace), "prompts": args.prompts, "tokens": trace.num_tokens}
        records = [dataclasses.replace(r, trace_source=source) for r in records]
    if ctx.rank == 0:
        print(describe(config, trace, layers, args) + f", {ctx.backend} on {ctx.device.type}")
        print(format_table(records))
        if args.phases or args.overlap_degree is not None:
            print(format_phases(records))
        if args.overlap_degree is not None:
            print(format_overlap([(r.dispatcher, r.overlap) for r in records if r.overlap is not None]))
        if len(layers) > 1:
            print(format_summary(records))
        if args.json:
            write_json(records, args.json)
            print(f"wrote {args.json}")
    return 0


def bench_all(config: Config, trace: Optional[RoutingTrace], names: list[str], groups, device: torch.device,
              show: bool, phases: bool = False, network_interface: Optional[str] = None,
              peers: Sequence[str] = (), profile_dir: Optional[str] = None,
              overlap_degree: Optional[int | str] = None) -> list[BenchRecord]:
    run, m = config.run, config.model
    dtype = DTYPES[run.dtype]
    g = torch.Generator().manual_seed(run.seed * 7919 + groups.rank)
    x_TD = torch.randn(run.tokens_per_rank, m.hidden_size, generator=g).to(device, dtype)
    grad_TD = torch.randn(run.tokens_per_rank, m.hidden_size, generator=g).to(device, dtype)
    routing, routing_desc, trace_layer = None, f"{config.routing.kind} router", None
    if trace is not None:
        trace_layer = config.placement.layer
        idx = torch.from_numpy(trace.rank_block(trace_layer, groups.rank, run.tokens_per_rank)).to(device)
        # Traces record no gate weights: every chosen expert gets 1/k.
        routing = (idx, torch.full(idx.shape, 1.0 / m.top_k, device=device, dtype=torch.float32))
        routing_desc = f"trace layer {trace_layer}"
    placement = os.path.basename(config.placement.plan) if config.placement.plan else "contiguous"
    records = []
    if overlap_degree is not None:  # the rows below are the serial layer; the pipelined one is extra
        config = with_overrides(config, {"schedule.overlap_degree": 1})
        phases = True
    for name in names:
        layer = build_moe_layer(config, groups, device, dispatcher=name)
        label = f"{name:>12}" + (f" layer {trace_layer:>2}" if trace_layer is not None else "")
        meas = measure_layer(layer, x_TD, grad_TD, run.warmup_iters, run.iters, routing, groups.ep,
                             label=label, show_progress=show, network_interface=network_interface)
        per_phase = measure_phases(layer, x_TD, grad_TD, run.warmup_iters, run.iters, routing, groups.ep,
                                   label=label, show_progress=show) if phases else None
        if profile_dir:
            profile_layer(layer, x_TD, grad_TD, routing, 3, profile_dir, name, groups.rank)
        overlap = None
        if overlap_degree is not None:
            del layer  # the serial layer's weights and gradients would count in the pipelined one's peak memory
            gc.collect()
            piped = build_moe_layer(with_overrides(config, {"schedule.overlap_degree": overlap_degree}), groups,
                                    device, dispatcher=name)
            piped_meas = measure_layer(piped, x_TD, grad_TD, run.warmup_iters, run.iters, routing, groups.ep,
                                       label=label + f" C={overlap_degree}", show_progress=show)
            overlap = OverlapResult.of(per_phase, meas, piped_meas, piped.overlap_degree, overlap_degree)
            del piped
        resolved = with_overrides(config, {"dispatcher": name}).to_dict()
        records.append(BenchRecord(name, placement, routing_desc, str(groups.topology), resolved, meas, trace_layer,
                                   per_phase, overlap))
    # Peers (--peers): same inputs and routing, timed the same way, one row each (c2r_comm/bench/peers.py).
    records += bench_peers(peers, config, routing, routing_desc, trace_layer, groups, device, x_TD, grad_TD, show,
                           network_interface)
    return records


def describe(config: Config, trace: Optional[RoutingTrace], layers: list[int], args: argparse.Namespace) -> str:
    m, r = config.model, config.run
    src = f"{config.routing.kind} router"
    if trace is not None:
        which = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers"
        src = f"trace {args.trace} {which}" + (f" prompts {args.prompts}" if args.prompts else "")
    return (f"c2r-comm bench: topology {config.parallel.nodes}x{config.parallel.gpus_per_node}, "
            f"{m.num_experts} experts top-{m.top_k}, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
            f"{r.tokens_per_rank} tokens/rank, {r.dtype}, routing from {src}, "
            f"{r.iters} timed iters after {r.warmup_iters} warm-up")
