"""`c2r-comm simulate`: bytes per link class and predicted exchange time of each dispatcher and
placement on N nodes x G GPUs, from a routing trace replayed over the ranks (no communication).

Bytes come from every rank's `Dispatcher.layout_for` (bench/world_layout.py), times from the
alpha-beta model (bench/cost_model.py) with a hardware profile (bench/hardware.py). Tokens are
dealt as bench/replay.py describes: rank r takes stream tokens r*T .. r*T+T-1 of the selected
prompts repeated (trace row j mod N), with expert copies when the expert count does not divide
the GPU count. Every input is checked before any layout or planning work starts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from c2r_comm.bench.cost_model import ExchangeTime, predict
from c2r_comm.bench.hardware import HardwareProfile, load_profile
from c2r_comm.bench.replay import Replay, copies_of, resolve_expert_copies
from c2r_comm.bench.world_layout import lay_out_world
from c2r_comm.config import DTYPES, ConfigError, parse_topology
from c2r_comm.dispatch import DISPATCHERS, CommStats
from c2r_comm.layer import DTYPES as TORCH_DTYPES
from c2r_comm.placement.planners import METHODS, PlannerOptions, plan_layer
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace, parse_layers, parse_range
from c2r_comm.topology import Topology


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="routing trace .npz (expert_ids [tokens, layers, k])")
    p.add_argument("--topology", required=True, action="append",
                   help="NxG (N nodes of G GPUs); a comma list or repeated for a sweep, e.g. 2x4,8x8,128x8")
    p.add_argument("--plan", default=None, help="plan JSON from `c2r-comm plan` (its topology only), an extra placement")
    p.add_argument("--placement", default="contiguous,occult_greedy",
                   help=f"comma list of {METHODS} planned per layer on the replayed tokens ('' with --plan: none)")
    p.add_argument("--dispatcher", default=",".join(DISPATCHERS), help=f"comma list of {sorted(DISPATCHERS)}")
    p.add_argument("--layer", default="0", help="0-based trace layer, 'all', or a comma list / A:B ranges")
    p.add_argument("--prompts", default=None, help="A:B trace prompts (slice style) whose tokens are dealt")
    p.add_argument("--fit-prompts", default=None,
                   help="A:B prompts the placements are fitted on (default: the dealt tokens themselves)")
    p.add_argument("--tokens-per-rank", type=int, default=4096,
                   help="tokens each rank routes per layer; the prompts' tokens are dealt in order, repeated if short")
    p.add_argument("--hidden-size", type=int, default=2048, help="model hidden size (DeepSeek-V2-Lite: 2048)")
    p.add_argument("--dtype", default="bfloat16", help=f"one of {DTYPES}: token rows and routing weights")
    p.add_argument("--weight-dtype", default=None,
                   help="routing weights' dtype (default: --dtype, as the layer's router is cast to it; "
                        "`bench --trace` sends float32 weights)")
    p.add_argument("--expert-copies", type=int, default=None,
                   help="simulate S copies of the trace's experts (default: smallest S with S*E divisible by GPUs); "
                        "the copies are S disjoint groups of experts, so with fewer than top-k GPUs per group the "
                        "results are optimistic (warned)")
    p.add_argument("--hardware", default="h100_nvlink_ib400", help="profile name or path to a profile YAML")
    p.add_argument("--inter-node-gbit", type=float, default=None, help="override the profile's inter-node rate (> 0)")
    p.add_argument("--intra-node-gbit", type=float, default=None, help="override the profile's intra-node rate (> 0)")
    p.add_argument("--seed", type=int, default=0, help="planner seed (random placement)")
    p.add_argument("--json", default=None, help="write every record (per layer: stats and stage times) here")
    p.add_argument("--plot", default=None, help="PNG of predicted fwd+bwd exchange time vs GPU count")


@dataclass(frozen=True)
class Setup:
    """Everything the run needs, all checked."""

    trace: RoutingTrace  # the dealt prompts
    fit: Optional[RoutingTrace]  # --fit-prompts
    layers: tuple[int, ...]
    worlds: tuple[tuple[Topology, int], ...]  # (topology, expert copies)
    dispatchers: tuple[str, ...]
    methods: tuple[str, ...]
    plan_file: Optional[PlanFile]
    profile: HardwareProfile
    dtype: torch.dtype
    weight_dtype: torch.dtype


def _names(text: str, allowed, flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or len(set(names)) != len(names):
        raise ConfigError(flag, text, f"a comma list of distinct names from {sorted(allowed)}")
    return names


def check_inputs(args: argparse.Namespace) -> Setup:
    """Every check, before any layout work: a ValueError names the flag, the value and what is allowed."""
    topologies = [Topology(*parse_topology(t)) for text in args.topology for t in text.split(",") if t.strip()]
    if not topologies:
        raise ConfigError("--topology", args.topology, "at least one NxG")
    dispatchers = _names(args.dispatcher, DISPATCHERS, "--dispatcher")
    methods = _names(args.placement, METHODS, "--placement")
    if not dispatchers or not (methods or args.plan):
        raise ConfigError("--dispatcher/--placement", f"{args.dispatcher!r}/{args.placement!r}",
                          "at least one dispatcher and one placement (or --plan)")
    for flag, v in (("--tokens-per-rank", args.tokens_per_rank), ("--hidden-size", args.hidden_size)):
        if v < 1:
            raise ConfigError(flag, v, "an integer >= 1")
    for flag, v in (("--dtype", args.dtype), ("--weight-dtype", args.weight_dtype or args.dtype)):
        if v not in TORCH_DTYPES:
            raise ConfigError(flag, v, f"one of {sorted(TORCH_DTYPES)}")
    profile = load_profile(args.hardware).with_rates(args.inter_node_gbit, args.intra_node_gbit)
    if args.plot:
        from c2r_comm.placement.plot import matplotlib_available  # noqa: PLC0415
        if not matplotlib_available():
            raise ConfigError("--plot", args.plot, "a PNG path once matplotlib is installed: pip install c2r-comm[plot]")
    full = RoutingTrace.load(args.trace)
    layers = tuple(parse_layers(args.layer, full.num_layers, flag="--layer"))
    trace = full.select_prompts(*parse_range(args.prompts)) if args.prompts else full
    fit = full.select_prompts(*parse_range(args.fit_prompts)) if args.fit_prompts else None
    worlds = tuple((t, resolve_expert_copies(args.expert_copies, trace.num_experts, t.world_size, str(t)))
                   for t in topologies)
    plan_file = None
    if args.plan:
        plan_file = PlanFile.load(args.plan)
        for topo, copies in worlds:
            for layer in layers:
                try:
                    plan_file.plan_for_layer(layer, topo, trace.num_experts * copies)
                except ValueError as exc:
                    raise ValueError(f"--plan {args.plan}: {exc}") from None
    return Setup(trace, fit, layers, worlds, dispatchers, methods, plan_file, profile, TORCH_DTYPES[args.dtype],
                 TORCH_DTYPES[args.weight_dtype or args.dtype])


@dataclass(frozen=True)
class LayerResult:
    layer: int
    dispatch: CommStats  # world totals
    combine: CommStats
    time: ExchangeTime


@dataclass(frozen=True)
class Record:
    topology: Topology
    experts: int  # simulated (trace experts x copies)
    copies: int
    dispatcher: str
    placement: str
    tokens: int  # per layer, all ranks
    layers: tuple[LayerResult, ...]

    def total(self, attr: str) -> float:
        return sum(getattr(l.time, attr) for l in self.layers)

    def stats(self) -> tuple[CommStats, CommStats]:
        return sum((l.dispatch for l in self.layers), CommStats()), sum((l.combine for l in self.layers), CommStats())

    def bottleneck(self) -> str:
        slowest = max((l.time.slowest_stage for l in self.layers), key=lambda s: s.seconds)
        link = slowest.bottleneck
        if link.seconds == 0.0:
            return "-"
        part = "latency" if link.latency_s > link.transfer_s else "bandwidth"
        return f"{link.link_class} {slowest.stage} {slowest.direction} {link.unit} ({part})"

    def to_json(self) -> dict[str, Any]:
        d, c = self.stats()
        return {"topology": str(self.topology), "gpus": self.topology.world_size, "experts": self.experts,
                "expert_copies": self.copies, "dispatcher": self.dispatcher, "placement": self.placement,
                "tokens_per_layer": self.tokens, "dispatch": asdict(d), "combine": asdict(c),
                "copies_per_token_off_rank": d.rows_off_rank / (self.tokens * len(self.layers)),
                "same_node_mb": (d.bytes_same_node + c.bytes_same_node) / 1e6,
                "cross_node_mb": (d.bytes_cross_node + c.bytes_cross_node) / 1e6,
                "dispatch_s": self.total("dispatch_s"), "combine_s": self.total("combine_s"),
                "forward_s": self.total("forward_s"), "backward_s": self.total("backward_s"),
                "fwd_bwd_s": self.total("fwd_bwd_s"), "bottleneck": self.bottleneck(),
                "layers": [{"layer": l.layer, "dispatch": asdict(l.dispatch), "combine": asdict(l.combine),
                            "time": l.time.to_json()} for l in self.layers]}


def placements_for(setup: Setup, replay: Replay, topo: Topology, layer: int, seed: int) -> dict[str, PlacementPlan]:
    """Each placement of one layer: planned on the replayed tokens (or the fit prompts), or the plan file's."""
    out: dict[str, PlacementPlan] = {}
    if setup.methods:
        fit_ids = replay.planner_ids() if setup.fit is None else \
            copies_of(setup.fit.layer(layer), replay.num_experts, replay.copies)
        for m in setup.methods:
            out[m] = plan_layer(m, fit_ids, replay.simulated_experts, topo, PlannerOptions(seed=seed)).plan
    if setup.plan_file is not None:
        out[f"plan:{setup.plan_file.method}"] = setup.plan_file.plan_for_layer(layer, topo, replay.simulated_experts)
    return out


def simulate(setup: Setup, tokens_per_rank: int, hidden_size: int, seed: int) -> list[Record]:
    placements = len(setup.methods) + (setup.plan_file is not None)
    work = sum(t.world_size for t, _ in setup.worlds) * len(setup.layers) * placements * len(setup.dispatchers)
    bar = tqdm(total=work, desc="laying out ranks", unit="rank", file=sys.stderr, disable=None, leave=False)
    records = []
    E = setup.trace.num_experts
    for topo, copies in setup.worlds:
        results: dict[tuple[str, str], list[LayerResult]] = {}
        for layer in setup.layers:
            replay = Replay(setup.trace.layer(layer), E, topo.world_size, tokens_per_rank, copies)
            for placement, plan in placements_for(setup, replay, topo, layer, seed).items():
                for name in setup.dispatchers:
                    world = lay_out_world(name, topo, plan, hidden_size, setup.dtype, replay.rank_ids,
                                          on_rank=lambda r: bar.update(1), weight_dtype=setup.weight_dtype)
                    d, c = world.world_stats()
                    results.setdefault((name, placement), []).append(
                        LayerResult(layer, d, c, predict(world, setup.profile)))
        for (name, placement), layers in results.items():
            records.append(Record(topo, E * copies, copies, name, placement, topo.world_size * tokens_per_rank,
                                  tuple(layers)))
    bar.close()
    return records


def format_table(records: list[Record]) -> str:
    head = ["topology", "GPUs", "experts", "dispatcher", "placement", "copies/token off-rank", "same-node MB",
            "cross-node MB", "dispatch ms", "combine ms", "fwd+bwd exch ms", "bottleneck (slowest stage)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        j = r.to_json()
        cells = [str(r.topology), str(r.topology.world_size), str(r.experts), r.dispatcher, r.placement,
                 f"{j['copies_per_token_off_rank']:.3f}", f"{j['same_node_mb']:.1f}", f"{j['cross_node_mb']:.1f}",
                 f"{j['dispatch_s'] * 1e3:.3f}", f"{j['combine_s'] * 1e3:.3f}", f"{j['fwd_bwd_s'] * 1e3:.3f}",
                 j["bottleneck"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(path: str, records: list[Record], title: str) -> None:
    """Predicted fwd+bwd exchange time vs GPU count, one line per dispatcher x placement."""
    from c2r_comm.placement.plot import pyplot  # noqa: PLC0415 (matplotlib only when plotting)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault((r.dispatcher, r.placement), []).append((r.topology.world_size, r.total("fwd_bwd_s") * 1e3))
    for (name, placement), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} / {placement}")
    ax.set_xscale("log", base=2)
    gpus = sorted({r.topology.world_size for r in records})
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.minorticks_off()
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted fwd+bwd exchange time per iteration (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    setup = check_inputs(args)
    started = time.perf_counter()
    records = simulate(setup, args.tokens_per_rank, args.hidden_size, args.seed)
    elapsed = time.perf_counter() - started
    p = setup.profile
    N = setup.trace.num_tokens
    print(f"trace {args.trace}: {N} tokens (prompts {args.prompts or 'all'}), layers {list(setup.layers)}, "
          f"{args.tokens_per_rank} tokens per rank, hidden {args.hidden_size} {args.dtype}, routing weights "
          f"{args.weight_dtype or args.dtype}")
    print(f"hardware {p.name}: intra-node {p.intra_node_gbit:g} Gbit/s {p.intra_node_link}, inter-node "
          f"{p.inter_node_gbit:g} Gbit/s {p.inter_node_link} ({p.description})")
    for topo, copies in setup.worlds:
        dealt = topo.world_size * args.tokens_per_rank
        notes = [f"each trace token dealt {dealt / N:.2f} times on average"] if dealt > N else []
        if copies > 1:
            notes.append(f"{copies} expert copies ({setup.trace.num_experts * copies} experts)")
            span, k = topo.world_size / copies, setup.trace.top_k
            if span < k:  # the copies are disjoint groups: a placement that keeps one together caps the GPUs
                notes.append(f"WARNING: one copy's {setup.trace.num_experts} experts fill {span:g} GPUs, fewer than "
                             f"top-{k}: here a token touches at most {span:g} GPUs under contiguous placement (and a "
                             f"plan may find the same), a real model on {topo.world_size} GPUs up to {k}, so the dedup "
                             "and hierarchical rows are optimistic; a GPU count sharing more factors with "
                             f"{setup.trace.num_experts} avoids this")
        if notes:
            print(f"note: {topo}: " + "; ".join(notes))
    print("per iteration over the selected layers; MB: all ranks, dispatch + combine; times: alpha-beta model, "
          "serial stages, slowest rank")
    print(format_table(records))
    print(f"simulated in {elapsed:.1f} s")
    if args.json:
        doc = {"trace": str(args.trace), "prompts": args.prompts, "fit_prompts": args.fit_prompts,
               "layers": list(setup.layers), "tokens_per_rank": args.tokens_per_rank,
               "hidden_size": args.hidden_size, "dtype": args.dtype, "weight_dtype": args.weight_dtype or args.dtype,
               "hardware": p.to_json(),
               "seconds": elapsed, "records": [r.to_json() for r in records]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        save_plot(args.plot, records, f"{Path(args.trace).name} layers {list(setup.layers)}, {args.tokens_per_rank} "
                                      f"tokens/rank, hidden {args.hidden_size} {args.dtype}, {p.name}")
        print(f"wrote {args.plot}")
    return 0
