"""Replica choice: which copy of each chosen expert a token goes to (every dispatcher's layout()
and the placement metrics use this one rule, so planned and dispatched copies agree).

With replicas (plan.replicas) an expert lives on up to H ranks. For every token this picks one
copy per choice by enumerating every combination of copies (H^k of them, k the top-k) on the
device, in token chunks of bounded memory. A combination's cover key, compared first:
1. the fewest ranks other than the token's own (the rows a dedup dispatch sends over links); with
   `by_node` (the hierarchical exchange) first the fewest nodes other than its own, then those ranks;
2. the fewest distinct ranks (own rank included: rows the experts compute).
Every token gets a combination of least key, exactly (tests: a brute-force minimum cover). The
enumeration is bounded: when H^k exceeds MAX_COMBINATIONS (16,384: k >= 9 at R = 2, k >= 7 at
R = 4; the memory of T x H^k keys would not be bounded otherwise) a greedy cover takes over
(`greedy_cover`): first every choice with a copy on the token's own node (by_node) and rank goes
there, which never costs a remote node or rank; then, k times, the node (by_node) and then the rank
holding copies of the most choices still open takes them (ties rotate with the token's index, so
a batch's tied tokens spread over the ranks instead of all going to the lowest id). Valid, not
always minimal (greedy set cover), no pricing: plan.copy_load_cap is not applied there; tests
compare it with the brute-force minimum.

Load: among equally small covers the choice balances this batch's rows per rank by Lagrangian
pricing. Each rank has a price per row; a token takes the combination of least key + summed
prices of the ranks its rows go to, where token t sees rank r's price x (1 + BALANCE_JITTER x
u(t, r)), u a fixed hash in [0, 1) (without it, tokens with the same experts would all switch
copies in the same round and never split). After each of BALANCE_ROUNDS rounds every rank's
price moves by (rows / mean rows - 1) x TIE_STEP key units, but falls to no less than
PRICE_DECAY x itself (a rank whose price dropped to 0 at once would draw the whole batch back the
next round). Tie prices stay below 1 / (k (1 + JITTER)) key units, so their sum over a token's k
choices never outweighs one unit of the key: the cover is exactly minimal whatever the load.
Given background_W (rows the other source ranks send each rank) the prices balance that sum
instead of this batch's rows alone. The dispatchers pass none: a lagged signal (the other ranks'
rows of two steps before, which the count exchange could carry for free) was simulated on the
trace and bought 0.2 % of aggregate load for 2 % more per-step imbalance, damped 0.6 % and 0.2 %
less (docs/benchmarks.md, `examples/replica_load_analysis.py --stream`); the same step's rows,
which need a collective and a second pricing pass per dispatch, moved it 1.137 -> 1.118 (`--exchange-pass`).

Load cap (plan.copy_load_cap, e.g. 1.10): a batch whose popular experts drifted from the plan's
fit can still load one rank far above the mean when only ties may move. With a cap, a second,
unbounded price per rank moves by (rows / mean - cap) x CAP_STEP x (k + 2) key units per round
(1 remote rank = k + 2 units; falling as slowly as the tie price), so tokens trade cover for
balance while the batch is above the cap.

The result is the round that is best by (max(load/mean, cap) with a cap, summed key, max load/mean),
the plain first-index choice being round 0. Deterministic: fixed rounds, first index on ties, fp32
whatever the ambient autocast (float rounding could break a near-tie differently on another device
type; each rank chooses only for its own tokens, so ranks never need to agree, and the cover is
minimal on every device). Cost: the key of every token and combination is kept between rounds,
with one cost table of the same size per round (2 x T x H^k float32: 5.8 KB per token at H = 3,
k = 6; 52 KB at k = 8), and a round is one [T, k*H] x [k*H, H^k] matmul, an argmin, a bincount
and ~20 small ops (about 600 torch ops per layout() with a replica plan, 1,000 with a cap, counted
with torch.profiler on CPU: launch-bound on a GPU, not measured there); no host sync, shapes come
from T, K, H.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

MAX_CHUNK_ELEMENTS = 1 << 22  # tokens x combinations x k per chunk of the key computation (int64: 32 MB)
MAX_COMBINATIONS = 1 << 14  # H^k above this (e.g. k >= 9 at R = 2, k >= 7 at R = 4): no enumeration
BALANCE_ROUNDS = 16  # pricing rounds
TIE_STEP = 0.16  # tie price change per round, key units per unit of load/mean off 1
CAP_STEP = 0.1  # cap price change per round, remote ranks (k + 2 key units) per unit of load/mean off the cap
PRICE_DECAY = 0.9  # a price falls by at most this factor per round (no flip-flop of whole batches)
BALANCE_JITTER = 0.5  # token t sees rank r's price x (1 + JITTER * u(t, r)), u in [0, 1) fixed


@lru_cache(maxsize=32)
def _combinations(num_hosts: int, k: int, device: str) -> torch.Tensor:
    n = num_hosts ** k
    digits = torch.arange(n, device=device).unsqueeze(1) // (num_hosts ** torch.arange(k - 1, -1, -1, device=device))
    return digits % num_hosts


@lru_cache(maxsize=32)
def _combination_onehot(num_hosts: int, k: int, device: str) -> torch.Tensor:
    """float32 [k*H, H^k]: 1 where combination c takes column h for choice k (row k*H + h). Cached."""
    combo_CK = _combinations(num_hosts, k, device)
    return torch.nn.functional.one_hot(combo_CK, num_hosts).to(torch.float32).reshape(len(combo_CK), -1).T.contiguous()


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
                  by_node: bool = False, load_cap: Optional[float] = None,
                  background_W: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank_TK, slot_TK): the chosen copy of every choice of `source_rank`'s tokens (entries of
    invalid choices: any copy; masked out by the caller).

    idx_TK: expert ids with dropped choices already replaced by a valid id (valid_TK says which).
    load_cap: the plan's copy_load_cap (None: load moves ties only).
    background_W: float [W] on the device, or None: rows the other source ranks send each rank; the
    prices then balance this batch's rows plus these instead of this batch's alone. An analysis hook:
    no dispatcher passes it (examples/replica_load_analysis.py: --stream simulates a lagged signal,
    --exchange-pass the same step's)."""
    T, K = idx_TK.shape
    if background_W is not None and tuple(background_W.shape) != (world_size,):
        raise ValueError(f"background_W has shape {tuple(background_W.shape)}: allowed ({world_size},), one value per rank")
    H = host_rank_EH.shape[1]
    device = idx_TK.device
    rank_TKH = host_rank_EH[idx_TK]
    slot_TKH = host_slot_EH[idx_TK]
    if H == 1 or T == 0 or K == 0:
        return rank_TKH[..., 0], slot_TKH[..., 0]
    if H ** K > MAX_COMBINATIONS:  # too many combinations to enumerate: a greedy cover
        column_TK = greedy_cover(rank_TKH, valid_TK, world_size, gpus_per_node, source_rank, by_node)
        return (torch.gather(rank_TKH, 2, column_TK.unsqueeze(2)).squeeze(2),
                torch.gather(slot_TKH, 2, column_TK.unsqueeze(2)).squeeze(2))
    W = world_size
    copy_rank_TKH = rank_TKH
    rank_TKH = torch.where(valid_TK.unsqueeze(-1), rank_TKH, W)  # dropped choices: rank W, counted nowhere
    combo_CK = combinations(H, K, device)
    key_TC = cover_keys(rank_TKH, combo_CK, W, gpus_per_node, source_rank, by_node)
    combo_T = _priced(key_TC, rank_TKH, combo_CK, W, load_cap, K + 2, background_W)
    column_TK = combo_CK[combo_T]
    return (torch.gather(copy_rank_TKH, 2, column_TK.unsqueeze(2)).squeeze(2),
            torch.gather(slot_TKH, 2, column_TK.unsqueeze(2)).squeeze(2))


def greedy_cover(rank_TKH: torch.Tensor, valid_TK: torch.Tensor, world_size: int, gpus_per_node: int,
                 source_rank: int, by_node: bool) -> torch.Tensor:
    """int64 [T, K]: the column (copy) each choice takes, by the greedy cover of the module doc.
    rank_TKH: the copies' ranks (an expert with fewer copies repeats its primary); invalid choices
    (valid_TK False) take column 0. Fixed step count, no host sync."""
    T, K, H = rank_TKH.shape
    device = rank_TKH.device
    earlier_HH = torch.ones(H, H, dtype=torch.bool, device=device).tril(-1)  # [h, h']: h' < h
    token_T = torch.arange(T, device=device)

    def first_copies(group_TKH: torch.Tensor) -> torch.Tensor:
        """[T, K, H] the first column of each distinct group value per choice (counted once)."""
        same_TKHH = group_TKH.unsqueeze(-1) == group_TKH.unsqueeze(-2)
        return ~(same_TKHH & earlier_HH).any(-1)

    def cover(group_TKH: torch.Tensor, groups: int, own: int, allowed_TKH: torch.Tensor,
              open_TK: torch.Tensor) -> torch.Tensor:
        """[T, K, H] the copies left allowed after each open choice was given one group: its own
        group's first where it has a copy there, then K greedy steps over groups."""
        counted_TKH = first_copies(torch.where(allowed_TKH, group_TKH, groups))
        # ties: the group at (g - t) mod groups smallest, i.e. rotating with the token's index
        rotation_TG = (torch.arange(groups, device=device) - token_T.unsqueeze(1)).remainder(groups)
        for step in range(K + 1):  # step 0: the own group; then the group covering most open choices
            if step == 0:
                best_T = torch.full((T,), own, dtype=torch.long, device=device)
            else:
                w_TKH = (open_TK.unsqueeze(-1) & allowed_TKH & counted_TKH).to(torch.float32)
                count_TG = torch.zeros(T, groups + 1, device=device).scatter_add_(
                    1, torch.where(allowed_TKH, group_TKH, groups).reshape(T, K * H), w_TKH.reshape(T, K * H))
                best_T = (count_TG[:, :groups] * groups - rotation_TG).argmax(1)
            hit_TKH = (group_TKH == best_T.view(T, 1, 1)) & allowed_TKH & open_TK.unsqueeze(-1)
            hit_TK = hit_TKH.any(-1)
            allowed_TKH = torch.where(hit_TK.unsqueeze(-1), hit_TKH, allowed_TKH)
            open_TK = open_TK & ~hit_TK
        return allowed_TKH

    allowed_TKH = torch.ones_like(rank_TKH, dtype=torch.bool)
    if by_node:
        G = gpus_per_node
        allowed_TKH = cover(rank_TKH // G, world_size // G, source_rank // G, allowed_TKH, valid_TK.clone())
    allowed_TKH = cover(rank_TKH, world_size, source_rank, allowed_TKH, valid_TK.clone())
    return torch.where(valid_TK, allowed_TKH.to(torch.int8).argmax(-1), 0)


def cover_keys(rank_TKH: torch.Tensor, combo_CK: torch.Tensor, world_size: int, gpus_per_node: int, source_rank: int,
               by_node: bool) -> torch.Tensor:
    """float32 [T, C]: the cover key of every token's every combination (module docstring; key unit
    K + 2, as every count is at most K + 1). rank_TKH: the copies' ranks, world_size for dropped choices."""
    T, K, H = rank_TKH.shape
    W, G, C = world_size, gpus_per_node, combo_CK.shape[0]
    base = K + 2
    chunk = max(1, MAX_CHUNK_ELEMENTS // (C * K))
    key_TC = torch.empty(T, C, dtype=torch.float32, device=rank_TKH.device)
    for start in range(0, T, chunk):  # host loop over token chunks (shapes only: no sync)
        r_tKH = rank_TKH[start:start + chunk]
        t = r_tKH.shape[0]
        picked_tCK = torch.gather(r_tKH.unsqueeze(1).expand(t, C, K, H), 3,
                                  combo_CK.view(1, C, K, 1).expand(t, C, K, 1)).squeeze(3)
        ranks = _distinct(picked_tCK, W)
        key = (ranks - (picked_tCK == source_rank).any(2).long()) * base + ranks
        if by_node:
            node_tCK = torch.where(picked_tCK < W, picked_tCK // G, W)
            remote_nodes = _distinct(node_tCK, W) - (node_tCK == source_rank // G).any(2).long()
            key = remote_nodes * base * base + key
        key_TC[start:start + t] = key
    return key_TC


def _priced(key_TC: torch.Tensor, rank_TKH: torch.Tensor, combo_CK: torch.Tensor, world_size: int,
            load_cap: Optional[float], key_unit: int, background_W: Optional[torch.Tensor] = None,
            rounds: int = BALANCE_ROUNDS) -> torch.Tensor:
    """[T] the chosen combination of every token: the pricing rounds of the module docstring.
    rank_TKH: the copies' ranks, world_size for dropped choices; background_W: see choose_copies;
    rounds: the dispatchers' BALANCE_ROUNDS (analyses may ask for more)."""
    with torch.autocast(key_TC.device.type, enabled=False):  # fp32 prices and matmul under any autocast
        return _priced_fp32(key_TC, rank_TKH, combo_CK, world_size, load_cap, key_unit, background_W, rounds)


def _priced_fp32(key_TC: torch.Tensor, rank_TKH: torch.Tensor, combo_CK: torch.Tensor, world_size: int,
                 load_cap: Optional[float], key_unit: int, background_W: Optional[torch.Tensor],
                 rounds: int) -> torch.Tensor:
    T, K, H = rank_TKH.shape
    W = world_size
    device = key_TC.device
    arange_T = torch.arange(T, device=device)
    onehot_JC = _combination_onehot(H, K, str(device))
    cell_TW = torch.arange(T * (W + 1), dtype=torch.int64, device=device).view(T, W + 1)
    sense_TW = 1.0 + BALANCE_JITTER * ((cell_TW * 2654435761) % (1 << 32)).to(torch.float32) / float(1 << 32)
    flat_TJ = rank_TKH.reshape(T, K * H)
    ones_TK = torch.ones(T * K, dtype=torch.float32, device=device)
    tie_max = 0.99 / (K * (1.0 + BALANCE_JITTER))  # K tie prices stay below one key unit

    def score(c_T: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(load/mean per rank, the round's score). With a cap: [max(load/mean, cap), summed key,
        max load/mean]; without, every round keeps minimum keys (tie prices sum below one key
        unit), so the score is the max load/mean alone."""
        ranks_TK = torch.gather(rank_TKH, 2, combo_CK[c_T].unsqueeze(2)).squeeze(2)
        load_W = torch.zeros(W + 1, dtype=torch.float32, device=device).index_add_(0, ranks_TK.reshape(-1), ones_TK)[:W]
        if background_W is not None:
            load_W = load_W + background_W
        ratio_W = load_W / load_W.mean().clamp(min=1.0 / W)
        top = ratio_W.max()
        if load_cap is None:
            return ratio_W, [top]
        summed = key_TC[arange_T, c_T].to(torch.int64).sum()  # integers: exact
        return ratio_W, [top.clamp(min=load_cap), summed, top]

    combo_T = key_TC.argmin(1)  # round 0: the first combination of least key
    ratio_W, best = score(combo_T)
    tie_W = torch.zeros(W + 1, dtype=torch.float32, device=device)  # rank W: dropped choices, free
    cap_W = torch.zeros(W + 1, dtype=torch.float32, device=device)
    for _ in range(rounds):  # fixed count: no host sync
        tie_W[:W] = torch.maximum(tie_W[:W] + TIE_STEP * (ratio_W - 1.0), PRICE_DECAY * tie_W[:W]).clamp(max=tie_max)
        if load_cap is not None:
            cap_W[:W] = torch.maximum(cap_W[:W] + CAP_STEP * key_unit * (ratio_W - load_cap), PRICE_DECAY * cap_W[:W])
        price_W = tie_W + cap_W if load_cap is not None else tie_W
        cost_TC = torch.addmm(key_TC, torch.gather(sense_TW * price_W, 1, flat_TJ), onehot_JC)
        c_T = cost_TC.argmin(1)
        ratio_W, now = score(c_T)
        better = _lexicographic_less(now, best)
        combo_T = torch.where(better, c_T, combo_T)
        best = [torch.where(better, n, b) for n, b in zip(now, best)]
    return combo_T


def _lexicographic_less(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: a < b comparing the scalars in order (on the device)."""
    less = torch.zeros((), dtype=torch.bool, device=a[0].device)
    equal = torch.ones((), dtype=torch.bool, device=a[0].device)
    for x, y in zip(a, b):
        less = less | (equal & (x < y))
        equal = equal & (x == y)
    return less
