"""`c2r-comm bench`: forward + backward of the MoE layer with each dispatcher; rows, bytes and times.

Run it plainly and it starts nodes*gpus_per_node local ranks itself (torchrun's environment
contract, rank_launcher.run_local_ranks; nodes are emulated on one machine: the topology decides
which links count as cross-node); under torchrun or mpirun it joins the launcher's world. A peer
that fails mid-run makes every surviving rank print one CommError line naming itself, the peers
and the phase, and exit with EXIT_COMM_ERROR (comm_failures.py).

This module is the launching side: arguments, every check that can fail before a rank starts, and
the local launch. It imports no torch, so a launch starts its ranks without importing it first;
what each rank runs is in bench_rank.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from c2r_comm.bench.peers import PEERS, peer_names
from c2r_comm.bench.rank_launcher import run_local_ranks
from c2r_comm.config import DISPATCHERS, OVERLAP_AUTO, Config, ConfigError, load_config, parse_topology, with_overrides
from c2r_comm.launch_env import launched
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace, parse_layers, parse_range
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


def parse_overlap_degree(text: str) -> Union[int, str]:
    """--overlap-degree: an integer 1..64 or 'auto' (an argparse type: its error message is shown)."""
    if text == OVERLAP_AUTO:
        return text
    if text.isdigit() and 1 <= int(text) <= 64:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: allowed an integer 1..64 or '{OVERLAP_AUTO}'")


def topology_of(config: Config) -> Topology:
    return Topology(config.parallel.nodes, config.parallel.gpus_per_node)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--topology", help="NODESxGPUS_PER_NODE, e.g. 1x4 or 2x4")
    p.add_argument("--dispatcher", help=f"comma list of {sorted(DISPATCHERS)} (default: all)")
    p.add_argument("--trace", help="routing trace .npz; routing comes from it instead of the router")
    p.add_argument("--layer", default=None,
                   help="0-based trace layer index (also the plan's and the c2r lists' layer; default: the "
                        "config's placement.layer, 0); with --trace also 'all' or a comma list")
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
        for flag, fixed in (("num_experts", trace.num_experts), ("top_k", trace.top_k)):
            given = getattr(args, flag, None)
            if given is not None and given != fixed:
                raise ConfigError("--" + flag.replace("_", "-"), given, f"{fixed} or left out: the trace routes "
                                  f"over {trace.num_experts} experts, top-{trace.top_k}")
        overrides.update({"model.num_experts": trace.num_experts, "model.top_k": trace.top_k})
    elif args.prompts:
        raise ConfigError("--prompts", args.prompts, "only together with --trace")
    layers: list[int] = []
    if args.layer is not None:
        if trace is not None:
            layers = parse_layers(args.layer, trace.num_layers, flag="--layer")
        elif args.layer.strip().isdigit():
            layers = [int(args.layer)]
        else:
            raise ConfigError("--layer", args.layer, "one 0-based layer index (several layers need --trace)")
        overrides["placement.layer"] = layers[0]
    config = load_config(args.config, overrides) if args.config else with_overrides(Config(), overrides)
    if not layers:  # no --layer: the config's placement.layer (default 0), for the trace as for the plan
        layers = [config.placement.layer] if trace is None else \
            parse_layers(str(config.placement.layer), trace.num_layers, flag="placement.layer")
    if args.layer is not None and trace is None and not config.placement.plan and config.routing.kind != "c2r":
        raise ConfigError("--layer", args.layer, "only with --trace, a plan (--plan or placement.plan) or c2r "
                          "routing (whose collaborator lists are per layer): otherwise the router routes, the "
                          "placement is contiguous and a layer index changes nothing")
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
            plans_by_layer[layer] = plan_file.plan_for_layer(layer, topology_of(config), config.model.num_experts)
        except ValueError as exc:
            raise ValueError(f"{flag} {path}: {exc}") from None
    return plans_by_layer


def check_before_launch(config: Config, json_path: Optional[str]) -> None:
    """What would otherwise fail only after the ranks started (or after the whole benchmark): GPUs for
    run.device 'cuda' (the launch puts every rank on this machine) and a writable --json path."""
    world = config.parallel.world_size
    if config.run.device == "cuda":
        import torch  # only for this check: a CPU run's launch imports no torch
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
    return _run_this_rank(args, config, trace, layers, names, peers)


def _run_this_rank(args: argparse.Namespace, config: Config, trace: Optional[RoutingTrace], layers: list[int],
                   names: list[str], peers: Sequence[str]) -> int:
    """This process is a rank (launched, or a world of one): only now torch and the layer are imported."""
    from c2r_comm.cli.bench_rank import run_rank
    return run_rank(args, config, trace, layers, names, peers)


