"""Peers benchmarked side by side with our dispatchers: `c2r-comm bench --peers deepspeed,megatron`.

Optional extras, never needed for the main job: nothing here imports a peer until a run asks for it
(DeepSpeed's MoE layer and its CPU shims: deepspeed_peer.py; megatron-core's MoELayer with its
alltoall dispatcher and its CPU shims: megatron_peer.py).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from c2r_comm.config import Config

if TYPE_CHECKING:  # the names and checks a launch needs (peer_names) import no torch; the rest does, when run
    import torch

    from c2r_comm.bench.measure import BenchRecord, Measurement
    from c2r_comm.dispatch.exchange_plan import CommStats

PEERS = ("deepspeed", "megatron")
DEEPSPEED_VERSION = "0.19.8"  # the release deepspeed_peer.py is written against
DEEPSPEED_INSTALL = ('DS_BUILD_OPS=0 python -m pip install "c2r-comm[peers]" '
                     f'(or "deepspeed=={DEEPSPEED_VERSION}"; DS_BUILD_OPS=0 at build time)')
MEGATRON_VERSION = "0.16.1"  # the megatron-core release megatron_peer.py is written against
MEGATRON_INSTALL = f'python -m pip install "c2r-comm[megatron]" (or "megatron-core=={MEGATRON_VERSION}")'


@dataclass(frozen=True)
class PeerTraffic:
    """What a peer's forward sent, over all ranks, classified by our topology, and notes on what differs."""

    dispatch: CommStats
    combine: CommStats
    tokens: int  # over all ranks
    notes: dict


def peer_record(name: str, config: Config, routing_desc: str, trace_layer: Optional[int], topology: str,
                meas: Measurement, traffic: PeerTraffic, routing_diffs: Sequence[str]) -> BenchRecord:
    """A peer's row: its measurement with its traffic, the resolved config with config.peer (its notes
    and what differs from ours); its routing reads like ours unless an entry of routing_diffs that starts
    with 'routing' says the experts or weights differ."""
    from c2r_comm.bench.measure import BenchRecord
    meas = replace(meas, tokens=traffic.tokens, dispatch=traffic.dispatch, combine=traffic.combine)
    resolved = config.to_dict()
    resolved["dispatcher"] = name
    resolved["peer"] = dict(traffic.notes, differs=list(traffic.notes["differs"]) + list(routing_diffs))
    same = not any(d.startswith("routing") for d in routing_diffs)
    desc = routing_desc if same else f"{routing_desc}; {name}: differs (config.peer.differs)"
    return BenchRecord(name, "contiguous", desc, topology, resolved, meas, trace_layer, None)


def set_given_routing(set_routing: Callable[..., None], routing: tuple[torch.Tensor, torch.Tensor], group: Any,
                      peer: str) -> None:
    """Hand this rank's given routing to a peer's router (`set_routing`); whatever it refuses on any
    rank raises on every rank (one small agreement) before the peer's first collective."""
    from c2r_comm.dispatch.comm import check_same_on_all_ranks
    problem = None
    try:
        set_routing(*routing)
    except Exception as exc:  # noqa: BLE001 (any error here must reach every rank, not leave them waiting)
        problem = f"{type(exc).__name__}: {exc}"
    check_same_on_all_ranks((), "given routing", group, problem, step=f"the {peer} peer's given routing")


def importable(module: str) -> bool:
    """Whether `module` is installed (found without importing it: peer imports cost seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def deepspeed_importable() -> bool:
    return importable("deepspeed")


def megatron_importable() -> bool:
    return importable("megatron.core")


def peer_names(spec: Optional[str]) -> list[str]:
    """Peers of a `--peers` comma list, checked before any rank starts: unknown names and peers that
    are not installed raise ValueError (the CLI prints it and exits 2). Expert counts the peers cannot
    place (E not divisible by the world size) are refused earlier, by the config's own check."""
    if not spec:
        return []
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"--peers {bad} unknown: allowed {list(PEERS)}")
    if "deepspeed" in names and not deepspeed_importable():
        raise ValueError(f"--peers deepspeed: deepspeed is not importable in {sys.executable}; install it with "
                         f"{DEEPSPEED_INSTALL}")
    if "megatron" in names and not megatron_importable():
        raise ValueError(f"--peers megatron: megatron-core is not importable in {sys.executable}; install it with "
                         f"{MEGATRON_INSTALL}")
    return names


def bench_peers(names: Sequence[str], config: Config, routing: Optional[tuple[torch.Tensor, torch.Tensor]],
                routing_desc: str, trace_layer: Optional[int], groups, device: torch.device, x_TD: torch.Tensor,
                grad_TD: torch.Tensor, show: bool, network_interface: Optional[str] = None) -> list[BenchRecord]:
    """One BenchRecord per peer, measured like our rows (bench_rank.bench_all's inputs and routing).
    Collective: every rank calls it with the same names."""
    records = []
    for name in names:
        if name == "deepspeed":
            from c2r_comm.bench.deepspeed_peer import bench_deepspeed as bench_peer
        elif name == "megatron":
            from c2r_comm.bench.megatron_peer import bench_megatron as bench_peer
        else:
            raise ValueError(f"peer {name!r} unknown: allowed {list(PEERS)}")
        records.append(bench_peer(config, routing, routing_desc, trace_layer, groups, device, x_TD, grad_TD, show,
                                  network_interface))
    return records
