"""Capacity mode's padding (RoutingConfig.pad_to_capacity): fixed rows per local expert.

Megatron's `moe_pad_expert_input_to_capacity` gives every expert exactly capacity x EP-size rows,
so expert GEMM shapes never change between steps (CUDA graphs, tuned kernels). Megatron pads on
the wire, sending real tokens with weight 0; here the dispatchers send only the kept choices and
the receiving rank appends zero rows after the exchange: the same expert shapes and the same
results, with no padding bytes on the links. Capacity is per source rank (routing/capacity.py),
so the padded size assumes every rank routes the same number of tokens, as Megatron does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from c2r_comm.dispatch.layout import expert_offsets


@dataclass(frozen=True)
class PaddedExperts:
    """`experts` (GroupedExperts' call signature) run on exactly rows_per_expert rows per local
    expert: the real rows first in each group, zero rows after; outputs of the real rows return."""

    experts: nn.Module
    rows_per_expert: int  # capacity x EP size
    rank: int  # named by the error when a group is larger

    def __call__(self, x_PD: torch.Tensor, tokens_per_expert: Sequence[int],
                 offsets_E: Optional[torch.Tensor] = None, weight_P: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, L = self.rows_per_expert, len(tokens_per_expert)
        for slot, rows in enumerate(tokens_per_expert):  # host ints from the count exchange: no sync
            if rows > n:  # cannot happen when every rank routed the same number of tokens (the
                # dispatcher's equal_tokens agreement); a caller that bypasses it learns why here
                raise ValueError(
                    f"rank {self.rank}: routing.pad_to_capacity: local expert slot {slot} received {rows} rows, more "
                    f"than capacity x EP size = {n}; capacity is computed per rank from its own tokens, so padding "
                    "needs the same number of tokens on every rank (build the dispatcher with equal_tokens=True)")
        device, P = x_PD.device, x_PD.shape[0]
        if offsets_E is not None:  # the count exchange's device offsets: no host->device copy
            ends_L = offsets_E.to(torch.int64)
            counts_L = ends_L - torch.cat([ends_L.new_zeros(1), ends_L[:-1]])
        else:
            counts_L = torch.tensor(tokens_per_expert, dtype=torch.int64).to(device, non_blocking=True)
        slot_P = torch.repeat_interleave(torch.arange(L, device=device), counts_L, output_size=P)
        start_L = torch.cumsum(counts_L, 0) - counts_L
        pos_P = slot_P * n + torch.arange(P, device=device) - start_L[slot_P]  # place in the padded groups
        x_pad = x_PD.new_zeros(L * n, x_PD.shape[1]).index_copy(0, pos_P, x_PD)
        w_pad = None if weight_P is None else weight_P.new_zeros(L * n).index_copy(0, pos_P, weight_P)
        full = (n,) * L
        y_pad = self.experts(x_pad, full, expert_offsets(torch.full((L,), n, dtype=torch.int64, device=device)), w_pad)
        return y_pad.index_select(0, pos_P)
