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

from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, Route, RouteStage
from c2r_comm.dispatch.comm import CountExchange, metadata_dtype
from c2r_comm.dispatch.exchange_plan import ExchangePlan, StageTraffic
from c2r_comm.dispatch.layout import RankGeometry, bucket_counts, expert_offsets, group_rows, pairs_by_slot
from c2r_comm.dispatch.pack import RowFormat
from c2r_comm.dispatch.transport import Exchange, Pending, link, scatter_rows


def token_format(x_TD: torch.Tensor, topk_weight_TK: torch.Tensor, id_dtype: torch.dtype) -> RowFormat:
    """Dispatch row: token, the token's k weights, a per-choice id (slot or node-local code)."""
    K = topk_weight_TK.shape[1]
    return RowFormat.of(x=(x_TD.dtype, x_TD.shape[1]), w=(topk_weight_TK.dtype, K), id=(id_dtype, K))


def grad_format(fmt: RowFormat) -> RowFormat:
    """Backward of a dispatch row: gradients of the token and of its weights."""
    i, j = fmt.names.index("x"), fmt.names.index("w")
    return RowFormat.of(x=(fmt.dtypes[i], fmt.widths[i]), w=(fmt.dtypes[j], fmt.widths[j]))


def expanded_grad_packer(gfmt: RowFormat, row_of_pair_P: torch.Tensor, rows: int):
    """Backward of `x_PD = recv_x.index_select(0, row_of_pair_P)` fused with the gradient packing:
    expert-row gradients are added straight into their received row's slot of the send buffer."""
    def pack(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        g_x_PD, g_w_RK = grads
        buf = torch.zeros(rows, gfmt.row_bytes, dtype=torch.uint8, device=g_x_PD.device)
        gfmt.view(buf, "x").index_add_(0, row_of_pair_P, g_x_PD)
        gfmt.view(buf, "w").copy_(g_w_RK)
        return buf
    return pack


def link_token_rows(ex: Exchange, fmt: RowFormat, recv_RB: torch.Tensor, x_TD: torch.Tensor,
                    topk_weight_TK: torch.Tensor, token_of_row_R: torch.Tensor,
                    row_of_pair_P: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Received (x, w) as a function of (x_TD, topk_weight_TK); backward returns their gradients
    to the source rows and adds them up per token. With row_of_pair_P, x comes back expanded to
    one row per expert input (x_PD), the gather and its backward fused into this link."""
    gfmt, T = grad_format(fmt), x_TD.shape[0]
    recv_x = fmt.view(recv_RB, "x")
    if row_of_pair_P is None:
        pack = lambda g: gfmt.pack_rows({"x": g[0], "w": g[1]})  # noqa: E731
    else:
        recv_x = recv_x.index_select(0, row_of_pair_P)
        pack = expanded_grad_packer(gfmt, row_of_pair_P, recv_RB.shape[0])
    return link(ex, [recv_x, fmt.view(recv_RB, "w")], [x_TD, topk_weight_TK], pack,
                lambda back: (scatter_rows(gfmt.view(back, "x"), token_of_row_R, T),
                              scatter_rows(gfmt.view(back, "w"), token_of_row_R, T)))


def weighted_partials(expert_out_PD: torch.Tensor, weight_P: Optional[torch.Tensor], row_of_pair_P: torch.Tensor,
                      rows: int) -> torch.Tensor:
    """Sum each received row's expert outputs with their routing weights (None: the outputs are
    weighted already): one partial per row."""
    if weight_P is not None:
        expert_out_PD = expert_out_PD * weight_P.to(expert_out_PD.dtype).unsqueeze(1)
    return expert_out_PD.new_zeros(rows, expert_out_PD.shape[1]).index_add_(0, row_of_pair_P, expert_out_PD)


@dataclass(frozen=True)
class DedupPlan(ExchangePlan):
    token_of_row_R: torch.Tensor  # int64 [T*K] (real rows first): source token of each sent row
    slot_RK: torch.Tensor  # [T*K, K] metadata_dtype: destination slot per choice, -1 elsewhere
    row_format: RowFormat


@dataclass(frozen=True)
class DedupHandle(DispatchHandle):
    row_of_pair_P: torch.Tensor  # received row of each expert input row


class DedupDispatcher(Dispatcher):
    name = "dedup"

    @staticmethod
    def layout_rank(geo: RankGeometry, x_TD, topk_idx_TK, topk_weight_TK, status, status_detail,
                    agree) -> DedupPlan:
        W, L, rank = geo.world_size, geo.num_local_experts, geo.rank
        e2r, e2s = geo.rank_of_expert_E, geo.slot_of_expert_E
        T, K = topk_idx_TK.shape
        rank_TK, slot_TK = e2r[topk_idx_TK], e2s[topk_idx_TK]
        rows = group_rows(rank_TK, W)
        pairs_WL = bucket_counts(rank_TK * L + slot_TK, W * L).reshape(W, L)
        meta = metadata_dtype(L)
        slot_RK = torch.where(rows.member_RK, slot_TK.index_select(0, rows.token_of_row_R), -1).to(meta)
        fmt = token_format(x_TD, topk_weight_TK, meta)
        stage = StageTraffic("all2all", (rank,) * W, rows.counts_G, fmt.row_bytes,
                             x_TD.shape[1] * x_TD.element_size())
        return DedupPlan(DedupDispatcher.name, rank, W, T, x_TD.shape[1], K, (stage,),
                         torch.cat([rows.counts_G.unsqueeze(1), pairs_WL], 1), status, status_detail, agree,
                         rows.token_of_row_R, slot_RK, fmt)

    def _route(self, plan: DedupPlan, counts: CountExchange) -> Route:
        ex = Exchange(self.groups.ep, tuple(range(self.world_size)), tuple(counts.sent_WC[:, 0].tolist()),
                      tuple(counts.recv_WC[:, 0].tolist()), sparse=False)
        st = plan.stages[0]
        return Route(plan, (RouteStage(ex, ex.peers, st.dispatch_row_bytes, st.combine_row_bytes),),
                     tuple(counts.recv_WC[:, 1:].sum(0).tolist()),
                     expert_offsets(counts.recv_device_WC[:, 1:].sum(0)), counts)

    def _send(self, x_TD, topk_weight_TK, route: Route) -> Pending:
        plan: DedupPlan = route.plan
        ex, fmt = route.stages[0].exchange, plan.row_format
        R = ex.rows_sent
        token_of_row = plan.token_of_row_R[:R]
        send_RB = fmt.pack(R, x_TD.device, {"x": (x_TD, token_of_row), "w": (topk_weight_TK, token_of_row),
                                            "id": plan.slot_RK[:R]})
        recv_RB = fmt.empty(ex.rows_received, x_TD.device)
        works = ex.start(send_RB, recv_RB)

        def finish() -> tuple[ExpertBatch, DedupHandle]:
            pairs = pairs_by_slot(fmt.view(recv_RB, "id"), self.num_local_experts, sum(route.tokens_per_expert))
            x_PD, recv_w = link_token_rows(ex, fmt, recv_RB, x_TD, topk_weight_TK, token_of_row, pairs.row_of_pair_P)
            weight_P = recv_w.reshape(-1).index_select(0, pairs.choice_of_pair_P)
            handle = DedupHandle(route, weight_P, self.rank, self.topology, pairs.row_of_pair_P)
            return ExpertBatch(x_PD, route.tokens_per_expert, route.offsets_E, weight_P), handle

        return Pending(works, finish, (send_RB, recv_RB))

    def _combine_start(self, expert_out_PD, handle: DedupHandle, weighted: bool) -> Pending:
        plan: DedupPlan = handle.route.plan
        ex = handle.route.stages[0].exchange.reversed()
        partial_RD = weighted_partials(expert_out_PD, None if weighted else handle.combine_weight,
                                       handle.row_of_pair_P, ex.rows_sent)
        send_RD = partial_RD.detach()
        recv_RD = send_RD.new_empty(ex.rows_received, handle.hidden_size)
        works = ex.start(send_RD, recv_RD)

        def finish() -> torch.Tensor:
            (back_RD,) = link(ex, [recv_RD], [partial_RD], lambda g: g[0], lambda back: (back,))
            token_of_row = plan.token_of_row_R[:ex.rows_received]
            return back_RD.new_zeros(handle.num_tokens, handle.hidden_size).index_add_(0, token_of_row, back_RD)

        return Pending(works, finish, (send_RD, recv_RD))
