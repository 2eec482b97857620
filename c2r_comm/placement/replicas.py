"""Replica selection: fill R replica slots per GPU so that tokens touch fewer GPUs (and nodes).

Objective: a token's cost is the minimum number of distinct GPUs that hold a copy of each of its
k experts (a minimum set cover over W GPUs, exact), on multi-node topologies plus (k+1) x the
minimum number of nodes (exact too; nodes first, as the hierarchical exchange pays). The two
minima are taken separately, so on several nodes the GPU term is a lower bound of what the
hierarchical choice (fewest nodes, then ranks) realises. It is computed for
every fit token with packed bitsets: a set S of GPUs covers a token iff S meets every expert's
host set, so with the 2^W subsets as bits, the subsets that cover the token are the AND over its
experts of a per-host-set table, and its minimum cover is the smallest popcount level that this
AND hits (W <= 12: at most 4,096 subsets, 64 words per token).

Search: greedy, then local search. Each greedy step evaluates every allowed (expert, GPU) copy
exactly -- the new cover of every token holding that expert, from the AND of its other experts'
tables kept per (token, choice) -- and takes the largest reduction of the summed objective; ties
go to the lower resulting GPU load, then the lower expert and GPU id. Allowed: the GPU has a free
slot and no copy of the expert, and the expert has fewer than R replicas; preferred: the modelled
per-GPU load (an expert's fit load split equally over its copies) stays within the tolerance (or
no worse than before when the base plan already exceeds it). When no copy is within it, the slot
(every slot is filled) takes the copy with the least modelled imbalance. Repair first: while a
GPU's fit load of single-copy experts ("pinned": no copy choice can move it) exceeds
pinned_load_cap x the mean, copies of its (loaded) single-copy experts rank before all others --
held-out drift of a hot expert pinned to one GPU is what no dispatch-time balancing can undo. The
fit tokens (in prompt order) are cut into pinned_blocks consecutive blocks (4 by default) and a
GPU's pinned load is the largest of its blocks' (each / that block's mean): a stand-in for the
drift between prompt sets, which the whole fit set averages away (R = 2 on the trace: held-out
load 1.168 -> 1.137 for 0.3 % more GPUs per token than one block; docs/benchmarks.md).
Local search: up to local_search_passes passes empty each replica slot in turn and refill it with
the greedy's pick for that slot when that gains strictly more than the copy it replaces (the
objective strictly falls, so it ends; in practice 2-3 passes). Why not the partitioner on an
expanded hypergraph: the objective with copies is a cover, not a cut (km1 cannot express "either
copy"), and the exact per-step evaluation is cheap (W*R steps of E*W candidates). The realised load
and GPUs per token on held-out tokens come from the dispatch's own replica choice
(placement/replica_choice.py) in placement_metrics.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

MAX_COVER_GROUPS = 12  # 2^12 subsets per token at most
# The modelled (equal split) load bound: a poor proxy for the realised load, which the pinned cap
# and the copy choice's pricing handle; 1.10 cost 0.6 % GPUs per token on the trace and did not
# lower the held-out load (docs/benchmarks.md), 1.5 never bound there.
REPLICA_LOAD_TOLERANCE = 1.5
PINNED_LOAD_CAP = 0.95  # a GPU's fit load of single-copy experts, / mean, above which repair comes first
PINNED_BLOCKS = 4  # the fit tokens in this many consecutive blocks: a GPU's pinned load is its worst block's
LOCAL_SEARCH_PASSES = 3  # after the greedy: passes that empty and refill every replica slot
COPY_LOAD_CAP: Optional[float] = None  # the plans' default copy_load_cap (replica_choice.py): ties only


def check_pinned_blocks(value: object, name: str) -> None:
    """pinned_blocks must be an integer >= 1; `name` is the field or flag the error names."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} = {value!r} is invalid: allowed an integer >= 1 (more blocks than fit tokens "
                         "leave some empty, which count as unloaded)")


@dataclass(frozen=True)
class CoverTables:
    """Bitset tables over the 2^n subsets of n groups (GPUs or nodes)."""

    groups: int
    cover_HW: np.ndarray  # uint64 [2^n, words]: for host set h, the subsets that meet h
    level_PW: np.ndarray  # uint64 [n+1, words]: the subsets of each size

    @classmethod
    def build(cls, groups: int) -> "CoverTables":
        if groups > MAX_COVER_GROUPS:
            raise ValueError(f"replica selection covers at most {MAX_COVER_GROUPS} GPUs (or nodes) exactly, "
                             f"got {groups}")
        S = 1 << groups
        subsets = np.arange(S, dtype=np.int64)
        meets = (subsets[None, :] & subsets[:, None]) != 0  # [host set, subset]
        size = np.array([bin(s).count("1") for s in range(S)])
        levels = size[None, :] == np.arange(groups + 1)[:, None]
        return cls(groups, _pack(meets), _pack(levels))

    def min_cover(self, covering_NW: np.ndarray) -> np.ndarray:
        """[..., words] covering subsets -> [...] the smallest subset size among them."""
        hits = ((covering_NW[..., None, :] & self.level_PW) != 0).any(-1)  # [..., n+1]
        return hits.argmax(-1)


def _pack(bits: np.ndarray) -> np.ndarray:
    """bool [..., S] -> uint64 [..., ceil(S/64)] (little-endian bit order within a word)."""
    S = bits.shape[-1]
    words = -(-S // 64)
    padded = np.zeros(bits.shape[:-1] + (words * 64,), dtype=bool)
    padded[..., :S] = bits
    as_bytes = np.packbits(padded.reshape(bits.shape[:-1] + (words, 64)), axis=-1, bitorder="little")
    return as_bytes.view(np.uint64).reshape(bits.shape[:-1] + (words,))


class _Level:
    """The cover state of one grouping (GPUs, or nodes) over the fit tokens."""

    def __init__(self, ids_TK: np.ndarray, host_mask_E: np.ndarray, tables: CoverTables):
        self.ids_TK, self.tables = ids_TK, tables
        self.mask_E = host_mask_E.copy()
        cover_TKW = tables.cover_HW[self.mask_E[ids_TK]]
        T, K, words = cover_TKW.shape
        ones = np.full((T, 1, words), np.uint64(0xFFFFFFFFFFFFFFFF))
        prefix = np.concatenate([ones, np.bitwise_and.accumulate(cover_TKW, axis=1)[:, :-1]], axis=1)
        suffix = np.concatenate([np.bitwise_and.accumulate(cover_TKW[:, ::-1], axis=1)[:, ::-1][:, 1:], ones], axis=1)
        self.others_TKW = prefix & suffix  # AND over the token's other choices
        self.cost_T = tables.min_cover(self.others_TKW[:, 0] & cover_TKW[:, 0])

    def gains(self, new_masks_G: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[G] summed cost reduction if the expert at (rows, cols) had each host set of new_masks_G."""
        if rows.size == 0:
            return np.zeros(len(new_masks_G))
        new = self.tables.min_cover(self.others_TKW[rows, cols][:, None, :] & self.tables.cover_HW[new_masks_G][None])
        return (self.cost_T[rows][:, None] - new).sum(0).astype(np.float64)

    def add_host(self, e: int, new_mask: int, rows: np.ndarray, cols: np.ndarray) -> None:
        """Give expert e the host set new_mask; update the tokens that hold it."""
        self.mask_E[e] = new_mask
        cover = self.tables.cover_HW[new_mask]
        if rows.size:
            self.cost_T[rows] = self.tables.min_cover(self.others_TKW[rows, cols] & cover)
            for j in range(self.ids_TK.shape[1]):  # refresh the other choices' "others" (k <= 8)
                sel = cols != j
                self.others_TKW[rows[sel], j] = _others_again(self, rows[sel], j)

    @property
    def mean_cost(self) -> float:
        return float(self.cost_T.mean()) if self.cost_T.size else 0.0


def _others_again(level: _Level, rows: np.ndarray, j: int) -> np.ndarray:
    cover_tKW = level.tables.cover_HW[level.mask_E[level.ids_TK[rows]]]
    keep = np.ones(level.ids_TK.shape[1], dtype=bool)
    keep[j] = False
    return np.bitwise_and.reduce(cover_tKW[:, keep], axis=1) if keep.any() else \
        np.full((rows.size, cover_tKW.shape[2]), np.uint64(0xFFFFFFFFFFFFFFFF))


@dataclass(frozen=True)
class ReplicaSelection:
    plan: PlacementPlan
    fit_gpus_per_token: tuple[float, float]  # exact mean minimum cover before, after
    fit_nodes_per_token: Optional[tuple[float, float]]
    modelled_load_max_over_mean: float


def _fillable(hosts: list[list[int]], free: np.ndarray, R: int) -> bool:
    """Whether the free slots can all still be filled: a bipartite b-matching of GPUs (capacity:
    free slots) to experts (capacity: R - replicas so far) over pairs where the GPU has no copy."""
    W, E = len(free), len(hosts)
    need = int(free.sum())
    cap_e = [R - (len(h) - 1) for h in hosts]
    # augmenting paths on the unit-expanded graph: slot units of each GPU against expert units
    match_e: dict[int, list[int]] = {e: [] for e in range(E)}  # expert -> GPUs it is matched to

    def augment(g: int, seen: set[int]) -> bool:
        for e in range(E):
            if e in seen or g in hosts[e] or g in match_e[e]:
                continue
            seen.add(e)
            if len(match_e[e]) < cap_e[e]:
                match_e[e].append(g)
                return True
            for other in list(match_e[e]):
                match_e[e].remove(other)
                match_e[e].append(g)
                if augment(other, seen):
                    return True
                match_e[e].remove(g)
                match_e[e].append(other)
        return False

    matched = 0
    for g in range(W):
        for _ in range(int(free[g])):
            matched += augment(g, set())
    return matched == need


def select_replicas(base: PlacementPlan, fit_ids_TK: np.ndarray, topology: Topology, replica_slots: int,
                    load_tolerance: float = REPLICA_LOAD_TOLERANCE, pinned_load_cap: Optional[float] = PINNED_LOAD_CAP,
                    copy_load_cap: Optional[float] = COPY_LOAD_CAP,
                    local_search_passes: int = LOCAL_SEARCH_PASSES, pinned_blocks: int = PINNED_BLOCKS) -> ReplicaSelection:
    """`base` (no replicas) plus R replica slots per GPU, chosen greedily (see the module docstring).
    pinned_load_cap: None or a max/mean; copy_load_cap: written into the plan (the dispatch's copy
    choice balances each batch's rows per rank up to it; None: ties only)."""
    if base.replicas:
        raise ValueError("select_replicas starts from a plan without replicas")
    W, E, R = base.world_size, base.num_experts, replica_slots
    check_pinned_blocks(pinned_blocks, "pinned_blocks (--replica-pinned-blocks)")
    if R < 0 or R > E - base.primaries_per_rank:
        raise ValueError(f"--replica-slots {R} is invalid: allowed 0..{E - base.primaries_per_rank} (a GPU holds "
                         "copies of other GPUs' experts only)")
    topology.check_world_size(W)
    ids = np.asarray(fit_ids_TK, dtype=np.int64)
    rank_E = np.asarray(base.expert_to_rank, dtype=np.int64)
    gpu = _Level(ids, (1 << rank_E).astype(np.int64), CoverTables.build(W))
    G = topology.gpus_per_node
    node = _Level(ids, (1 << (rank_E // G)).astype(np.int64), CoverTables.build(topology.nodes)) \
        if topology.nodes > 1 else None
    before = (gpu.mean_cost, None if node is None else node.mean_cost)
    load_E = np.bincount(ids.reshape(-1), minlength=E).astype(np.float64)
    hosts = [[int(r)] for r in rank_E]
    free = np.full(W, R)
    replicas: list[list[int]] = [[] for _ in range(W)]
    token_rows = [np.nonzero(ids == e) for e in range(E)]  # (rows, cols) of each expert's choices
    weight = ids.shape[1] + 1  # one node outweighs any number of GPUs (at most k)

    def loads() -> np.ndarray:
        """[W] modelled fit load: an expert's load split equally over its copies."""
        out = np.zeros(W)
        for e, h in enumerate(hosts):
            out[h] += load_E[e] / len(h)
        return out

    def with_copy(load: np.ndarray, e: int, g: int) -> np.ndarray:
        c = len(hosts[e])
        out = load.copy()
        out[hosts[e]] -= load_E[e] / c - load_E[e] / (c + 1)
        out[g] += load_E[e] / (c + 1)
        return out

    def imbalance(load: np.ndarray) -> float:
        return float(load.max() / load.mean()) if load.mean() > 0 else 1.0

    if R and not _fillable(hosts, free, R):
        raise ValueError(f"--replica-slots {R}: no way to fill every GPU's {R} replica slots with at most {R} copies "
                         f"per expert on {W} GPUs and {E} experts")
    blocks = np.array_split(ids, int(pinned_blocks))
    block_load_BE = np.stack([np.bincount(b.reshape(-1), minlength=E) for b in blocks]).astype(np.float64)
    block_load_BE /= np.maximum(block_load_BE.sum(1, keepdims=True) / W, 1e-12)  # each block / its mean per GPU

    def pinned() -> np.ndarray:
        """[W] fit load of the experts with one copy, / mean (the worst block's): what no copy choice can move."""
        single = np.array([len(h) == 1 for h in hosts])
        per_block_BW = np.zeros((len(blocks), W))
        np.add.at(per_block_BW, (slice(None), rank_E[single]), block_load_BE[:, single])
        return per_block_BW.max(0)

    def candidates(slots_on: Optional[int] = None) -> list[tuple[tuple, int, int, float]]:
        """(sort key, expert, GPU, gain) of every allowed copy (on GPU `slots_on` only, when given)."""
        load_W = loads()
        current = imbalance(load_W)
        pinned_W = pinned()
        out = []
        for e in range(E):
            if len(hosts[e]) - 1 >= R:
                continue
            # repair first: a copy of a single-copy expert of a GPU above the pinned cap
            repairs = (pinned_load_cap is not None and len(hosts[e]) == 1 and load_E[e] > 0
                       and pinned_W[hosts[e][0]] > pinned_load_cap)
            gs = np.array([g for g in (range(W) if slots_on is None else [slots_on]) if free[g] and g not in hosts[e]])
            if gs.size == 0:
                continue
            rows, cols = token_rows[e]
            gain = gpu.gains(gpu.mask_E[e] | (1 << gs), rows, cols)
            if node is not None:
                gain = gain + weight * node.gains(node.mask_E[e] | (1 << (gs // G)), rows, cols)
            for g, gn in zip(gs.tolist(), gain.tolist()):
                new_imb = imbalance(with_copy(load_W, e, g))
                within = new_imb <= max(load_tolerance, current) + 1e-12
                # within the tolerance: the largest gain; else (every slot must be filled) the least imbalance
                key = (not repairs,) + ((0, -gn, new_imb, e, g) if within else (1, new_imb, -gn, e, g))
                out.append((key, e, g, gn))
        return sorted(out)

    def place(e: int, g: int, add: bool) -> None:
        rows, cols = token_rows[e]
        bit = 1 << g
        gpu.add_host(e, int(gpu.mask_E[e] | bit if add else gpu.mask_E[e] & ~bit), rows, cols)
        if node is not None:
            others = [h for h in hosts[e] if h != g] + ([g] if add else [])
            node.add_host(e, int(np.bitwise_or.reduce([1 << (h // G) for h in others])), rows, cols)
        if add:
            hosts[e].append(g)
            replicas[g].append(e)
            free[g] -= 1
        else:
            hosts[e].remove(g)
            replicas[g].remove(e)
            free[g] += 1

    for _ in range(W * R):  # greedy: one copy per step
        best = None
        for _, e, g, _ in candidates():  # the best copy that leaves the other slots fillable
            hosts[e].append(g)
            free[g] -= 1
            ok = _fillable(hosts, free, R)
            hosts[e].pop()
            free[g] += 1
            if ok:
                best = (e, g)
                break
        if best is None:
            raise ValueError(f"--replica-slots {R}: no way to fill every GPU's {R} replica slots with at most {R} "
                             f"copies per expert on {W} GPUs and {E} experts")
        place(*best, add=True)
    for _ in range(local_search_passes):  # local search: empty each slot and refill it with its best copy
        changed = False
        for g in range(W):
            for e in list(replicas[g]):
                place(e, g, add=False)
                options = candidates(slots_on=g)  # the emptied slot: at least (e, g) itself is allowed
                first, own = options[0], next(c for c in options if c[1] == e)
                # the greedy's pick for this slot, if it gains strictly more: the objective falls, so it ends
                if first[1] != e and first[3] > own[3] + 1e-9:
                    place(first[1], g, add=True)
                    changed = True
                else:
                    place(e, g, add=True)
        if not changed:
            break
    plan = PlacementPlan(base.expert_to_rank, W, tuple(tuple(r) for r in replicas), copy_load_cap) if R else base
    return ReplicaSelection(plan, (before[0], gpu.mean_cost),
                            None if node is None else (before[1], node.mean_cost), imbalance(loads()))
