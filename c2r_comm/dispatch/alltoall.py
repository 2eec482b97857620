"""Baseline: one row per (token, expert) pair through one all_to_all_single each way.

The exchange of Megatron's AllToAll token dispatcher: permute by (destination rank, local expert),
exchange, regroup the received rows by local expert; combine reverses this and the *source*
applies the routing weights before summing a token's k rows (megatron-core 0.16's experts weight
their rows themselves; the Megatron adapter, integrations/megatron.py, follows that contract).
Only token rows travel: the count exchange already says how many rows of each (source, slot)
arrive, so no metadata is sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from c2r_comm.comm_failures import CommSite
from c2r_comm.counting import bucket_counts
from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, Route, RouteStage
from c2r_comm.dispatch.comm import CountExchange
from c2r_comm.dispatch.exchange_plan import ExchangePlan, StageTraffic
from c2r_comm.dispatch.layout import RankGeometry, expert_offsets, valid_choices
from c2r_comm.dispatch.row_sum import RowSum, csr_sum_available, sources_by_destination
from c2r_comm.dispatch.transport import Exchange, LinkTape, Pending, link


@dataclass(frozen=True)
class AllToAllPlan(ExchangePlan):
    pair_order_R: torch.Tensor  # int64 [T*K]: flat (token, choice) index of each sent row, send order
    token_of_row_R: torch.Tensor  # int64 [T*K]: source token of each sent row

    def token_sum(self, rows: int, dtype: torch.dtype, use_csr: Optional[bool] = None) -> RowSum:
        """Sum of the `rows` sent rows (T*K less the dropped choices, which sort last) into their
        tokens: row of (token, k) from the inverse of pair_order_R, ascending per token with one
        small sort (no global sort)."""
        n, T, K = self.pair_order_R.shape[0], self.num_tokens, self.top_k
        if not (csr_sum_available(self.pair_order_R.device, dtype) if use_csr is None else use_csr):
            return RowSum.build(self.token_of_row_R[:rows], T, dtype, use_csr=False)  # index_add_: no order needed
        row_of_pair = torch.empty_like(self.pair_order_R).scatter_(
            0, self.pair_order_R, torch.arange(n, device=self.pair_order_R.device))
        by_token, per_token = sources_by_destination(row_of_pair.reshape(T, K), row_of_pair.reshape(T, K) < rows, rows)
        return RowSum.build(self.token_of_row_R[:rows], T, dtype, by_token, per_token, use_csr=True)


@dataclass(frozen=True)
class AllToAllHandle(DispatchHandle):
    expert_order_P: torch.Tensor  # received row feeding expert-grouped row p
    arrival_of_P: torch.Tensor  # inverse: expert-grouped row of each received row
    token_sum: RowSum  # the returned rows into their tokens (combine; dispatch backward)


def group_received_by_slot(recv_counts_WL: torch.Tensor, total: int) -> torch.Tensor:
    """Rows arrive source-major then slot; return the permutation that makes them slot-major.

    recv_counts_WL[src, slot] rows came from `src` for local `slot`, in that order (device tensor;
    `total` is its sum, known on the host, so nothing here waits for the device).
    """
    W, L = recv_counts_WL.shape
    seg_slot = torch.arange(L, device=recv_counts_WL.device).repeat(W)  # segment (src, slot) -> slot
    row_slot = torch.repeat_interleave(seg_slot, recv_counts_WL.reshape(-1), output_size=total)
    return torch.sort(row_slot, stable=True).indices


class AllToAllDispatcher(Dispatcher):
    name = "alltoall"
    weights_at_experts = False  # the source weights the k returned rows at combine

    @staticmethod
    def layout_rank(geo: RankGeometry, x_TD, topk_idx_TK, topk_weight_TK, status, status_detail,
                    agree) -> AllToAllPlan:
        W, L, rank = geo.world_size, geo.num_local_experts, geo.rank
        T, K = topk_idx_TK.shape
        valid_TK, idx_TK = valid_choices(topk_idx_TK)
        rank_TK, slot_TK = geo.copies(idx_TK, valid_TK)
        valid = valid_TK.reshape(-1)
        # (destination rank, local slot) of each pair; dropped choices sort last and are not sent
        bucket = torch.where(valid, (rank_TK * L + slot_TK).reshape(-1), W * L)
        order = torch.sort(bucket, stable=True).indices
        counts_WL = bucket_counts(bucket, W * L, valid).reshape(W, L)
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        stage = StageTraffic("all2all", (rank,) * W, counts_WL.sum(1), row_bytes, row_bytes)
        return AllToAllPlan(AllToAllDispatcher.name, rank, W, T, x_TD.shape[1], K, (stage,), counts_WL, status,
                            status_detail, agree, order, torch.div(order, max(K, 1), rounding_mode="floor"))

    def _route(self, plan: AllToAllPlan, counts: CountExchange, site: CommSite) -> Route:
        ex = Exchange(self.groups.ep, tuple(range(self.world_size)), tuple(counts.sent_WC.sum(1).tolist()),
                      tuple(counts.recv_WC.sum(1).tolist()), sparse=False, site=site, stage="all2all")
        st = plan.stages[0]
        return Route(plan, (RouteStage(ex, ex.peers, st.dispatch_row_bytes, st.combine_row_bytes),),
                     tuple(counts.recv_WC.sum(0).tolist()), expert_offsets(counts.recv_device_WC.sum(0)), counts)

    def _send(self, x_TD, topk_weight_TK, route: Route, tape: Optional[LinkTape]) -> Pending:
        plan: AllToAllPlan = route.plan
        ex = route.stages[0].exchange
        token_of_row = plan.token_of_row_R[:ex.rows_sent]
        send_RD = x_TD.detach().index_select(0, token_of_row)
        recv_RD = send_RD.new_empty(ex.rows_received, plan.hidden_size)
        works = ex.start(send_RD, recv_RD)

        def finish() -> tuple[ExpertBatch, AllToAllHandle]:
            token_sum = plan.token_sum(ex.rows_sent, x_TD.dtype)
            (recv_x,) = link(ex, [recv_RD], [x_TD], lambda g: g[0], lambda back: (token_sum.sum(back),), tape)
            expert_order = group_received_by_slot(route.counts.recv_device_WC, ex.rows_received)
            arrival_of = torch.empty_like(expert_order)
            arrival_of[expert_order] = torch.arange(expert_order.numel(), device=expert_order.device)
            weight_of_row = topk_weight_TK.reshape(-1).index_select(0, plan.pair_order_R[:ex.rows_sent])
            handle = AllToAllHandle(route, weight_of_row, self.rank, self.topology, expert_order, arrival_of, token_sum)
            return ExpertBatch(recv_x.index_select(0, expert_order), route.tokens_per_expert, route.offsets_E), handle

        return Pending(works, finish, (send_RD, recv_RD))

    def _combine_start(self, expert_out_PD, handle: AllToAllHandle, weighted: bool,
                       tape: Optional[LinkTape]) -> Pending:
        ex = handle.route.stages[0].exchange.reversed()
        D = handle.hidden_size
        # Back to arrival order (one gather), then the return trip.
        send_RD = expert_out_PD.detach().index_select(0, handle.arrival_of_P)
        recv_RD = send_RD.new_empty(ex.rows_received, D)
        works = ex.start(send_RD, recv_RD)

        def finish() -> torch.Tensor:
            (rows_RD,) = link(ex, [recv_RD], [expert_out_PD], lambda g: g[0],
                              lambda back: (back.index_select(0, handle.expert_order_P),), tape)
            weighted = rows_RD * handle.combine_weight.to(rows_RD.dtype).unsqueeze(1)
            return handle.token_sum(weighted)

        return Pending(works, finish, (send_RD, recv_RD))
