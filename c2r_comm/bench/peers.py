"""Peers benchmarked side by side with our dispatchers: `c2r-comm bench --peers deepspeed`.

Optional extras, never needed for the main job: nothing here imports a peer until a run asks for it
(the DeepSpeed peer and its CPU shims: deepspeed_peer.py).
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

import torch

from c2r_comm.bench.measure import BenchRecord
from c2r_comm.config import Config

PEERS = ("deepspeed",)
DEEPSPEED_VERSION = "0.19.8"  # the release deepspeed_peer.py is written against
DEEPSPEED_INSTALL = ('DS_BUILD_OPS=0 python -m pip install "c2r-comm[peers]" '
                     f'(or "deepspeed=={DEEPSPEED_VERSION}"; DS_BUILD_OPS=0 at build time)')


def deepspeed_importable() -> bool:
    """Whether deepspeed is installed (found without importing it: the import costs seconds)."""
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def peer_names(spec: Optional[str]) -> list[str]:
    """Peers of a `--peers` comma list, checked before any rank starts: unknown names and peers that
    are not installed raise ValueError (the CLI prints it and exits 2)."""
    if not spec:
        return []
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"--peers {bad} unknown: allowed {list(PEERS)}")
    if "deepspeed" in names and not deepspeed_importable():
        raise ValueError(f"--peers deepspeed: deepspeed is not importable in {sys.executable}; install it with "
                         f"{DEEPSPEED_INSTALL}")
    return names


def bench_peers(names: Sequence[str], config: Config, routing: Optional[tuple[torch.Tensor, torch.Tensor]],
                routing_desc: str, trace_layer: Optional[int], groups, device: torch.device, x_TD: torch.Tensor,
                grad_TD: torch.Tensor, show: bool, network_interface: Optional[str] = None) -> list[BenchRecord]:
    """One BenchRecord per peer, measured like our rows (bench_cmd.bench_all's inputs and routing).
    Collective: every rank calls it with the same names."""
    records = []
    for name in names:
        if name != "deepspeed":
            raise ValueError(f"peer {name!r} unknown: allowed {list(PEERS)}")
        from c2r_comm.bench.deepspeed_peer import bench_deepspeed
        records.append(bench_deepspeed(config, routing, routing_desc, trace_layer, groups, device, x_TD, grad_TD,
                                       show, network_interface))
    return records
