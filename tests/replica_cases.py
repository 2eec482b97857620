"""Shared helpers of the replica tests: a random replica plan and a brute-force minimum cover."""
from __future__ import annotations

import itertools

import numpy as np

from c2r_comm.plan import PlacementPlan


def replica_plan(E: int, W: int, R: int, seed: int) -> PlacementPlan:
    """A random balanced plan plus R replica slots per rank (least-copied experts first)."""
    rng = np.random.default_rng(seed)
    base = PlacementPlan.random(E, W, seed)
    copies = np.zeros(E, dtype=int)
    replicas = []
    for r in range(W):
        cand = [e for e in rng.permutation(E).tolist() if base.expert_to_rank[e] != r]
        pick = sorted(cand, key=lambda e: copies[e])[:R]
        copies[pick] += 1
        replicas.append(tuple(pick))
    return PlacementPlan(base.expert_to_rank, W, tuple(replicas))


def brute_min_cover(plan: PlacementPlan, experts, group=lambda r: r) -> int:
    return min(len({group(r) for r in combo}) for combo in itertools.product(*(plan.hosts_of_expert[e] for e in experts)))
