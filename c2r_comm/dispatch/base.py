"""Dispatcher contract: dispatch() -> (ExpertBatch, handle); combine(expert_out, handle) -> out_TD.

Dispatch and combine are built from differentiable gathers, all_to_alls and index_adds, so the
backward of dispatch is exactly a combine over the same handle's splits and indices (and the
backward of combine a dispatch): DeepEP's contract, with no hand-written backward to drift.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from c2r_comm.dispatch.comm import agree_on_status, check_same_on_all_ranks
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import ProcessGroups
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class ExpertBatch:
    """Rows this rank's experts must process, grouped by local expert slot."""

    x_PD: torch.Tensor  # [sum(tokens_per_expert), hidden]
    tokens_per_expert: tuple[int, ...]  # [local experts]


@dataclass(frozen=True)
class CommStats:
    """What one direction of one exchange sent, from the splits passed to the collectives."""

    rows_local: int = 0  # kept on this rank (no link)
    rows_same_node: int = 0
    rows_cross_node: int = 0
    bytes_same_node: int = 0
    bytes_cross_node: int = 0
    messages_same_node: int = 0  # non-empty point-to-point messages per link class
    messages_cross_node: int = 0

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.rows_local, self.rows_same_node, self.rows_cross_node, self.bytes_same_node,
                self.bytes_cross_node, self.messages_same_node, self.messages_cross_node)

    @property
    def rows_off_rank(self) -> int:
        return self.rows_same_node + self.rows_cross_node

    @property
    def bytes_off_rank(self) -> int:
        return self.bytes_same_node + self.bytes_cross_node


def stats_from_splits(splits: Sequence[int], bytes_per_row: int, rank: int, topology: Topology,
                      peers: Optional[Sequence[int]] = None) -> CommStats:
    """Classify per-peer row counts by link; `peers` maps split index -> rank (default identity)."""
    fields = dict(rows_local=0, rows_same_node=0, rows_cross_node=0, bytes_same_node=0, bytes_cross_node=0,
                  messages_same_node=0, messages_cross_node=0)
    for i, rows in enumerate(splits):
        peer = peers[i] if peers is not None else i
        if peer == rank:
            fields["rows_local"] += rows
            continue
        cls = "same_node" if topology.same_node(peer, rank) else "cross_node"
        fields[f"rows_{cls}"] += rows
        fields[f"bytes_{cls}"] += rows * bytes_per_row
        fields[f"messages_{cls}"] += int(rows > 0)
    return CommStats(**fields)


@dataclass(frozen=True)
class DispatchHandle:
    """Everything combine (and backward) needs; subclasses add their layout tensors."""

    num_tokens: int
    hidden_size: int
    tokens_per_expert: tuple[int, ...]
    dispatch_stats: CommStats
    combine_stats: CommStats


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 99


def validate_input(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                   hidden_size: int, num_experts: int) -> tuple[int, Optional[str]]:
    """Local checks only (no collective): a status code for the count exchange and a message."""
    if x_TD.dim() != 2 or topk_idx_TK.dim() != 2 or topk_weight_TK.shape != topk_idx_TK.shape \
            or topk_idx_TK.shape[0] != x_TD.shape[0]:
        return 1, (f"need x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K]; got {tuple(x_TD.shape)}, "
                   f"{tuple(topk_idx_TK.shape)}, {tuple(topk_weight_TK.shape)}")
    if topk_idx_TK.dtype not in (torch.int64, torch.int32) or not topk_weight_TK.is_floating_point() \
            or not x_TD.is_floating_point():
        return 1, (f"x_TD must be float, topk_idx_TK int64/int32 and topk_weight_TK float; got {x_TD.dtype}, "
                   f"{topk_idx_TK.dtype}, {topk_weight_TK.dtype}")
    if not x_TD.device == topk_idx_TK.device == topk_weight_TK.device:
        return 1, (f"x_TD, topk_idx_TK and topk_weight_TK must be on one device; got {x_TD.device}, "
                   f"{topk_idx_TK.device}, {topk_weight_TK.device}")
    if x_TD.shape[1] != hidden_size:
        return 3, f"x_TD has hidden size {x_TD.shape[1]}, the dispatcher was built for {hidden_size}"
    if topk_idx_TK.numel():
        lo, hi = int(topk_idx_TK.min()), int(topk_idx_TK.max())
        if lo < 0 or hi >= num_experts:
            return 2, f"expert ids span {lo}..{hi}, allowed 0..{num_experts - 1}"
    return 0, None


class Dispatcher(ABC):
    """Moves tokens to the ranks hosting their experts and brings the weighted results back."""

    name: str = "base"

    def __init__(self, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int):
        world = dist.get_world_size(groups.ep)
        self.plan, self.groups, self.hidden_size = plan, groups, hidden_size
        self.topology = groups.topology
        self.rank = dist.get_rank(groups.ep)
        self.world_size = world
        # Local problems are not raised here but agreed on with the plan check below, so a rank
        # with a wrong plan or topology makes every rank raise instead of leaving them waiting.
        # Plans that differ across ranks would silently scramble tokens: refuse them up front.
        check_same_on_all_ranks([plan.fingerprint(), hidden_size], "placement plan / hidden size", groups.ep,
                                local_problem=self._setup_problem(plan, groups))
        self._e2r: dict[torch.device, torch.Tensor] = {}
        self._e2s: dict[torch.device, torch.Tensor] = {}

    def _setup_problem(self, plan: PlacementPlan, groups: ProcessGroups) -> Optional[str]:
        """What is wrong with this rank's set-up (None if nothing); subclasses add their checks."""
        world = dist.get_world_size(groups.ep)
        try:
            groups.topology.check_world_size(world)
            plan.check_matches(plan.num_experts, world, what="expert-parallel group")
        except ValueError as exc:
            return str(exc)
        return None

    @property
    def num_local_experts(self) -> int:
        return self.plan.experts_per_rank

    def expert_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert -> rank, expert -> local slot) as int64 tensors on `device`, cached."""
        if device not in self._e2r:
            self._e2r[device] = self.plan.rank_tensor(device)
            self._e2s[device] = self.plan.slot_tensor(device)
        return self._e2r[device], self._e2s[device]

    @abstractmethod
    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor) -> tuple[ExpertBatch, DispatchHandle]:
        ...

    @abstractmethod
    def combine(self, expert_out_PD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        ...

    def _check(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> tuple[int, Optional[str]]:
        return validate_input(x_TD, topk_idx_TK, topk_weight_TK, self.hidden_size, self.plan.num_experts)

    @staticmethod
    def agreed_values(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> tuple[int, ...]:
        """Values every rank must share for the exchanges to line up: k and the payload dtypes."""
        k = topk_idx_TK.shape[1] if topk_idx_TK.dim() == 2 else -1
        return k, dtype_code(x_TD.dtype), dtype_code(topk_weight_TK.dtype)

    def check_combine(self, expert_out_PD: torch.Tensor, handle: DispatchHandle) -> None:
        """Every rank agrees on the combine input before the return exchange (one tiny all_gather)."""
        rows = sum(handle.tokens_per_expert)
        ok = expert_out_PD.dim() == 2 and expert_out_PD.shape[0] == rows and expert_out_PD.shape[1] == handle.hidden_size
        detail = None if ok else (f"combine needs expert_out [{rows}, {handle.hidden_size}] (the dispatched rows), "
                                  f"got {tuple(expert_out_PD.shape)}")
        agree_on_status(0 if ok else 4, self.groups.ep, "combine input", detail)
