"""Baseline: one row per (token, expert) pair through one all_to_all_single each way.

Equivalent to Megatron's AllToAll token dispatcher: permute by (destination rank, local expert),
exchange, regroup the received rows by local expert; combine reverses this and the *source*
applies the routing weights before summing a token's k rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from c2r_comm.dispatch.base import (DispatchHandle, Dispatcher, ExpertBatch,
                                    stats_from_splits)
from c2r_comm.dispatch.comm import all_to_all, exchange_counts


@dataclass(frozen=True)
class AllToAllHandle(DispatchHandle):
    send_splits: tuple[int, ...]  # rows to each rank
    recv_splits: tuple[int, ...]  # rows from each rank
    token_of_row_R: torch.Tensor  # source token of each sent row (send order)
    weight_of_row_R: torch.Tensor  # routing weight of each sent row (differentiable)
    expert_order_P: torch.Tensor  # received row feeding expert-grouped row p


def group_received_by_slot(recv_counts_WL: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows arrive source-major then slot; return the permutation that makes them slot-major.

    recv_counts_WL[src, slot] rows came from `src` for local `slot`, in that order.
    """
    W, L = recv_counts_WL.shape
    seg_slot = torch.arange(L, device=device).repeat(W)  # segment (src, slot) -> slot
    row_slot = torch.repeat_interleave(seg_slot, recv_counts_WL.reshape(-1).to(device))
    return torch.sort(row_slot, stable=True).indices


class AllToAllDispatcher(Dispatcher):
    name = "alltoall"

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        status, detail = self._check(x_TD, topk_idx_TK, topk_weight_TK)
        device, W, L = x_TD.device, self.world_size, self.num_local_experts
        T = x_TD.shape[0] if status == 0 else 0
        if status == 0:
            e2r, e2s = self.expert_maps(device)
            idx = topk_idx_TK.long().reshape(-1)
            bucket = e2r[idx] * L + e2s[idx]  # (destination rank, local slot) of each pair
            order = torch.sort(bucket, stable=True).indices
            counts_WL = torch.bincount(bucket, minlength=W * L).reshape(W, L)
            K = topk_idx_TK.shape[1]
        else:
            counts_WL = torch.zeros(W, L, dtype=torch.int64, device=device)
        recv_counts_WL = exchange_counts(counts_WL, status, self.groups.ep, detail,
                                        agree=self.agreed_values(x_TD, topk_idx_TK, topk_weight_TK))

        send_splits = counts_WL.sum(1).tolist()
        recv_splits = recv_counts_WL.sum(1).tolist()
        token_of_row = torch.div(order, K, rounding_mode="floor")
        (recv_x,) = all_to_all([x_TD.index_select(0, token_of_row)], recv_splits, send_splits, self.groups.ep)
        expert_order = group_received_by_slot(recv_counts_WL, device)
        tokens_per_expert = tuple(recv_counts_WL.sum(0).tolist())

        row_bytes = x_TD.shape[1] * x_TD.element_size()
        handle = AllToAllHandle(
            num_tokens=T, hidden_size=x_TD.shape[1], tokens_per_expert=tokens_per_expert,
            dispatch_stats=stats_from_splits(send_splits, row_bytes, self.rank, self.topology),
            combine_stats=stats_from_splits(recv_splits, row_bytes, self.rank, self.topology),
            send_splits=tuple(send_splits), recv_splits=tuple(recv_splits), token_of_row_R=token_of_row,
            weight_of_row_R=topk_weight_TK.reshape(-1).index_select(0, order), expert_order_P=expert_order)
        return ExpertBatch(recv_x.index_select(0, expert_order), tokens_per_expert), handle

    def combine(self, expert_out_PD, handle: AllToAllHandle):
        self.check_combine(expert_out_PD, handle)
        # Undo the slot grouping (scatter back to arrival order), then the exchange.
        back = torch.zeros_like(expert_out_PD).index_copy(0, handle.expert_order_P, expert_out_PD)
        (rows_RD,) = all_to_all([back], handle.send_splits, handle.recv_splits, self.groups.ep)
        weighted = rows_RD * handle.weight_of_row_R.to(rows_RD.dtype).unsqueeze(1)
        out = expert_out_PD.new_zeros(handle.num_tokens, handle.hidden_size)
        return out.index_add(0, handle.token_of_row_R, weighted)

