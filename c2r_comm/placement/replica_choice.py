"""Replica choice: which copy of each chosen expert a token goes to (dispatch layout() and the
placement metrics use this one rule, so planned and dispatched copies agree).

With replicas (plan.replicas) an expert lives on up to H ranks. For every token this picks one
copy per choice so that the token touches the fewest distinct ranks (with `by_node`, the fewest
distinct nodes first, then ranks: what the hierarchical exchange pays for), exactly: every
combination of copies (H^k of them; k <= 8, H = 1 + R) is enumerated on the device, in token
chunks of bounded memory. Ties go to the less loaded copies of this batch: the score is the sum,
over the token's choices, of the load of the chosen copy's rank, where a rank's load is the number
of this batch's (token, choice) pairs whose expert lives on that rank alone (their load is fixed
whatever the choice). Remaining ties go to the first combination (copies in `hosts_of_expert`
order: the primary first), so the choice is deterministic and identical on every device.

No host sync: shapes come from T, K and H; the per-rank counts the count exchange sends are
computed from the chosen ranks as without replicas.
"""
from __future__ import annotations

import torch

MAX_CHUNK_ELEMENTS = 1 << 22  # tokens x combinations x k per chunk (int64: 32 MB)


def combinations(num_hosts: int, k: int, device: torch.device) -> torch.Tensor:
    """int64 [H^k, k]: column choice of every choice in each combination (base-H digits, the
    first choice's digit most significant, so combination 0 takes every primary)."""
    n = num_hosts ** k
    digits = torch.arange(n, device=device).unsqueeze(1) // (num_hosts ** torch.arange(k - 1, -1, -1, device=device))
    return digits % num_hosts


def choose_copies(idx_TK: torch.Tensor, valid_TK: torch.Tensor, host_rank_EH: torch.Tensor,
                  host_slot_EH: torch.Tensor, world_size: int, gpus_per_node: int,
                  by_node: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank_TK, slot_TK): the chosen copy of every choice (entries of invalid choices: the primary).

    idx_TK: expert ids with dropped choices already replaced by a valid id (valid_TK says which)."""
    T, K = idx_TK.shape
    H = host_rank_EH.shape[1]
    device = idx_TK.device
    rank_TKH = host_rank_EH[idx_TK]
    slot_TKH = host_slot_EH[idx_TK]
    if H == 1 or T == 0 or K == 0:
        return rank_TKH[..., 0], slot_TKH[..., 0]
    W = world_size
    single_TK = (rank_TKH == rank_TKH[..., :1]).all(-1) & valid_TK
    forced_W = torch.zeros(W + 1, dtype=torch.int64, device=device).index_add_(
        0, torch.where(single_TK, rank_TKH[..., 0], W).reshape(-1), torch.ones(T * K, dtype=torch.int64, device=device))
    forced_W[W] = 0
    # Dropped choices go to rank W, which counts nowhere.
    rank_TKH = torch.where(valid_TK.unsqueeze(-1), rank_TKH, W)
    combo_CK = combinations(H, K, device)
    C = combo_CK.shape[0]
    score_cap = T * K + 1  # the load score of one token is at most T*K
    chunk = max(1, MAX_CHUNK_ELEMENTS // (C * K))
    best = []
    for start in range(0, T, chunk):  # host loop over token chunks (shapes only: no sync)
        r_tKH = rank_TKH[start:start + chunk]
        t = r_tKH.shape[0]
        picked_tCK = torch.gather(r_tKH.unsqueeze(1).expand(t, C, K, H), 3,
                                  combo_CK.view(1, C, K, 1).expand(t, C, K, 1)).squeeze(3)
        ranks_sorted = torch.sort(picked_tCK, dim=2).values
        new_rank = torch.ones_like(ranks_sorted, dtype=torch.bool)
        new_rank[..., 1:] = ranks_sorted[..., 1:] != ranks_sorted[..., :-1]
        size = (new_rank & (ranks_sorted < W)).sum(2)
        if by_node:
            nodes_sorted = torch.sort(torch.where(picked_tCK < W, picked_tCK // gpus_per_node, W), dim=2).values
            new_node = torch.ones_like(nodes_sorted, dtype=torch.bool)
            new_node[..., 1:] = nodes_sorted[..., 1:] != nodes_sorted[..., :-1]
            size = (new_node & (nodes_sorted < W)).sum(2) * (K + 1) + size
        load = forced_W[picked_tCK].sum(2)
        key = (size * score_cap + load) * C + torch.arange(C, device=device)
        best.append(key.argmin(1))
    combo_T = torch.cat(best)
    column_TK = combo_CK[combo_T]
    return (torch.gather(host_rank_EH[idx_TK], 2, column_TK.unsqueeze(2)).squeeze(2),
            torch.gather(slot_TKH, 2, column_TK.unsqueeze(2)).squeeze(2))
