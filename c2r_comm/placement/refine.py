"""Swap refinement: bring per-GPU token load within a tolerance at the least objective cost, then
win back objective with swaps that keep the load bound; an optional polish (iterated local search)
after that; also the equal-size fix-up and the local search the planner falls back to without
Mt-KaHyPar.

Every step is a swap of two experts (or a single move only while sizes are unequal), so equal
experts per GPU is kept. Per-GPU load <= tol x mean implies per-node load <= tol x mean as well
(a node's load is the sum of its GPUs'), so one constraint covers both levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from c2r_comm.placement.metrics import max_over_mean, rank_loads
from c2r_comm.placement.swap_cost import SwapCost

_EPS = 1e-9


@dataclass(frozen=True)
class BalanceResult:
    expert_to_rank: tuple[int, ...]
    tolerance: float
    load_max_over_mean: float  # on the fit tokens, after refinement
    load_max_over_mean_before: float
    met: bool  # load_max_over_mean <= tolerance
    balance_swaps: int
    recovery_swaps: int
    polish_improvements: int  # polish kicks that lowered the objective (0 without polish)
    objective_before: float  # SwapCost objective on the fit tokens
    objective_after: float
    message: str


def balance_load(cost: SwapCost, load_E: np.ndarray, rank_of_expert: np.ndarray, tolerance: float = 1.10,
                 recover: bool = True, max_recovery_swaps: Optional[int] = None, polish_kicks: int = 0,
                 seed: int = 0) -> BalanceResult:
    """Swap experts until max/mean per-GPU load <= tolerance, each time taking the swap that costs
    the least objective per unit of load taken off the heaviest GPU; then (recover) apply improving
    swaps that keep every GPU under max(tolerance x mean, reached max).

    Each balance swap lowers the heaviest GPU and leaves its partner below the old maximum, so the
    sum of squared loads falls strictly and the loop ends. When no such swap exists, the result says
    the tolerance was not met and why. With polish_kicks > 0, polish_by_kicks runs last under the
    same bound.
    """
    if tolerance < 1.0:
        raise ValueError(f"load tolerance = {tolerance} is invalid: allowed a max/mean ratio >= 1.0")
    load_E = np.asarray(load_E, dtype=np.float64)
    rank_E = np.asarray(rank_of_expert, dtype=np.int64).copy()
    W = cost.levels[0].num_groups
    loads_R = rank_loads(load_E, rank_E, W)
    mean = loads_R.mean()
    target = tolerance * mean
    before_ratio, objective_before = max_over_mean(loads_R), cost.objective(rank_E)
    balance_swaps = 0
    while loads_R.max() > target + _EPS and mean > 0:
        h = int(np.argmax(loads_R))
        rows = np.flatnonzero(rank_E == h)
        moved_RE = load_E[rows][:, None] - load_E[None, :]  # load leaving h in swap (rows[i], f)
        new_h_RE = loads_R[h] - moved_RE
        new_g_RE = loads_R[rank_E][None, :] + moved_RE
        valid = (rank_E[None, :] != h) & (moved_RE > _EPS) & (new_g_RE < loads_R[h] - _EPS)
        if not valid.any():
            break
        delta = cost.swap_deltas(rank_E, rows)
        gain = loads_R[h] - np.maximum(new_h_RE, new_g_RE)
        within = valid & (new_h_RE <= target + _EPS) & (new_g_RE <= target + _EPS)
        if within.any():
            score = np.where(within, delta, np.inf)  # one swap finishes this GPU: cheapest such swap
        else:
            score = np.where(valid, np.where(delta > 0, delta / np.maximum(gain, _EPS), delta * gain - 1e18), np.inf)
        i, f = np.unravel_index(int(np.argmin(score)), score.shape)
        e = int(rows[i])
        _swap(rank_E, loads_R, load_E, e, int(f))
        balance_swaps += 1
    ratio = max_over_mean(loads_R)
    met = ratio <= tolerance + _EPS
    recovery_swaps = 0
    bound = max(target, float(loads_R.max()))  # recovery and polish keep every GPU under this
    if recover:
        limit = max_recovery_swaps if max_recovery_swaps is not None else 4 * len(rank_E)
        rank_E, recovery_swaps = improve_by_swaps(cost, rank_E, load_E=load_E, load_bound=bound, max_swaps=limit)
        loads_R = rank_loads(load_E, rank_E, W)
        ratio = max_over_mean(loads_R)
    polish_improvements = 0
    if polish_kicks:
        rank_E, polish_improvements = polish_by_kicks(cost, rank_E, polish_kicks, seed, load_E=load_E, load_bound=bound)
        loads_R = rank_loads(load_E, rank_E, W)
        ratio = max_over_mean(loads_R)
    if met:
        message = f"per-GPU load max/mean {ratio:.3f} <= tolerance {tolerance:.3f}"
    else:
        heaviest = float(load_E.max() / mean) if mean > 0 else 0.0
        why = (f"one expert alone carries {heaviest:.2f} x the mean GPU load" if heaviest > tolerance
               else "no swap lowers the heaviest GPU further without overloading another")
        message = f"load tolerance {tolerance:.3f} not met: best per-GPU max/mean {ratio:.3f} ({why})"
    return BalanceResult(tuple(int(r) for r in rank_E), float(tolerance), ratio, before_ratio, met, balance_swaps,
                         recovery_swaps, polish_improvements, objective_before, cost.objective(rank_E), message)


def _swap(rank_E: np.ndarray, loads_R: np.ndarray, load_E: np.ndarray, e: int, f: int) -> None:
    a, b = rank_E[e], rank_E[f]
    moved = load_E[e] - load_E[f]
    loads_R[a] -= moved
    loads_R[b] += moved
    rank_E[e], rank_E[f] = b, a


def improve_by_swaps(cost: SwapCost, rank_of_expert: np.ndarray, load_E: Optional[np.ndarray] = None,
                     load_bound: Optional[float] = None, max_swaps: int = 10_000) -> tuple[np.ndarray, int]:
    """Best-improvement swap local search on the objective; with load_bound, only swaps that leave
    both GPUs' loads <= load_bound. Returns (expert_to_rank, swaps applied)."""
    rank_E = np.asarray(rank_of_expert, dtype=np.int64).copy()
    W = cost.levels[0].num_groups
    if load_bound is not None and load_E is None:
        raise ValueError("improve_by_swaps: load_bound needs load_E")
    load_E = np.zeros(len(rank_E)) if load_E is None else np.asarray(load_E, dtype=np.float64)
    loads_R = rank_loads(load_E, rank_E, W)
    swaps = 0
    while swaps < max_swaps:
        delta = cost.swap_deltas(rank_E)
        if load_bound is not None:
            moved = load_E[:, None] - load_E[None, :]
            ok = (loads_R[rank_E][:, None] - moved <= load_bound + _EPS) & \
                 (loads_R[rank_E][None, :] + moved <= load_bound + _EPS)
            delta = np.where(ok, delta, np.inf)
        e, f = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if not delta[e, f] < -1e-6:
            break
        _swap(rank_E, loads_R, load_E, int(e), int(f))
        swaps += 1
    return rank_E, swaps


def polish_by_kicks(cost: SwapCost, rank_of_expert: np.ndarray, kicks: int, seed: int = 0,
                    load_E: Optional[np.ndarray] = None, load_bound: Optional[float] = None,
                    kick_swaps: int = 3) -> tuple[np.ndarray, int]:
    """Iterated local search on the exact objective: from a swap-local optimum, apply `kick_swaps`
    random swaps between different ranks (only swaps that keep every GPU <= load_bound), descend
    with improve_by_swaps, keep the result when the objective fell. A partitioner's answer is
    already a local optimum of its own moves; kicks get it out of the swap-neighbourhood's basins.
    Returns (expert_to_rank, kicks that improved). Deterministic for a seed."""
    if kicks < 0 or kick_swaps < 1:
        raise ValueError(f"polish needs kicks >= 0 and kick_swaps >= 1, got {kicks} and {kick_swaps}")
    W = cost.levels[0].num_groups
    if load_bound is not None and load_E is None:
        raise ValueError("polish_by_kicks: load_bound needs load_E")
    load_E = np.zeros(len(rank_of_expert)) if load_E is None else np.asarray(load_E, dtype=np.float64)
    best, _ = improve_by_swaps(cost, rank_of_expert, load_E=load_E, load_bound=load_bound)
    best_value = cost.objective(best)
    rng = np.random.default_rng(seed)
    improved = 0
    for _ in range(kicks):
        trial = best.copy()
        loads_R = rank_loads(load_E, trial, W)
        done = 0
        for e, f in rng.integers(0, len(trial), size=(32 * kick_swaps, 2)):
            if done == kick_swaps:
                break
            a, b = trial[e], trial[f]
            moved = load_E[e] - load_E[f]
            if a == b or (load_bound is not None and max(loads_R[a] - moved, loads_R[b] + moved) > load_bound + _EPS):
                continue
            _swap(trial, loads_R, load_E, int(e), int(f))
            done += 1
        trial, _ = improve_by_swaps(cost, trial, load_E=load_E, load_bound=load_bound)
        value = cost.objective(trial)
        if value < best_value - 1e-6:
            best, best_value = trial, value
            improved += 1
    return best, improved


def equalize_group_sizes(cost: SwapCost, rank_of_expert: np.ndarray, size: int) -> np.ndarray:
    """Move experts out of over-full ranks into under-full ones, cheapest move first, until every
    rank holds `size` experts (a partitioner may return blocks off by one)."""
    rank_E = np.asarray(rank_of_expert, dtype=np.int64).copy()
    W = cost.levels[0].num_groups
    if W * size != len(rank_E):
        raise ValueError(f"{len(rank_E)} experts cannot fill {W} ranks of {size}")
    while True:
        counts = np.bincount(rank_E, minlength=W)
        if (counts == size).all():
            return rank_E
        delta = cost.move_deltas(rank_E)
        movable = (counts[rank_E] > size)[:, None] & (counts < size)[None, :]
        e, r = np.unravel_index(int(np.argmin(np.where(movable, delta, np.inf))), delta.shape)
        rank_E[e] = r
