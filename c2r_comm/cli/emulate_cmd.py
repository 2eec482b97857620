"""`c2r-comm emulate --nodes N --gpus-per-node G [--inter-node-gbit R] -- bench ...`: run a command's
ranks on N emulated nodes of this machine, with a real (optionally shaped) link between nodes.

One network namespace per node, veth pairs through a bridge, `tc tbf` shaping (see
c2r_comm/bench/netns.py); G ranks per node start inside their node's namespace with torchrun's
environment (c2r_comm/bench/rank_launcher.py), so gloo's TCP between nodes really crosses the
shaped link while ranks of a node talk over its loopback. Everything created is removed when the
command ends, fails, or this process gets SIGINT/SIGTERM; namespaces left by a SIGKILLed run are
removed by the next one. Without root or iproute2 it says why and runs the command plainly over
loopback (every "node" then shares one unshaped loopback).

Inputs are checked before anything is created: rates, the topology, and for `bench` the whole
bench configuration (trace, plan, layers) exactly as `c2r-comm bench` checks it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from c2r_comm.bench import netns
from c2r_comm.bench.rank_launcher import (Interrupted, install_signal_handlers, restore_signal_handlers,
                                          signals_blocked, start_ranks, supervise)
from c2r_comm.config import ConfigError, parse_topology

SUPPORTED = ("bench",)  # commands whose ranks join a torchrun-style world


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, help="emulated nodes (one network namespace each)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks per emulated node")
    p.add_argument("--inter-node-gbit", type=float, default=None,
                   help="shape every node's link to this many Gbit/s each way (default: unshaped)")
    p.add_argument("--intra-node-gbit", type=float, default=None,
                   help="shape the loopback inside each node (default: unshaped)")
    p.add_argument("inner", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help=f"-- then a c2r-comm command and its arguments; one of {SUPPORTED}")


def _check_rate(flag: str, value: Optional[float]) -> None:
    if value is not None and not (value > 0 and value < float("inf")):
        raise ConfigError(flag, value, "a link rate in Gbit/s > 0 (omit it for an unshaped link)")


def prepare_command(args: argparse.Namespace) -> tuple[list[str], Optional[str]]:
    """Validate everything; return the inner argv (topology, CPU device and the node link's
    interface filled in) and the bench's --json path."""
    if args.nodes < 1 or args.nodes > netns.MAX_NODES:
        raise ConfigError("--nodes", args.nodes, f"an integer 1..{netns.MAX_NODES}")
    if args.gpus_per_node < 1:
        raise ConfigError("--gpus-per-node", args.gpus_per_node, "an integer >= 1")
    _check_rate("--inter-node-gbit", args.inter_node_gbit)
    _check_rate("--intra-node-gbit", args.intra_node_gbit)
    inner = list(args.inner)
    if inner and inner[0] == "--":
        inner = inner[1:]
    if not inner or inner[0] not in SUPPORTED:
        raise ConfigError("command", " ".join(inner) or "(none)", f"`-- <command> [args]` with command one of {SUPPORTED}")
    from c2r_comm.cli import parser_for
    from c2r_comm.bench.peers import peer_names
    from c2r_comm.cli.bench_cmd import dispatcher_names, resolve_config
    bench_args = parser_for(inner).parse_args(inner)
    topo = (args.nodes, args.gpus_per_node)
    if bench_args.topology is None:
        inner += ["--topology", f"{args.nodes}x{args.gpus_per_node}"]
    elif parse_topology(bench_args.topology) != topo:
        raise ConfigError("--topology", bench_args.topology,
                          f"{args.nodes}x{args.gpus_per_node} (the emulated --nodes x --gpus-per-node), or leave it out")
    # Ranks of all emulated nodes share this machine's GPUs: NCCL would connect them through shared
    # memory or P2P and never touch the namespaces' links. Emulated nodes are CPU ranks over gloo.
    if bench_args.device not in (None, "cpu"):
        raise ConfigError("--device", bench_args.device, "'cpu' (emulated nodes run gloo over their links)")
    if bench_args.wire_interface is not None:
        raise ConfigError("--wire-interface", bench_args.wire_interface, "left out: emulate sets its nodes' link")
    inner += ["--device", "cpu"]
    bench_args = parser_for(inner).parse_args(inner)
    resolve_config(bench_args)  # trace, plan, layers, sizes: refused here, before anything exists
    dispatcher_names(bench_args)
    peer_names(bench_args.peers)
    if bench_args.json is not None:
        Path(bench_args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
    return inner, bench_args.json


def _plain_run(inner: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "c2r_comm", *inner])


def run(args: argparse.Namespace) -> int:
    inner, json_path = prepare_command(args)
    try:
        netns.check_available()
    except netns.EmulationUnavailable as exc:
        print(f"c2r-comm emulate: no emulated nodes ({exc}); running `c2r-comm {' '.join(inner)}` plainly over "
              f"loopback: every node shares one unshaped link", file=sys.stderr)
        code = _plain_run(inner)
        _annotate_json(json_path, None)
        return code
    stale = netns.remove_stale()
    if stale:
        print(f"c2r-comm emulate: removed namespaces left by runs that no longer exist: {stale}", file=sys.stderr)
    previous = install_signal_handlers()
    em = None
    try:
        em = netns.create_nodes(args.nodes, args.inter_node_gbit, args.intra_node_gbit)
        print(f"c2r-comm emulate: {args.nodes} nodes x {args.gpus_per_node} ranks in namespaces "
              f"{em.namespace(0)}..{em.namespace(args.nodes - 1)}; inter-node link "
              f"{_rate(args.inter_node_gbit)} each way per node, intra-node {_rate(args.intra_node_gbit)}",
              file=sys.stderr)
        before = em.counters()
        # Only here, on emulated nodes, is the ranks' interface their node's own link.
        ranks_argv = inner + ["--wire-interface", netns.NODE_IFNAME]
        code, failed_rank = supervise(start_ranks(em, args.gpus_per_node, ranks_argv))
        wire = [a - b for a, b in zip(em.counters(), before)]
    except Interrupted as exc:
        print(f"c2r-comm emulate: {exc}; ranks stopped, namespaces removed", file=sys.stderr)
        return 128 + exc.signum
    except RuntimeError as exc:  # a set-up command failed (create_nodes removed what it made)
        print(f"c2r-comm emulate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        with signals_blocked():  # a second Ctrl-C must not interrupt the clean-up
            if em is not None:
                em.teardown()
            restore_signal_handlers(previous)
    if code:
        print(f"c2r-comm emulate: the run failed first on rank {failed_rank} (exit status {code}); each rank's "
              "ending is listed above",
              file=sys.stderr)
        return code
    print(format_wire(wire))
    _annotate_json(json_path, {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                               "inter_node_gbit": args.inter_node_gbit, "intra_node_gbit": args.intra_node_gbit,
                               "run_wire_bytes_per_node": [{"node": w.node, "from_node": w.bytes_from_node,
                                                            "to_node": w.bytes_to_node} for w in wire]})
    return 0


def _rate(gbit: Optional[float]) -> str:
    return "unshaped" if gbit is None else f"{gbit:g} Gbit/s"


def format_wire(wire: list[netns.LinkCounters]) -> str:
    rows = ["node links over the whole run (interface counters: payload + TCP/IP headers, set-up included):",
            "| node | MB sent by node | MB received by node |", "|---|---|---|"]
    rows += [f"| {w.node} | {w.bytes_from_node / 1e6:.2f} | {w.bytes_to_node / 1e6:.2f} |" for w in wire]
    return "\n".join(rows)


def _annotate_json(path: Optional[str], emulation: Optional[dict]) -> None:
    """Add the emulation (None: plain loopback run) to every record of the bench's --json file."""
    if path is None or not Path(path).is_file():
        return
    records = json.loads(Path(path).read_text())
    for r in records:
        r["emulation"] = emulation
    Path(path).write_text(json.dumps(records, indent=1))
