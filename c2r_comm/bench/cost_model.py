"""Alpha-beta cost model of one MoE layer's token exchange, from the dispatchers' own layouts.

Bytes are never counted here: they come from `world_layout.lay_out_world` (every rank's
`Dispatcher.layout_for`, the counts the dispatchers send). Per stage s of a dispatcher, direction d
(dispatch, or combine: every row back the other way) with row bytes b_d (the stage's
dispatch_row_bytes / combine_row_bytes), link class c (same_node, cross_node), rank w:

    out_c(w) = b_d * rows w sends over class c     in_c(w) = b_d * rows w receives over class c
    m_c(w)   = max(messages w sends, messages w receives) over class c   (non-empty peer pairs)
    per_gpu link  (a port per GPU):  t_c(w) = alpha_c * m_c(w) + max(out_c(w), in_c(w)) / B_c
    per_node link (shared by the node's ranks):
                  t_c(n) = alpha_c * max_{w in n} m_c(w) + max(sum_{w in n} out_c(w), sum_{w in n} in_c(w)) / B_c
    T(s, d) = max_c max_unit t_c  +  o        (o only if the stage moves any row off its rank)
    dispatch = sum_s T(s, dispatch)           combine = sum_s T(s, combine)
    forward exchange = dispatch + combine     backward exchange = the same stages again, swapped
    fwd+bwd exchange = forward + backward

B_c = gbit_c * efficiency_c * 1e9 / 8 bytes/s, alpha_c the per-message latency and o the per-stage
overhead of the hardware profile (bench/hardware.py).

Assumptions:
- Links are full duplex: sending and receiving overlap, so a unit's transfer time is its larger
  direction. Link classes run in parallel and the slowest rank (or node) decides a stage: a
  collective ends when its last rank does.
- Stages of one dispatch run one after another (hierarchical: rail, then node; combine: node, then
  rail). Serial composition only: compute, the count exchange and other layers never overlap the
  exchange here; overlapped composition comes with the overlap scheduler.
- Rows a rank keeps (local) cost nothing; packing, unpacking, the count exchange and expert compute
  are not modelled (the count exchange and launch costs are what `stage_overhead_us` stands for).
- A rank's messages of one stage are issued one after another (alpha per message); a per_node
  link's ranks issue theirs in parallel and share its bandwidth.
- Backward: the backward of dispatch is a combine of the same rows (gradients of the dispatched
  rows, combine direction, dispatch_row_bytes) and the backward of combine a dispatch (dispatch
  direction, combine_row_bytes). Swapping sent and received leaves every t_c unchanged, so the
  backward equals the forward; packed rows' gradients actually drop the k ids (a few bytes less).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from c2r_comm.bench.hardware import HardwareProfile
from c2r_comm.bench.world_layout import WorldLayout
from c2r_comm.dispatch.exchange_plan import LINK_CLASSES, StageLoad
from c2r_comm.topology import Topology

OFF_RANK = LINK_CLASSES[1:]  # classes that use a link


@dataclass(frozen=True)
class LinkTime:
    """One link class in one stage: the slowest unit (rank or node) decides."""

    link_class: str  # "same_node" | "cross_node"
    seconds: float  # latency_s + transfer_s of the slowest unit
    unit: str  # "rank 5" (per_gpu) or "node 2" (per_node); "-" when nothing crosses the class
    latency_s: float
    transfer_s: float
    bytes_max: int  # the slowest unit's larger direction


@dataclass(frozen=True)
class StageTime:
    stage: str  # "all2all", "rail", "node"
    direction: str  # "dispatch" | "combine"
    row_bytes: int
    seconds: float  # max over link classes + overhead_s
    overhead_s: float
    links: tuple[LinkTime, ...]  # one per OFF_RANK class

    @property
    def bottleneck(self) -> LinkTime:
        return max(self.links, key=lambda l: l.seconds)


def link_time(profile: HardwareProfile, topology: Topology, link_class: str, row_bytes: int,
              rows_out_W: torch.Tensor, rows_in_W: torch.Tensor, msgs_out_W: torch.Tensor,
              msgs_in_W: torch.Tensor) -> LinkTime:
    """Time of one link class in one stage and direction from per-rank rows and messages [W]."""
    out_U = rows_out_W.to(torch.float64) * row_bytes
    in_U = rows_in_W.to(torch.float64) * row_bytes
    msgs_U = torch.maximum(msgs_out_W, msgs_in_W).to(torch.float64)
    unit = "rank"
    if profile.sharing(link_class) == "per_node":
        N, G = topology.nodes, topology.gpus_per_node
        out_U, in_U = out_U.reshape(N, G).sum(1), in_U.reshape(N, G).sum(1)
        msgs_U = msgs_U.reshape(N, G).amax(1)
        unit = "node"
    bytes_U = torch.maximum(out_U, in_U)
    latency_U = profile.latency_s(link_class) * msgs_U
    transfer_U = bytes_U / profile.bytes_per_second(link_class)
    time_U = latency_U + transfer_U
    i = int(torch.argmax(time_U))
    if float(time_U[i]) == 0.0:
        return LinkTime(link_class, 0.0, "-", 0.0, 0.0, 0)
    return LinkTime(link_class, float(time_U[i]), f"{unit} {i}", float(latency_U[i]), float(transfer_U[i]),
                    int(bytes_U[i]))


def stage_time(profile: HardwareProfile, topology: Topology, stage: StageLoad, combine: bool,
               row_bytes: int) -> StageTime:
    """T(s, d) of the module docstring; `row_bytes` per row in this direction."""
    _, rows_out, rows_in, msgs_out, msgs_in = stage.direction(combine)
    links = tuple(link_time(profile, topology, c, row_bytes, rows_out[LINK_CLASSES.index(c)],
                            rows_in[LINK_CLASSES.index(c)], msgs_out[LINK_CLASSES.index(c)],
                            msgs_in[LINK_CLASSES.index(c)]) for c in OFF_RANK)
    moves = bool(rows_out[1:].sum() > 0)
    overhead = profile.stage_overhead_us * 1e-6 if moves else 0.0
    return StageTime(stage.name, "combine" if combine else "dispatch", row_bytes,
                     max(l.seconds for l in links) + overhead, overhead, links)


@dataclass(frozen=True)
class ExchangeTime:
    """Predicted exchange times of one dispatcher on one world (serial composition)."""

    dispatcher: str
    topology: str
    profile: str
    dispatch_stages: tuple[StageTime, ...]  # in the order they run
    combine_stages: tuple[StageTime, ...]
    backward_stages: tuple[StageTime, ...]  # backward of combine, then backward of dispatch

    @property
    def dispatch_s(self) -> float:
        return sum(s.seconds for s in self.dispatch_stages)

    @property
    def combine_s(self) -> float:
        return sum(s.seconds for s in self.combine_stages)

    @property
    def forward_s(self) -> float:
        return self.dispatch_s + self.combine_s

    @property
    def backward_s(self) -> float:
        return sum(s.seconds for s in self.backward_stages)

    @property
    def fwd_bwd_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def slowest_stage(self) -> StageTime:
        return max(self.dispatch_stages + self.combine_stages, key=lambda s: s.seconds)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(dispatch_s=self.dispatch_s, combine_s=self.combine_s, forward_s=self.forward_s,
                 backward_s=self.backward_s, fwd_bwd_s=self.fwd_bwd_s)
        return d


def predict(world: WorldLayout, profile: HardwareProfile) -> ExchangeTime:
    """Alpha-beta times of every stage of `world`'s dispatch, combine and their backward."""
    topo, stages = world.topology, world.stages
    dispatch = tuple(stage_time(profile, topo, s, False, s.dispatch_row_bytes) for s in stages)
    combine = tuple(stage_time(profile, topo, s, True, s.combine_row_bytes) for s in reversed(stages))
    # backward of combine: the combine's rows go out again (dispatch direction, combine row bytes);
    # backward of dispatch: the dispatched rows' gradients come back (combine direction).
    backward = tuple(stage_time(profile, topo, s, False, s.combine_row_bytes) for s in stages) + \
        tuple(stage_time(profile, topo, s, True, s.dispatch_row_bytes) for s in reversed(stages))
    return ExchangeTime(world.dispatcher, str(topo), profile.name, dispatch, combine, backward)
