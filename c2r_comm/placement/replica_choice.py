"""Replica choice: which copy of each chosen expert a token goes to (every dispatcher's layout()
and the placement metrics use this one rule, so planned and dispatched copies agree).

With replicas (plan.replicas) an expert lives on up to H ranks. For every token this picks one
copy per choice, exactly, by enumerating every combination of copies (H^k of them, k the top-k)
on the device, in token chunks of bounded memory, and comparing lexicographically:
1. the fewest ranks other than the token's own (the rows a dedup dispatch sends over links); with
   `by_node` (the hierarchical exchange) first the fewest nodes other than its own, then those ranks;
2. the fewest distinct ranks (own rank included: rows the experts compute);
3. the least loaded copies of this batch: the sum over the token's choices of the load of the
   chosen copy's rank, where a rank's load is the number of this batch's (token, choice) pairs
   whose expert lives there alone (their load is fixed whatever the choice);
4. the first combination (copies in `hosts_of_expert` order: the primary first).
So the choice is deterministic and identical on every device. Cost: T x H^k x k small integers
(H = 1 + R); plans keep it bounded (PlacementPlan allows at most R copies per expert).

No host sync: shapes come from T, K and H; the per-rank counts the count exchange sends are
computed from the chosen ranks as without replicas.
"""
from __future__ import annotations

from functools import lru_cache

import torch

MAX_CHUNK_ELEMENTS = 1 << 22  # tokens x combinations x k per chunk (int64: 32 MB)


@lru_cache(maxsize=32)
def _combinations(num_hosts: int, k: int, device: str) -> torch.Tensor:
    n = num_hosts ** k
    digits = torch.arange(n, device=device).unsqueeze(1) // (num_hosts ** torch.arange(k - 1, -1, -1, device=device))
    return digits % num_hosts


def combinations(num_hosts: int, k: int, device: torch.device) -> torch.Tensor:
    """int64 [H^k, k]: column choice of every choice in each combination (base-H digits, the
    first choice's digit most significant, so combination 0 takes every primary). Cached."""
    return _combinations(num_hosts, k, str(device))


def _distinct(values_tCK: torch.Tensor, sentinel: int) -> torch.Tensor:
    """[t, C] distinct values below `sentinel` along the last dim."""
    ordered = torch.sort(values_tCK, dim=2).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return (new & (ordered < sentinel)).sum(2)


def choose_copies(idx_TK: torch.Tensor, valid_TK: torch.Tensor, host_rank_EH: torch.Tensor,
                  host_slot_EH: torch.Tensor, world_size: int, gpus_per_node: int, source_rank: int,
                  by_node: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank_TK, slot_TK): the chosen copy of every choice of `source_rank`'s tokens (entries of
    invalid choices: any copy; masked out by the caller).

    idx_TK: expert ids with dropped choices already replaced by a valid id (valid_TK says which)."""
    T, K = idx_TK.shape
    H = host_rank_EH.shape[1]
    device = idx_TK.device
    rank_TKH = host_rank_EH[idx_TK]
    slot_TKH = host_slot_EH[idx_TK]
    if H == 1 or T == 0 or K == 0:
        return rank_TKH[..., 0], slot_TKH[..., 0]
    W, G = world_size, gpus_per_node
    single_TK = (rank_TKH == rank_TKH[..., :1]).all(-1) & valid_TK
    forced_W = torch.zeros(W + 1, dtype=torch.int64, device=device).index_add_(
        0, torch.where(single_TK, rank_TKH[..., 0], W).reshape(-1), torch.ones(T * K, dtype=torch.int64, device=device))
    forced_W[W] = 0
    # Dropped choices go to rank W, which counts nowhere.
    rank_TKH = torch.where(valid_TK.unsqueeze(-1), rank_TKH, W)
    combo_CK = combinations(H, K, device)
    C = combo_CK.shape[0]
    base = K + 2  # every count below is at most K + 1
    chunk = max(1, MAX_CHUNK_ELEMENTS // (C * K))
    best = []
    for start in range(0, T, chunk):  # host loop over token chunks (shapes only: no sync)
        r_tKH = rank_TKH[start:start + chunk]
        t = r_tKH.shape[0]
        picked_tCK = torch.gather(r_tKH.unsqueeze(1).expand(t, C, K, H), 3,
                                  combo_CK.view(1, C, K, 1).expand(t, C, K, 1)).squeeze(3)
        ranks = _distinct(picked_tCK, W)
        remote_ranks = ranks - (picked_tCK == source_rank).any(2).long()
        key = remote_ranks * base + ranks
        if by_node:
            node_tCK = torch.where(picked_tCK < W, picked_tCK // G, W)
            remote_nodes = _distinct(node_tCK, W) - (node_tCK == source_rank // G).any(2).long()
            key = remote_nodes * base * base + key
        load = forced_W[picked_tCK].sum(2)
        # lexicographic: the smallest key first, then among those the least load, then the first
        load = torch.where(key == key.min(1, keepdim=True).values, load, torch.iinfo(torch.int64).max)
        best.append(load.argmin(1))
    combo_T = torch.cat(best)
    column_TK = combo_CK[combo_T]
    return (torch.gather(host_rank_EH[idx_TK], 2, column_TK.unsqueeze(2)).squeeze(2),
            torch.gather(slot_TKH, 2, column_TK.unsqueeze(2)).squeeze(2))
