"""Dispatcher contract: a sequence of phases over one frozen per-call object.

    plan = d.layout(x_TD, topk_idx_TK, topk_weight_TK)   pure, no communication (ExchangePlan)
    route = d.exchange_counts(plan)                      the one host sync; raises on bad input everywhere
    batch, handle = d.send(x_TD, topk_weight_TK, route).wait()     async data exchange, then post-processing
    out_TD = d.combine_start(expert_out_PD, handle).wait()          mirrors it

`dispatch()` and `combine()` are these phases composed. The backward of dispatch is a combine
over the same handle's exchanges (and vice versa): each exchange stage is one autograd Function
(transport.link) whose backward runs the reverse exchange. Nothing per call lives on `self`, so
several dispatches can be in flight before the first combine.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import CommSite
from c2r_comm.dispatch.comm import (CountExchange, StatusCode, agree_on_status, check_same_on_all_ranks,
                                    dtype_code, dtype_name, exchange_counts)
from c2r_comm.dispatch.exchange_plan import CommStats, ExchangePlan, stats_of_messages
from c2r_comm.dispatch.layout import DROPPED_CHOICE, RankGeometry
from c2r_comm.dispatch.transport import Exchange, LinkTape, Pending
from c2r_comm.groups import ProcessGroups
from c2r_comm.plan import PlacementPlan


@dataclass(frozen=True)
class ExpertBatch:
    """Rows this rank's experts must process, grouped by local expert slot."""

    x_PD: torch.Tensor  # [sum(tokens_per_expert), hidden]
    tokens_per_expert: tuple[int, ...]  # [local experts], host ints from the count exchange
    offsets_E: torch.Tensor  # int32 [local experts] cumulative end offsets, on x_PD's device (no sync)
    # Routing weight of each row (differentiable), for dispatchers that weight at the experts
    # (dedup, hierarchical): scale the expert outputs by it (GroupedExperts does, on its [P, F]
    # activation) and call combine(..., weighted=True); or leave it and combine applies it.
    # None: the dispatcher weights at the source (alltoall) and combine takes raw outputs.
    weight_P: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class RouteStage:
    """One data exchange of a dispatch with its counts, its peers as EP ranks and bytes per row."""

    exchange: Exchange
    ep_peers: tuple[int, ...]  # EP rank of each of exchange.peers
    dispatch_row_bytes: int
    combine_row_bytes: int


@dataclass(frozen=True)
class Route:
    """An ExchangePlan after the count exchange: every count of every stage, on the host."""

    plan: ExchangePlan
    stages: tuple[RouteStage, ...]
    tokens_per_expert: tuple[int, ...]
    offsets_E: torch.Tensor  # int32 [local experts], device
    counts: CountExchange  # what the count exchange returned (host and device copies)

    def stats(self, rank: int, topology) -> tuple[CommStats, CommStats]:
        """(dispatch, combine) of what this rank itself puts on its links, from the counts it
        passes to the collectives (combine sends back what dispatch received)."""
        d, c = CommStats(), CommStats()
        for st in self.stages:
            ex = st.exchange
            d = d + stats_of_messages(((rank, p, n) for p, n in zip(st.ep_peers, ex.send_counts)),
                                      st.dispatch_row_bytes, topology)
            c = c + stats_of_messages(((rank, p, n) for p, n in zip(st.ep_peers, ex.recv_counts)),
                                      st.combine_row_bytes, topology)
        return d, c


@dataclass(frozen=True)
class DispatchHandle:
    """Everything combine (and backward) needs; subclasses add their index tensors."""

    route: Route
    combine_weight: torch.Tensor  # routing weights combine applies (differentiable)
    rank: int
    topology: object

    @property
    def num_tokens(self) -> int:
        return self.route.plan.num_tokens

    @property
    def hidden_size(self) -> int:
        return self.route.plan.hidden_size

    @property
    def tokens_per_expert(self) -> tuple[int, ...]:
        return self.route.tokens_per_expert

    @property
    def num_rows(self) -> int:
        return sum(self.route.tokens_per_expert)

    @property
    def dispatch_stats(self) -> CommStats:
        return self.route.stats(self.rank, self.topology)[0]

    @property
    def combine_stats(self) -> CommStats:
        return self.route.stats(self.rank, self.topology)[1]


def check_input(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                hidden_size: int) -> tuple[StatusCode, Optional[str]]:
    """Shape, dtype and device checks that need no device values (no host sync)."""
    if x_TD.dim() != 2 or topk_idx_TK.dim() != 2 or topk_weight_TK.shape != topk_idx_TK.shape \
            or topk_idx_TK.shape[0] != x_TD.shape[0]:
        return StatusCode.BAD_SHAPE_OR_DTYPE, (
            f"need x_TD [T, D], topk_idx_TK [T, K], topk_weight_TK [T, K]; got {tuple(x_TD.shape)}, "
            f"{tuple(topk_idx_TK.shape)}, {tuple(topk_weight_TK.shape)}")
    if topk_idx_TK.dtype not in (torch.int64, torch.int32) or not topk_weight_TK.is_floating_point() \
            or not x_TD.is_floating_point():
        return StatusCode.BAD_SHAPE_OR_DTYPE, (
            f"x_TD must be float, topk_idx_TK int64/int32 and topk_weight_TK float; got {x_TD.dtype}, "
            f"{topk_idx_TK.dtype}, {topk_weight_TK.dtype}")
    if not x_TD.device == topk_idx_TK.device == topk_weight_TK.device:
        return StatusCode.BAD_SHAPE_OR_DTYPE, (
            f"x_TD, topk_idx_TK and topk_weight_TK must be on one device; got {x_TD.device}, "
            f"{topk_idx_TK.device}, {topk_weight_TK.device}")
    if x_TD.shape[1] != hidden_size:
        return StatusCode.HIDDEN_SIZE_MISMATCH, \
            f"x_TD has hidden size {x_TD.shape[1]}, the dispatcher was built for {hidden_size}"
    return StatusCode.OK, None


class Dispatcher(ABC):
    """Moves tokens to the ranks hosting their experts and brings the weighted results back."""

    name: str = "base"

    def __init__(self, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int, debug_checks: bool = False,
                 label: Optional[str] = None, equal_tokens: bool = False):
        """label: what failure reports call this dispatcher's layer (e.g. "layer 3"). equal_tokens:
        every rank must dispatch the same number of tokens per call (capacity mode's padding sizes
        expert inputs from it); the count exchange then makes every rank raise when one differs."""
        world = dist.get_world_size(groups.ep)
        self.label = label
        self.equal_tokens = equal_tokens
        self.plan, self.groups, self.hidden_size = plan, groups, hidden_size
        self.topology = groups.topology
        self.rank = dist.get_rank(groups.ep)
        self.world_size = world
        self.debug_checks = debug_checks
        # Local problems are not raised here but agreed on with the plan check below, so a rank
        # with a wrong plan or topology makes every rank raise instead of leaving them waiting.
        # Plans that differ across ranks would silently scramble tokens: refuse them up front.
        check_same_on_all_ranks([plan.fingerprint(), hidden_size], "placement plan / hidden size", groups.ep,
                                local_problem=self._setup_problem(plan, groups))
        self._geometry: dict[torch.device, RankGeometry] = {}

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

    # ---- phase 1: layout (pure) ---------------------------------------------------------------
    def geometry(self, device: torch.device) -> RankGeometry:
        """This rank's RankGeometry with expert maps on `device` (cached: set-up data, not per call)."""
        if device not in self._geometry:
            self._geometry[device] = RankGeometry.of(self.rank, self.topology, self.plan, device)
        return self._geometry[device]

    def layout(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> ExchangePlan:
        """What this rank will send in every stage; no communication and no host sync."""
        return self.layout_for(self.geometry(x_TD.device), self.hidden_size, x_TD, topk_idx_TK, topk_weight_TK,
                               self.equal_tokens)

    @classmethod
    def layout_for(cls, geo: RankGeometry, hidden_size: int, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                   topk_weight_TK: torch.Tensor, equal_tokens: bool = False) -> ExchangePlan:
        """The layout of rank `geo.rank` for these inputs, in any process (accounting, cost model).

        Bad input does not raise here (that would leave the other ranks waiting): it becomes a
        status the count exchange carries, and the plan is laid out for zero tokens instead.
        Expert ids out of range are found on the device and clamped for the layout.

        An expert id of DROPPED_CHOICE (-1) is a choice that goes nowhere (capacity mode drops it,
        routing/capacity.py): it makes no row, its weight is ignored, and a token whose choices are
        all dropped gets a zero output. Layouts see it as -1 (use `valid_choices`).
        """
        status, detail = check_input(x_TD, topk_idx_TK, topk_weight_TK, hidden_size)
        agree = cls.agreed_values(x_TD, topk_idx_TK, topk_weight_TK)
        if equal_tokens:
            agree = agree + (x_TD.shape[0] if x_TD.dim() >= 1 else -1,)
        E = geo.rank_of_expert_E.shape[0]
        if status != StatusCode.OK:
            K = topk_idx_TK.shape[-1] if topk_idx_TK.dim() >= 1 and topk_idx_TK.shape[-1] else 1
            device = x_TD.device
            x_TD = torch.zeros(0, hidden_size, device=device)
            topk_idx_TK = torch.zeros(0, K, dtype=torch.int64, device=device)
            topk_weight_TK = torch.zeros(0, K, device=device)
            status_t = torch.tensor(int(status), dtype=torch.int64, device=device)
            return cls.layout_rank(geo, x_TD, topk_idx_TK, topk_weight_TK, status_t, detail, agree)
        idx = topk_idx_TK.long()
        clamped = idx.clamp(DROPPED_CHOICE, E - 1)
        status_t = (clamped != idx).any().to(torch.int64) * int(StatusCode.EXPERT_ID_OUT_OF_RANGE)

        def range_detail() -> str:  # only evaluated on the error path
            return (f"expert ids span {int(idx.min())}..{int(idx.max())}, allowed 0..{E - 1} "
                    f"({DROPPED_CHOICE}: a dropped choice)")

        return cls.layout_rank(geo, x_TD, clamped, topk_weight_TK, status_t, range_detail, agree)

    @staticmethod
    @abstractmethod
    def layout_rank(geo: RankGeometry, x_TD, topk_idx_TK, topk_weight_TK, status, status_detail,
                    agree) -> ExchangePlan:
        """The dispatcher's own layout of valid (clamped) inputs for rank geo.rank; topk_idx_TK
        holds ids in 0..E-1 or DROPPED_CHOICE."""

    # ---- phase 2: count exchange (the one host sync) ------------------------------------------
    def exchange_counts(self, plan: ExchangePlan, chunk: Optional[int] = None) -> Route:
        """chunk: the pipeline chunk this dispatch is (named by failure reports)."""
        site = CommSite(phase="dispatch", layer=self.label, chunk=chunk)
        counts = exchange_counts(plan.counts_WC, plan.status, self.groups.ep, plan.status_detail, plan.agree, site)
        return self._route(plan, counts, site)

    @abstractmethod
    def _route(self, plan: ExchangePlan, counts: CountExchange, site: CommSite) -> Route:
        """Each stage's Exchange, with `site` (phase dispatch) plus its stage name."""

    # ---- phase 3: send / wait -----------------------------------------------------------------
    def send(self, x_TD: torch.Tensor, topk_weight_TK: torch.Tensor, route: Route,
             tape: Optional[LinkTape] = None) -> Pending[tuple[ExpertBatch, DispatchHandle]]:
        """Issue the data exchange of the tensors `layout()` saw; `wait()` returns (batch, handle).

        The tensors are checked against the plan first (host metadata only): a mismatch raises here,
        naming this rank, before this rank posts anything. tape: cut the dispatch's autograd graph
        at its exchanges (the batch's tensors become leaves) so that its backward can be run as
        start and wait (transport.backward_through; the pipelined layer's backward does)."""
        plan = route.plan
        want = ((plan.num_tokens, plan.hidden_size), (plan.num_tokens, plan.top_k))
        got = (tuple(x_TD.shape), tuple(topk_weight_TK.shape))
        codes = (dtype_code(x_TD.dtype), dtype_code(topk_weight_TK.dtype))
        if got != want or codes != tuple(plan.agree[1:3]) or x_TD.device != topk_weight_TK.device:
            raise ValueError(f"rank {self.rank}: send() got x_TD {got[0]} {x_TD.dtype} and topk_weight_TK {got[1]} "
                             f"{topk_weight_TK.dtype} on {x_TD.device}/{topk_weight_TK.device}; its route was laid "
                             f"out for {want[0]} and {want[1]} with dtypes {dtype_name(plan.agree[1])} and "
                             f"{dtype_name(plan.agree[2])}: pass the tensors "
                             "given to layout()")
        return self._send(x_TD, topk_weight_TK, route, tape)

    @abstractmethod
    def _send(self, x_TD: torch.Tensor, topk_weight_TK: torch.Tensor, route: Route,
              tape: Optional[LinkTape]) -> Pending[tuple[ExpertBatch, DispatchHandle]]:
        ...

    # ---- combine ------------------------------------------------------------------------------
    @abstractmethod
    def _combine_start(self, expert_out_PD: torch.Tensor, handle: DispatchHandle, weighted: bool,
                       tape: Optional[LinkTape]) -> Pending[torch.Tensor]:
        ...

    weights_at_experts: bool = True  # ExpertBatch.weight_P is set; combine(weighted=True) is allowed

    def combine_start(self, expert_out_PD: torch.Tensor, handle: DispatchHandle, weighted: bool = False,
                      tape: Optional[LinkTape] = None) -> Pending[torch.Tensor]:
        """Check the expert output against the handle (local, no collective unless debug_checks),
        then issue the return exchange. weighted=True: the rows are already multiplied by
        ExpertBatch.weight_P (only for dispatchers that weight at the experts). tape: as for send()."""
        if weighted and not self.weights_at_experts:
            raise ValueError(f"the {self.name} dispatcher applies routing weights at the source: combine takes the "
                             "raw expert outputs (weighted=False)")
        self.check_combine(expert_out_PD, handle)
        return self._combine_start(expert_out_PD, handle, weighted, tape)

    # ---- blocking compositions ----------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor) -> tuple[ExpertBatch, DispatchHandle]:
        route = self.exchange_counts(self.layout(x_TD, topk_idx_TK, topk_weight_TK))
        return self.send(x_TD, topk_weight_TK, route).wait()

    def combine(self, expert_out_PD: torch.Tensor, handle: DispatchHandle, weighted: bool = False) -> torch.Tensor:
        return self.combine_start(expert_out_PD, handle, weighted).wait()

    @staticmethod
    def agreed_values(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> tuple[int, ...]:
        """Values every rank must share for the exchanges to line up: k, the payload dtypes, and
        whether the exchange will run backward (its reverse exchanges are collectives too: a rank
        whose output needs no gradient would skip them and leave the others waiting)."""
        k = topk_idx_TK.shape[1] if topk_idx_TK.dim() == 2 else -1
        needs_grad = torch.is_grad_enabled() and (x_TD.requires_grad or topk_weight_TK.requires_grad)
        return k, dtype_code(x_TD.dtype), dtype_code(topk_weight_TK.dtype), int(needs_grad)

    def check_combine(self, expert_out_PD: torch.Tensor, handle: DispatchHandle) -> None:
        """The expert output must have one row per dispatched row. Checked against the handle,
        locally; with debug_checks every rank also agrees on it (one tiny all_gather) so a bad
        rank makes all of them raise instead of leaving its peers in the return exchange."""
        rows = handle.num_rows
        dtype_ok = dtype_code(expert_out_PD.dtype) == handle.route.plan.agree[1]  # the dispatched x dtype
        ok = expert_out_PD.dim() == 2 and expert_out_PD.shape[0] == rows and \
            expert_out_PD.shape[1] == handle.hidden_size and dtype_ok and \
            expert_out_PD.device == handle.route.offsets_E.device
        detail = None if ok else (f"combine needs expert_out [{rows}, {handle.hidden_size}] (the dispatched rows) in "
                                  f"the dispatched dtype ({dtype_name(handle.route.plan.agree[1])}) on "
                                  f"{handle.route.offsets_E.device}, got {tuple(expert_out_PD.shape)} "
                                  f"{expert_out_PD.dtype} on {expert_out_PD.device}")
        if self.debug_checks:
            agree_on_status(0 if ok else int(StatusCode.COMBINE_SHAPE_MISMATCH), self.groups.ep, "combine input",
                            detail)
        elif not ok:
            raise ValueError(f"rank {self.rank}: {detail}")
