"""One row per (token, destination rank); partial sums come back one per (token, rank).

Each row travels as one packed message row: the token, its k routing weights and, per choice,
the destination's local slot (-1 where that choice lives elsewhere). The receiver expands each
row to its local experts by those slot ids; after the experts it sums their weighted outputs per
row, so the return trip also carries one row per (token, rank) instead of one per (token, expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from c2r_comm.comm_failures import CommSite
from c2r_comm.counting import bucket_counts
from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, Route, RouteStage
from c2r_comm.dispatch.comm import CountExchange, metadata_dtype
from c2r_comm.dispatch.exchange_plan import ExchangePlan, StageTraffic
from c2r_comm.dispatch.layout import (RankGeometry, SlotPairs, expert_offsets, group_rows, pairs_by_slot,
                                      valid_choices)
from c2r_comm.dispatch.pack import RowFormat
from c2r_comm.dispatch.row_sum import RowSum, csr_sum_available
from c2r_comm.dispatch.transport import Exchange, LinkTape, Pending, link


def token_format(x_TD: torch.Tensor, topk_weight_TK: torch.Tensor, id_dtype: torch.dtype) -> RowFormat:
    """Dispatch row: token, the token's k weights, a per-choice id (slot or node-local code)."""
    K = topk_weight_TK.shape[1]
    return RowFormat.of(x=(x_TD.dtype, x_TD.shape[1]), w=(topk_weight_TK.dtype, K), id=(id_dtype, K))


def grad_format(fmt: RowFormat) -> RowFormat:
    """Backward of a dispatch row: gradients of the token and of its weights."""
    i, j = fmt.names.index("x"), fmt.names.index("w")
    return RowFormat.of(x=(fmt.dtypes[i], fmt.widths[i]), w=(fmt.dtypes[j], fmt.widths[j]))


def expanded_grad_packer(gfmt: RowFormat, pair_sum: RowSum):
    """Backward of `x_PD = recv_x.index_select(0, row_of_pair_P)` fused with the gradient packing:
    expert-row gradients are summed per received row straight into the send buffer."""
    def pack(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        g_x_PD, g_w_RK = grads
        buf = gfmt.empty(pair_sum.num_out, g_x_PD.device)
        pair_sum.sum_into(gfmt.view(buf, "x"), g_x_PD)
        gfmt.view(buf, "w").copy_(g_w_RK)
        return buf
    return pack


def link_token_rows(ex: Exchange, fmt: RowFormat, recv_RB: torch.Tensor, x_TD: torch.Tensor,
                    topk_weight_TK: torch.Tensor, token_sum: RowSum,
                    pairs: Optional[SlotPairs] = None, pair_sum: Optional[RowSum] = None,
                    tape: Optional[LinkTape] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Received (x, w) as a function of (x_TD, topk_weight_TK); backward returns their gradients
    to the source rows and adds them up per token (token_sum: the sent rows into their tokens).
    With pairs (and their pair_sum), x comes back expanded to one row per expert input (x_PD), the
    gather and its backward fused into this link."""
    gfmt = grad_format(fmt)
    recv_x = fmt.view(recv_RB, "x")
    if pairs is None:
        pack = lambda g: gfmt.pack_rows({"x": g[0], "w": g[1]})  # noqa: E731
    else:
        recv_x = recv_x.index_select(0, pairs.row_of_pair_P)
        pack = expanded_grad_packer(gfmt, pair_sum)
    return link(ex, [recv_x, fmt.view(recv_RB, "w")], [x_TD, topk_weight_TK], pack,
                lambda back: (token_sum.sum(gfmt.view(back, "x")), token_sum.sum(gfmt.view(back, "w"))), tape)


def weighted_partials(expert_out_PD: torch.Tensor, weight_P: Optional[torch.Tensor], pair_sum: RowSum) -> torch.Tensor:
    """Sum each received row's expert outputs with their routing weights (None: the outputs are
    weighted already): one partial per row."""
    if weight_P is not None:
        expert_out_PD = expert_out_PD * weight_P.to(expert_out_PD.dtype).unsqueeze(1)
    return pair_sum(expert_out_PD)


@dataclass(frozen=True)
class DedupPlan(ExchangePlan):
    token_of_row_R: torch.Tensor  # int64 [T*K] (real rows first): source token of each sent row
    row_by_token_R: Optional[torch.Tensor]  # int64 [T*K]: real rows in token order (None: no CSR sum)
    rows_per_token_T: Optional[torch.Tensor]  # int64 [T]
    slot_RK: torch.Tensor  # [T*K, K] metadata_dtype: destination slot per choice, -1 elsewhere
    row_format: RowFormat

    def token_sum(self, rows: int, dtype: torch.dtype) -> RowSum:
        """Sum of the first `rows` (the real) sent rows into their tokens (the layout's token order
        when it made one for a CSR sum)."""
        by_token = None if self.row_by_token_R is None else self.row_by_token_R[:rows]
        return RowSum.build(self.token_of_row_R[:rows], self.num_tokens, dtype, by_token, self.rows_per_token_T)


@dataclass(frozen=True)
class DedupHandle(DispatchHandle):
    pair_sum: RowSum  # expert rows into their received rows (combine; dispatch backward)
    token_sum: RowSum  # sent rows into their tokens (combine's result; dispatch backward)


class DedupDispatcher(Dispatcher):
    name = "dedup"

    @staticmethod
    def layout_rank(geo: RankGeometry, x_TD, topk_idx_TK, topk_weight_TK, status, status_detail,
                    agree) -> DedupPlan:
        W, L, rank = geo.world_size, geo.num_local_experts, geo.rank
        T, K = topk_idx_TK.shape
        valid_TK, idx_TK = valid_choices(topk_idx_TK)
        rank_TK, slot_TK = geo.copies(idx_TK, valid_TK)
        rows = group_rows(rank_TK, W, valid_TK, with_token_order=csr_sum_available(x_TD.device, x_TD.dtype))
        pairs_WL = bucket_counts(rank_TK * L + slot_TK, W * L, valid_TK).reshape(W, L)
        meta = metadata_dtype(L)
        slot_RK = torch.where(rows.member_RK, slot_TK.index_select(0, rows.token_of_row_R), -1).to(meta)
        fmt = token_format(x_TD, topk_weight_TK, meta)
        stage = StageTraffic("all2all", (rank,) * W, rows.counts_G, fmt.row_bytes,
                             x_TD.shape[1] * x_TD.element_size())
        return DedupPlan(DedupDispatcher.name, rank, W, T, x_TD.shape[1], K, (stage,),
                         torch.cat([rows.counts_G.unsqueeze(1), pairs_WL], 1), status, status_detail, agree,
                         rows.token_of_row_R, rows.row_by_token_R, rows.rows_per_token_T, slot_RK, fmt)

    def _route(self, plan: DedupPlan, counts: CountExchange, site: CommSite) -> Route:
        ex = Exchange(self.groups.ep, tuple(range(self.world_size)), tuple(counts.sent_WC[:, 0].tolist()),
                      tuple(counts.recv_WC[:, 0].tolist()), sparse=False, site=site, stage="all2all")
        st = plan.stages[0]
        return Route(plan, (RouteStage(ex, ex.peers, st.dispatch_row_bytes, st.combine_row_bytes),),
                     tuple(counts.recv_WC[:, 1:].sum(0).tolist()),
                     expert_offsets(counts.recv_device_WC[:, 1:].sum(0)), counts)

    def _send(self, x_TD, topk_weight_TK, route: Route, tape: Optional[LinkTape]) -> Pending:
        plan: DedupPlan = route.plan
        ex, fmt = route.stages[0].exchange, plan.row_format
        R = ex.rows_sent
        token_of_row = plan.token_of_row_R[:R]
        send_RB = fmt.pack(R, x_TD.device, {"x": (x_TD, token_of_row), "w": (topk_weight_TK, token_of_row),
                                            "id": plan.slot_RK[:R]})
        recv_RB = fmt.empty(ex.rows_received, x_TD.device)
        works = ex.start(send_RB, recv_RB)

        def finish() -> tuple[ExpertBatch, DedupHandle]:
            pairs = pairs_by_slot(fmt.view(recv_RB, "id"), self.num_local_experts, sum(route.tokens_per_expert),
                                  with_row_order=csr_sum_available(x_TD.device, x_TD.dtype))
            pair_sum = pairs.row_sum(x_TD.dtype)
            token_sum = plan.token_sum(R, x_TD.dtype)
            x_PD, recv_w = link_token_rows(ex, fmt, recv_RB, x_TD, topk_weight_TK, token_sum, pairs, pair_sum, tape)
            weight_P = recv_w.reshape(-1).index_select(0, pairs.choice_of_pair_P)
            handle = DedupHandle(route, weight_P, self.rank, self.topology, pair_sum, token_sum)
            return ExpertBatch(x_PD, route.tokens_per_expert, route.offsets_E, weight_P), handle

        return Pending(works, finish, (send_RB, recv_RB))

    def _combine_start(self, expert_out_PD, handle: DedupHandle, weighted: bool, tape: Optional[LinkTape]) -> Pending:
        ex = handle.route.stages[0].exchange.reversed()
        partial_RD = weighted_partials(expert_out_PD, None if weighted else handle.combine_weight, handle.pair_sum)
        send_RD = partial_RD.detach()
        recv_RD = send_RD.new_empty(ex.rows_received, handle.hidden_size)
        works = ex.start(send_RD, recv_RD)

        def finish() -> torch.Tensor:
            (back_RD,) = link(ex, [recv_RD], [partial_RD], lambda g: g[0], lambda back: (back,), tape)
            return handle.token_sum(back_RD)

        return Pending(works, finish, (send_RD, recv_RD))
