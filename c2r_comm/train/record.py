"""Record the training demo model's routing on some batches as a RoutingTrace (layers = MoE layers),
gathered from every rank, so `c2r-comm profile` and `c2r-comm plan` can work on the model's own routing."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.train.model import MoETransformerLM


@torch.no_grad()
def record_routing(model: MoETransformerLM, batches: Sequence[torch.Tensor], group: Any) -> RoutingTrace:
    """Every rank routes its `batches` (the same count and shapes on every rank); the trace holds
    rank 0's tokens, then rank 1's, ...; each sequence is one prompt."""
    ids = []
    for tokens_BS in batches:
        out = model(tokens_BS)
        ids.append(torch.stack(out.topk_idx_LTK, dim=1))  # [B*S, layers, k]
    mine = torch.cat(ids).to(torch.int64)
    device = mine.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(mine, device=device) for _ in range(dist.get_world_size(group))]
    with guard(group_site("routing record gather", group)):
        dist.all_gather(gathered, mine.to(device), group=group)
    expert_ids = torch.cat(gathered).cpu().numpy()
    seq = batches[0].shape[1] if batches else 1
    offsets = np.arange(0, expert_ids.shape[0] + 1, seq, dtype=np.int64)
    return RoutingTrace(expert_ids, offsets, model.moes[0].router.num_experts)
