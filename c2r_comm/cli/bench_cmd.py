"""`c2r-comm bench`: forward + backward of the MoE layer with each dispatcher; rows, bytes and times.

Run it plainly and it starts nodes*gpus_per_node local ranks itself (torchrun's environment
contract, rank_launcher.run_local_ranks; nodes are emulated on one machine: the topology decides
which links count as cross-node); under torchrun or mpirun it joins the launcher's world. A peer
that fails mid-run makes every surviving rank print one CommError line naming itself, the peers
and the phase, and exit with EXIT_COMM_ERROR (comm_failures.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from c2r_comm.bench.measure import BenchRecord, measure_layer
from c2r_comm.bench.peers import PEERS, bench_peers, peer_names
from c2r_comm.bench.overlap import OverlapResult, format_overlap, parse_overlap_degree
from c2r_comm.bench.phases import measure_phases
from c2r_comm.bench.profile import profile_layer
from c2r_comm.bench.rank_launcher import run_local_ranks, set_parent_death_signal
from c2r_comm.bench.report import format_phases, format_summary, format_table, write_json
from c2r_comm.bootstrap import init_distributed, launched, report_to_launcher, shutdown
from c2r_comm.comm_failures import EXIT_COMM_ERROR, CommError
from c2r_comm.config import Config, ConfigError, load_config, parse_topology, with_overrides
from c2r_comm.dispatch import DISPATCHERS
from c2r_comm.layer import DTYPES, build_moe_layer
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace, parse_layers, parse_range
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology

# flag -> dotted config field it overrides
OVERRIDES = {
    "tokens_per_rank": "run.tokens_per_rank", "iters": "run.iters", "warmup_iters": "run.warmup_iters",
    "dtype": "run.dtype", "seed": "run.seed", "device": "run.device", "timeout_s": "run.timeout_s",
    "hidden_size": "model.hidden_size", "ffn_hidden_size": "model.ffn_hidden_size",
    "num_experts": "model.num_experts", "top_k": "model.top_k", "plan": "placement.plan",
    "routing": "routing.kind", "capacity_factor": "routing.capacity_factor", "drop_policy": "routing.drop_policy",
    "backward_exchanges": "schedule.backward_exchanges",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--topology", help="NODESxGPUS_PER_NODE, e.g. 1x4 or 2x4")
    p.add_argument("--dispatcher", help=f"comma list of {sorted(DISPATCHERS)} (default: all)")
    p.add_argument("--trace", help="routing trace .npz; routing comes from it instead of the router")
    p.add_argument("--layer", default=None,
                   help="0-based trace layer index (also the plan's layer); with --trace also 'all' or a comma list")
    p.add_argument("--prompts", default=None,
                   help="A:B trace prompts (0-based, slice style) to deal tokens from, e.g. held-out 800:999")
    p.add_argument("--peers", default=None,
                   help=f"comma list of peers {list(PEERS)} run after our dispatchers in the same launch, as rows "
                        "(optional extra: pip install 'c2r-comm[peers]'; see c2r_comm/bench/peers.py)")
    p.add_argument("--json", help="write one record per dispatcher (with the resolved config) here")
    p.add_argument("--wire-interface", default=None, metavar="IFNAME",
                   help="network interface whose byte counters measure what crossed the node link in the timed "
                        "iterations (c2r-comm emulate passes its nodes' link)")
    p.add_argument("--phases", action="store_true",
                   help="also time each phase alone (layout, count exchange, send, experts, combine; forward and "
                        "backward) and print where the time goes")
    p.add_argument("--overlap-degree", default=None, type=parse_overlap_degree, metavar="C|auto",
                   help="also run the layer pipelined over C token chunks (or auto) and report exchange-only, "
                        "experts-only, serial and overlapped times and the overlap efficiency (implies --phases)")
    p.add_argument("--die-with-parent", action="store_true",
                   help="exit (SIGKILL) when the parent process dies (for launchers that do not arrange it; "
                        "bench's own launch does)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed iterations, profile 3 forward+backward steps per dispatcher with "
                        "torch.profiler: DIR/<dispatcher>_rank<r>.txt (ops by device time) and .json (Chrome trace)")
    for flag in OVERRIDES:
        kind = int if flag in ("tokens_per_rank", "iters", "warmup_iters", "seed", "hidden_size",
                               "ffn_hidden_size", "num_experts", "top_k") else \
            float if flag in ("timeout_s", "capacity_factor") else str
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=f"overrides {OVERRIDES[flag]}")
    p.add_argument("--pad-to-capacity", action="store_true", default=None,
                   help="sets routing.pad_to_capacity (with --capacity-factor): fixed rows per local expert")


def resolve_config(args: argparse.Namespace) -> tuple[Config, Optional[RoutingTrace], list[int]]:
    config = load_config(args.config) if args.config else Config()
    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items()}
    overrides["routing.pad_to_capacity"] = getattr(args, "pad_to_capacity", None)
    if args.topology:
        overrides["parallel.nodes"], overrides["parallel.gpus_per_node"] = parse_topology(args.topology)
    trace = None
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        if args.prompts:
            trace = trace.select_prompts(*parse_range(args.prompts))
        # The trace decides how many experts there are and how many each token picks.
        overrides.update({"model.num_experts": trace.num_experts, "model.top_k": trace.top_k})
    elif args.prompts:
        raise ConfigError("--prompts", args.prompts, "only together with --trace")
    if trace is not None:
        layers = parse_layers(args.layer or "0", trace.num_layers, flag="--layer")
    elif args.layer is None or args.layer.strip().isdigit():
        layers = [int(args.layer or 0)]
    else:
        raise ConfigError("--layer", args.layer, "one 0-based layer index (several layers need --trace)")
    if args.layer is not None:
        overrides["placement.layer"] = layers[0]
    config = with_overrides(config, overrides)
    if trace is not None:
        # Checked here, before any rank starts: a short trace would fail on the last ranks only.
        most = trace.num_tokens // config.parallel.world_size
        if config.run.tokens_per_rank > most:
            raise ConfigError("--tokens-per-rank", config.run.tokens_per_rank,
                              f"at most {most}: the selected trace has {trace.num_tokens} tokens for "
                              f"{config.parallel.world_size} ranks")
    plans_by_layer = check_plan(config, layers, "--plan" if args.plan else "placement.plan")
    if config.routing.pad_to_capacity and getattr(args, "overlap_degree", None) not in (None, 1):
        raise ConfigError("--overlap-degree", args.overlap_degree, "1 with routing.pad_to_capacity (capacity is per "
                          "layer batch, not per chunk)")
    if config.routing.capacity_factor is not None and getattr(args, "peers", None):
        raise ConfigError("--peers", args.peers, "no peers with routing.capacity_factor (the peers run dropless)")
    if getattr(args, "peers", None) and any(plan.replicas for plan in plans_by_layer.values()):
        raise ConfigError("--peers", args.peers, "no peers with a replica plan (the peers hold one copy per expert)")
    if not launched(os.environ):  # this process would start the ranks: refuse what they would fail on
        check_before_launch(config, args.json)
    return config, trace, layers


def check_plan(config: Config, layers: Sequence[int], flag: str = "placement.plan") -> dict[int, PlacementPlan]:
    """The plan file (if any) loads and holds a plan of every benchmarked layer for this topology and
    expert count: refused once, here, instead of on every rank after the launch. Returns those plans
    by layer ({} without a plan file)."""
    path = config.placement.plan
    if path is None:
        return {}
    try:
        plan_file = PlanFile.load(path)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    plans_by_layer = {}
    for layer in layers:
        try:
            plans_by_layer[layer] = plan_file.plan_for_layer(layer, _topology(config), config.model.num_experts)
        except ValueError as exc:
            raise ValueError(f"{flag} {path}: {exc}") from None
    return plans_by_layer


def check_before_launch(config: Config, json_path: Optional[str]) -> None:
    """What would otherwise fail only after the ranks started (or after the whole benchmark): GPUs for
    run.device 'cuda' (the launch puts every rank on this machine) and a writable --json path."""
    world = config.parallel.world_size
    if config.run.device == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world:  # the check bootstrap.pick_device makes on each rank, done before the launch
            raise ConfigError("run.device", "cuda", f"'cpu' or 'auto' (CPU when GPUs are short): 'cuda' needs one "
                                                    f"GPU per local rank, {world} local ranks but {gpus} GPUs")
    if json_path is not None:
        check_writable(json_path, "--json")


def check_writable(path: str, flag: str) -> None:
    """`path` can be written later (its missing folders created, as write_json does); tried with a
    temporary file in the nearest existing folder, which is removed again."""
    target = Path(path).resolve()
    if target.is_dir():
        raise ConfigError(flag, path, "a file path (this is a directory)")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(flag, path, "a writable file (this one is read-only)")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(flag, path, f"a path in a directory ({folder} is not a directory)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".c2r-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(flag, path, f"a path in a writable directory (cannot create a file in {folder}: "
                                      f"{exc.strerror})") from None


def dispatcher_names(args: argparse.Namespace) -> list[str]:
    if not args.dispatcher:
        return list(DISPATCHERS)
    names = [n.strip() for n in args.dispatcher.split(",") if n.strip()]
    bad = [n for n in names if n not in DISPATCHERS]
    if bad:
        raise ValueError(f"--dispatcher {bad} unknown: allowed {sorted(DISPATCHERS)}")
    return names


def _launch_local_ranks(world: int, argv: list[str]) -> int:
    """`world` ranks of this same command on this machine (rank_launcher.run_local_ranks): nothing of
    it outlives this process, a rank's failure ends the run with one line per rank that ended badly."""
    return run_local_ranks([sys.executable, "-m", "c2r_comm", *argv], world)


def run(args: argparse.Namespace) -> int:
    config, trace, layers = resolve_config(args)
    names = dispatcher_names(args)
    peers = peer_names(getattr(args, "peers", None))  # unknown or not installed: exit 2 before any rank starts
    world = config.parallel.world_size
    if world > 1 and not launched(os.environ):
        return _launch_local_ranks(world, args.argv)
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
    groups = build_process_groups(_topology(config), config.run.timeout_s)
    records = [r for layer in layers for r in
               bench_all(with_overrides(config, {"placement.layer": layer}), trace, names, groups, ctx.device,
                         show=ctx.rank == 0, phases=args.phases, network_interface=args.wire_interface,
                         peers=peers, profile_dir=args.profile, overlap_degree=args.overlap_degree)]
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


def _topology(config: Config) -> Topology:
    return Topology(config.parallel.nodes, config.parallel.gpus_per_node)


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
