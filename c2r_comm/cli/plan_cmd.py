"""`c2r-comm plan`: fit a placement per layer on some prompts of a trace, score it on others, print a
per-layer table next to contiguous and occult_greedy, write the plan JSON and a PNG."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from c2r_comm.config import ConfigError, parse_topology
from c2r_comm.placement.hypergraph import PARTITIONERS, PartitionSettings
from c2r_comm.placement.planners import METHODS, PlannerOptions
from c2r_comm.placement.replicas import COPY_LOAD_CAP, PINNED_BLOCKS, PINNED_LOAD_CAP, REPLICA_LOAD_TOLERANCE
from c2r_comm.placement.trace_plan import TracePlanResult, plan_trace
from c2r_comm.routing.trace import RoutingTrace, parse_layers, parse_range
from c2r_comm.topology import Topology


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="routing trace .npz (expert_ids [tokens, layers, k])")
    p.add_argument("--topology", required=True, help="NxG: N nodes of G GPUs each, e.g. 1x8 or 2x4")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--layers", default="all",
                   help="'all', or 0-based trace layer indices: a comma list and/or A:B ranges (e.g. 0,5,12:14)")
    p.add_argument("--fit-prompts", default=None, help="A:B prompt positions to fit on (default: first 80%%)")
    p.add_argument("--eval-prompts", default=None, help="C:D prompt positions to score on (default: after fit)")
    p.add_argument("--load-tolerance", type=float, default=1.10, help="per-GPU token load max/mean on fit tokens")
    p.add_argument("--no-refine", action="store_true", help="skip the load refinement (raw planner output)")
    p.add_argument("--hierarchical", choices=("auto", "yes", "no"), default="auto",
                   help="hypergraph: nodes first, then GPUs (auto: when nodes > 1)")
    p.add_argument("--inter-node-cost", type=float, default=4.0,
                   help="refinement: one more node per token costs this many more GPUs")
    p.add_argument("--polish-kicks", type=int, default=0,
                   help="iterated local search rounds on the exact objective after refinement (slower; 0: off)")
    p.add_argument("--replica-slots", type=int, default=0, metavar="R",
                   help="R replica slots per GPU, chosen to cut GPUs (and nodes) per token (0: no replicas)")
    p.add_argument("--replica-load-tolerance", type=float, default=REPLICA_LOAD_TOLERANCE,
                   help="the replica selection's bound on the modelled per-GPU load (an expert's fit load split "
                        "equally over its copies; default %(default)s: the realised load is the pinned cap's and "
                        "the copy choice's job)")
    p.add_argument("--replica-pinned-load-cap", type=_cap_or_none, default=PINNED_LOAD_CAP, metavar="X|none",
                   help="replicas first go to GPUs whose fit load of single-copy experts exceeds X x the mean "
                        "(load no copy choice can move; default %(default)s; none: off)")
    p.add_argument("--replica-pinned-blocks", type=int, default=PINNED_BLOCKS, metavar="N",
                   help="cut the fit tokens (prompt order) into N blocks; a GPU's pinned load is its worst block's, "
                        "so experts whose popularity drifts between prompt sets get copies (default %(default)s)")
    p.add_argument("--copy-load-cap", type=_cap_or_none, default=COPY_LOAD_CAP, metavar="X|none",
                   help="written into replica plans: the dispatch's copy choice trades cover for balance when a "
                        "batch's rows per GPU exceed X x the mean (default %(default)s; none: load breaks ties only)")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="auto")
    p.add_argument("--ip-runs", type=int, default=1,
                   help="Mt-KaHyPar initial-partitioning runs (default 1; 20 = its deterministic preset unchanged)")
    p.add_argument("--threads", type=int, default=2, help="Mt-KaHyPar threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--png", default=None, help="PNG to write (default: --out with .png)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--png-layer", type=int, default=None, help="trace layer drawn in the PNG (default: first)")


def _cap_or_none(text: str) -> Optional[float]:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def _prompt_ranges(args: argparse.Namespace, num_prompts: int) -> tuple[tuple, tuple]:
    fit = parse_range(args.fit_prompts) if args.fit_prompts else (0, int(0.8 * num_prompts))
    if args.eval_prompts:
        ev = parse_range(args.eval_prompts)
    else:
        stop = range(num_prompts)[slice(*fit)].stop
        if stop >= num_prompts:
            raise ValueError("the fit prompts reach the end of the trace: give --eval-prompts (scoring on the fit "
                             "prompts would flatter every planner)")
        ev = (stop, None)
    fit_idx, ev_idx = set(range(num_prompts)[slice(*fit)]), set(range(num_prompts)[slice(*ev)])
    if fit_idx & ev_idx:
        print(f"c2r-comm plan: warning: fit and eval prompts overlap in {len(fit_idx & ev_idx)} prompts: eval scores "
              "are optimistic", file=sys.stderr)
    return fit, ev


def format_table(result: TracePlanResult, topology: Topology) -> str:
    """Metric groups side by side, one column per method inside each group; last row: layer mean."""
    methods = list(result.reports[0].metrics)
    groups = [("GPUs/token", "gpus_per_token"), ("remote GPUs", "remote_gpus_per_token")]
    if topology.nodes > 1:
        groups += [("nodes/token", "nodes_per_token"), ("remote nodes", "remote_nodes_per_token")]
    groups += [("GPU load max/mean", "gpu_load_max_over_mean")]
    short = {"hypergraph": "hyper", "occult_greedy": "occult", "contiguous": "contig", "random": "random"}
    cell_w = 7
    group_w = len(methods) * (cell_w + 1) - 1
    top = "layer |" + "|".join(f" {g:^{group_w}} " for g, _ in groups)
    sub = "      |" + "|".join(" " + " ".join(f"{short[m]:>{cell_w}}" for m in methods) + " " for _ in groups)
    rule = "-" * len(top)

    def row(label: str, value) -> str:
        return f"{label:>5} |" + "|".join(" " + " ".join(f"{value(m, f):>{cell_w}.3f}" for m in methods) + " "
                                          for _, f in groups)

    lines = [top, sub, rule]
    for r in result.reports:
        lines.append(row(str(r.layer), lambda m, f, r=r: getattr(r.metrics[m], f)))
    n = len(result.reports)
    lines += [rule, row("mean", lambda m, f: sum(getattr(r.metrics[m], f) for r in result.reports) / n)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    topology = Topology(*parse_topology(args.topology))
    trace = RoutingTrace.load(args.trace)
    layers = parse_layers(args.layers, trace.num_layers)
    if trace.num_experts % topology.world_size:  # before any planning starts (and its progress bar)
        raise ConfigError("--topology", args.topology, f"a GPU count that divides the trace's {trace.num_experts} "
                          f"experts ({topology.world_size} GPUs do not)")
    fit_range, eval_range = _prompt_ranges(args, trace.num_prompts)
    fit, evaluation = trace.select_prompts(*fit_range), trace.select_prompts(*eval_range)
    png: Optional[Path] = None if args.no_png else Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    if png is not None:
        from c2r_comm.placement.plot import matplotlib_available  # noqa: PLC0415
        if not matplotlib_available():
            if args.png is not None:
                raise ValueError(f"--png {args.png} needs matplotlib: pip install c2r-comm[plot] (or drop --png)")
            print("note: matplotlib is not installed (pip install c2r-comm[plot]); skipping the PNG", file=sys.stderr)
            png = None
    hierarchical = {"auto": None, "yes": True, "no": False}[args.hierarchical]
    options = PlannerOptions(load_tolerance=args.load_tolerance, refine=not args.no_refine,
                             hierarchical=hierarchical, inter_node_cost=args.inter_node_cost, seed=args.seed,
                             polish_kicks=args.polish_kicks, replica_slots=args.replica_slots,
                             replica_load_tolerance=args.replica_load_tolerance,
                             replica_pinned_load_cap=args.replica_pinned_load_cap,
                             replica_pinned_blocks=args.replica_pinned_blocks, copy_load_cap=args.copy_load_cap,
                             partition=PartitionSettings(args.partitioner, args.seed, args.threads, args.ip_runs))
    fmt = lambda r: f"{'' if r[0] is None else r[0]}:{'' if r[1] is None else r[1]}"
    info = {"trace": str(args.trace), "fit_prompts": fmt(fit_range), "eval_prompts": fmt(eval_range)}
    started = time.perf_counter()
    with tqdm(total=len(layers), desc="planning layers", unit="layer", file=sys.stderr) as bar:
        result = plan_trace(fit, evaluation, topology, args.method, layers, options, fit_info=info,
                            on_layer=lambda done, total: bar.update(done - bar.n))
    result.plan_file.save(args.out)
    print(f"trace {args.trace}: fit prompts {info['fit_prompts']} ({fit.num_tokens} tokens), eval prompts "
          f"{info['eval_prompts']} ({evaluation.num_tokens} tokens), topology {topology}, method {args.method}")
    print("metrics on the eval prompts:")
    print(format_table(result, topology))
    unmet = [(r.layer, r.plans[args.method].balance.message) for r in result.reports
             if r.plans[args.method].balance is not None and not r.plans[args.method].balance.met]
    for layer, msg in unmet:
        print(f"layer {layer}: {msg}")
    balances = [r.plans[args.method].balance for r in result.reports if r.plans[args.method].balance is not None]
    if balances:
        print(f"{args.method} GPU load max/mean on the fit tokens: worst layer "
              f"{max(b.load_max_over_mean for b in balances):.3f}, tolerance {args.load_tolerance:.3f} met in "
              f"{sum(b.met for b in balances)}/{len(balances)} layers")
    partitioner = result.plan_file.fit.get("partitioner")
    print(f"planned {len(layers)} layers with {args.method} in {result.plan_seconds:.1f} s"
          + (f" (partitioner: {', '.join(partitioner)})" if partitioner else "")
          + f"; wall time incl. comparisons {time.perf_counter() - started:.1f} s; wrote {args.out}")
    if png is not None:
        from c2r_comm.placement.plot import save_placement_png  # noqa: PLC0415
        layer = args.png_layer if args.png_layer is not None else layers[0]
        report = next((r for r in result.reports if r.layer == layer), None)
        if report is None:
            raise ValueError(f"--png-layer {layer} is invalid: allowed one of the planned layers {layers}")
        per_layer = {m: [(r.layer, r.metrics[m]) for r in result.reports] for m in report.metrics}
        save_placement_png(png, layer, {m: p.plan for m, p in report.plans.items()}, evaluation.layer(layer),
                           topology, per_layer, args.method)
        print(f"wrote {png}")
    return 0
