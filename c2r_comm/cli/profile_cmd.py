"""`c2r-comm profile`: co-activation statistics of a routing trace, per layer.

Prints load CV, collaboration breadth and E[distinct GPUs (nodes) per token] under contiguous
placement on --topology; optionally saves the stats (.npz, usable as routing.collaborators) and a
PNG heatmap of one layer's co-activation matrix with experts ordered by a placement.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from c2r_comm.config import parse_topology
from c2r_comm.placement.plot import matplotlib_available, save_coactivation_png
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.collaboration import CollaborationProfiler, CollaborationStats
from c2r_comm.routing.trace import RoutingTrace, parse_layers, parse_range
from c2r_comm.topology import Topology

SYNTHETIC = dict(num_tokens=16384, num_experts=64, top_k=6, num_layers=4, num_clusters=8, in_cluster=0.8,
                 zipf_a=0.5, seed=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace .npz (e.g. ../shared/traces/deepseek_v2_lite_prefill_dev.npz)")
    src.add_argument("--synthetic", action="store_true",
                     help=f"profile a clustered synthetic trace instead ({SYNTHETIC})")
    p.add_argument("--prompts", default=None, help="prompt range A:B (Python slice, either end may be empty)")
    p.add_argument("--layers", default=None,
                   help="0-based trace layer indices: comma list and/or A:B ranges, e.g. 0,3,10:13 (default all)")
    p.add_argument("--topology", default="1x8", help="NODESxGPUS_PER_NODE for contiguous placement (default 1x8)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per profiler update")
    p.add_argument("--out", default=None, help="write the stats .npz here")
    p.add_argument("--heatmap", default=None, help="write a PNG heatmap of one layer's co-activation matrix "
                                                   "(needs matplotlib: pip install c2r-comm[plot])")
    p.add_argument("--heatmap-layer", type=int, default=None,
                   help="trace layer index of the heatmap (default: the first profiled layer)")
    p.add_argument("--plan", default=None, help="plan JSON (c2r-comm plan) whose placement orders the heatmap's "
                                                "experts (default: contiguous)")


def profile_trace(trace: RoutingTrace, topology: Topology, batch_tokens: int) -> CollaborationStats:
    plan = PlacementPlan.contiguous(trace.num_experts, topology.world_size)
    profiler = CollaborationProfiler(trace.num_layers, trace.num_experts, plan=plan, topology=topology)
    for block_TLK in trace.batches(batch_tokens):
        profiler.update_layers(block_TLK)
    return profiler.stats()


def format_table(stats: CollaborationStats, layers: list[int], nodes: int) -> str:
    cv, breadth, ent = stats.load_cv(), stats.breadth(0.8), stats.partner_entropy()
    gpus = stats.expected_gpus_per_token()
    head = f"{'layer':>5} {'tokens':>8} {'load_cv':>8} {'breadth80':>9} {'entropy_bits':>12} {'E[GPUs/tok]':>11}"
    head += f" {'E[nodes/tok]':>12}" if nodes > 1 else ""
    rows = [head]
    for i, l in enumerate(layers):
        row = (f"{l:>5} {stats.tokens_L[i]:>8} {cv[i]:>8.3f} {breadth[i].mean():>9.2f} {ent[i].mean():>12.3f} "
               f"{gpus[i]:>11.3f}")
        row += f" {stats.expected_nodes_per_token()[i]:>12.3f}" if nodes > 1 else ""
        rows.append(row)
    return "\n".join(rows)


def _heatmap_plan(args: argparse.Namespace, layers: list[int], topology: Topology, num_experts: int) -> PlacementPlan:
    """The placement ordering the heatmap: --plan's for the heatmap layer (checked against the trace and
    --topology), else contiguous."""
    hl = layers[0] if args.heatmap_layer is None else args.heatmap_layer
    if args.heatmap and hl not in layers:
        raise ValueError(f"--heatmap-layer {hl} was not profiled: allowed one of {layers}")
    if not (args.plan and args.heatmap):  # only the heatmap uses the plan
        return PlacementPlan.contiguous(num_experts, topology.world_size)
    try:
        plans = PlanFile.load(args.plan)
    except ValueError as exc:
        raise ValueError(f"--plan: {exc}") from None
    try:
        return plans.plan_for_layer(hl, topology, num_experts)
    except ValueError as exc:
        raise ValueError(f"--plan {args.plan}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    topology = Topology(*parse_topology(args.topology))
    if args.heatmap and not matplotlib_available():
        raise ValueError("--heatmap needs matplotlib, which is not installed: pip install 'c2r-comm[plot]'")
    if args.synthetic:
        trace = RoutingTrace.synthetic(**SYNTHETIC)
        source = "synthetic"
    else:
        trace = RoutingTrace.load(args.trace)
        source = args.trace
    if trace.num_experts % topology.world_size:
        raise ValueError(f"--topology {args.topology} has {topology.world_size} GPUs, which do not split "
                         f"{trace.num_experts} experts equally: allowed a world size dividing {trace.num_experts}")
    trace = trace.select_prompts(*parse_range(args.prompts))
    layers = parse_layers(args.layers or "all", trace.num_layers)
    trace = trace.select_layers(layers)
    heatmap_plan = _heatmap_plan(args, layers, topology, trace.num_experts)  # refused before any profiling
    stats = dataclasses.replace(profile_trace(trace, topology, args.batch_tokens), layer_ids=np.asarray(layers))
    print(f"{source}: {trace.num_prompts} prompts, {trace.num_tokens} tokens, {trace.num_experts} experts, "
          f"top-{trace.top_k}; contiguous placement on {topology} ({topology.world_size} GPUs)")
    print(format_table(stats, layers, topology.nodes))
    if args.out:
        stats.save(args.out)
        print(f"wrote {args.out}")
    if args.heatmap:
        hl = layers[0] if args.heatmap_layer is None else args.heatmap_layer
        save_coactivation_png(args.heatmap, stats.counts_LEE[layers.index(hl)], heatmap_plan, topology,
                              f"co-activations, layer {hl} ({'plan ' + args.plan if args.plan else 'contiguous'})")
        print(f"wrote {args.heatmap}")
    return 0
