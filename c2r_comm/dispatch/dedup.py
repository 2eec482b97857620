"""One row per (token, destination rank); partial sums come back one per (token, rank).

The receiver expands each row to its local experts using the slot ids sent beside it, and after
the experts it sums their weighted outputs per row, so the return trip also carries one row per
(token, rank) instead of one per (token, expert).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, stats_from_splits
from c2r_comm.dispatch.comm import (all_to_all, all_to_all_plain, as_bytes, exchange_counts, from_bytes,
                                    metadata_dtype)
from c2r_comm.dispatch.layout import expand_to_slots, group_layout


@dataclass(frozen=True)
class DedupHandle(DispatchHandle):
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    token_of_row_R: torch.Tensor  # source token of each sent row
    row_of_pair_P: torch.Tensor  # received row of each expert input row
    weight_of_pair_P: torch.Tensor  # routing weight of each expert input row (differentiable)


def slot_metadata(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, token_of_row_R: torch.Tensor,
                  member_RK: torch.Tensor, slot_of_expert: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the destination's local slot of each of the token's choices (-1 if elsewhere), and
    the matching routing weights (0 elsewhere)."""
    slot_RK = torch.where(member_RK, slot_of_expert[topk_idx_TK.long().index_select(0, token_of_row_R)], -1)
    weight_RK = topk_weight_TK.index_select(0, token_of_row_R) * member_RK
    return slot_RK.to(dtype), weight_RK


class DedupDispatcher(Dispatcher):
    name = "dedup"

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        status, detail = self._check(x_TD, topk_idx_TK, topk_weight_TK)
        device, W = x_TD.device, self.world_size
        if status == 0:
            e2r, e2s = self.expert_maps(device)
            layout = group_layout(topk_idx_TK, e2r, W)
            counts = layout.counts_G.unsqueeze(1)
        else:
            counts = torch.zeros(W, 1, dtype=torch.int64, device=device)
        recv_splits = exchange_counts(counts, status, self.groups.ep, detail,
                                     agree=self.agreed_values(x_TD, topk_idx_TK, topk_weight_TK))[:, 0].tolist()
        send_splits = layout.counts_G.tolist()

        slot_RK, weight_RK = slot_metadata(topk_idx_TK, topk_weight_TK, layout.token_of_row_R, layout.member_RK, e2s,
                                           metadata_dtype(self.num_local_experts))
        recv_slot = from_bytes(all_to_all_plain(as_bytes(slot_RK), recv_splits, send_splits, self.groups.ep),
                               slot_RK.dtype)
        recv_x, recv_w = all_to_all([x_TD.index_select(0, layout.token_of_row_R), weight_RK],
                                    recv_splits, send_splits, self.groups.ep)
        expansion = expand_to_slots(recv_slot, self.num_local_experts)

        K = topk_idx_TK.shape[1]
        x_bytes = x_TD.shape[1] * x_TD.element_size()
        meta_bytes = K * (slot_RK.element_size() + weight_RK.element_size())
        handle = DedupHandle(
            num_tokens=x_TD.shape[0], hidden_size=x_TD.shape[1], tokens_per_expert=expansion.tokens_per_expert,
            dispatch_stats=stats_from_splits(send_splits, x_bytes + meta_bytes, self.rank, self.topology),
            combine_stats=stats_from_splits(recv_splits, x_bytes, self.rank, self.topology),
            send_splits=tuple(send_splits), recv_splits=tuple(recv_splits), token_of_row_R=layout.token_of_row_R,
            row_of_pair_P=expansion.row_of_pair_P,
            weight_of_pair_P=recv_w.reshape(-1).index_select(0, expansion.choice_of_pair_P))
        return ExpertBatch(recv_x.index_select(0, expansion.row_of_pair_P), expansion.tokens_per_expert), handle

    def combine(self, expert_out_PD, handle: DedupHandle):
        self.check_combine(expert_out_PD, handle)
        weighted = expert_out_PD * handle.weight_of_pair_P.to(expert_out_PD.dtype).unsqueeze(1)
        # Local reduction: one partial per received row, i.e. per (token, source rank).
        partial = expert_out_PD.new_zeros(sum(handle.recv_splits), handle.hidden_size)
        partial = partial.index_add(0, handle.row_of_pair_P, weighted)
        (back_RD,) = all_to_all([partial], handle.send_splits, handle.recv_splits, self.groups.ep)
        out = expert_out_PD.new_zeros(handle.num_tokens, handle.hidden_size)
        return out.index_add(0, handle.token_of_row_R, back_RD)
