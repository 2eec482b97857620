"""Exact change of the connectivity objective for moving or swapping experts, for many candidates
at once (a few dense matmuls), so refinement can pick the cheapest swap without recounting tokens.

Objective of a rank assignment: sum over levels l (GPU, and node when there are several nodes) of
cost_l x sum over edges of weight x distinct level-l groups the edge touches. Swapping experts
keeps every GPU's expert count, which is why refinement works with swaps, not moves.

Derivation (one level, e in group a, f in group b, cnt[x, g] = pins of edge x in group g):
  an edge holding e but not f changes by [cnt[x,b]==0] - [cnt[x,a]==1]; f but not e symmetrically;
  an edge holding both does not change. With D[e, g] = the move delta of e to g, the swap delta is
  D[e,b] + D[f,a] + sum_{x holds e,f} w_x ([cnt[x,a]==1] + [cnt[x,b]==1]) (removes what D miscounts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class CostLevel:
    """Groups are rank // divisor (1: GPUs, gpus_per_node: nodes); each distinct group costs `cost`."""

    divisor: int
    num_groups: int
    cost: float


def topology_levels(topology: Topology, inter_node_cost: float) -> tuple[CostLevel, ...]:
    """GPU level, plus a node level when there is more than one node."""
    gpu = CostLevel(1, topology.world_size, 1.0)
    if topology.nodes == 1 or inter_node_cost == 0:
        return (gpu,)
    return gpu, CostLevel(topology.gpus_per_node, topology.nodes, float(inter_node_cost))


class SwapCost:
    """Delta tables of one hypergraph under given cost levels; holds no assignment state."""

    def __init__(self, hypergraph: TokenHypergraph, levels: Sequence[CostLevel]):
        if not levels or levels[0].divisor != 1:
            raise ValueError(f"SwapCost needs the rank level (divisor 1) first, got levels {levels}")
        self.hypergraph = hypergraph
        self.levels = tuple(levels)
        self.H_ME = hypergraph.incidence_ME
        # float32 sums of integer weights stay exact while the total weight is < 2**24 tokens.
        self.w_M = hypergraph.edge_weights.astype(np.float32 if hypergraph.total_weight < 2 ** 24 else np.float64)
        if self.w_M.dtype == np.float64:
            self.H_ME = self.H_ME.astype(np.float64)

    def objective(self, rank_of_expert: np.ndarray) -> float:
        r = np.asarray(rank_of_expert)
        return float(sum(l.cost * self.hypergraph.connectivity(r // l.divisor) for l in self.levels))

    def _level_tables(self, group_E: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
        H, E = self.H_ME, self.H_ME.shape[1]
        cnt_MG = H @ np.eye(num_groups, dtype=H.dtype)[group_E]
        zero_MG = (cnt_MG == 0) * self.w_M[:, None]
        one_MG = (cnt_MG == 1) * self.w_M[:, None]
        move_EG = H.T @ zero_MG - (H.T @ one_MG)[np.arange(E), group_E][:, None]
        sole_ME = H * one_MG[:, group_E]  # w_x where e is its group's only pin in edge x
        return move_EG.astype(np.float64), sole_ME

    def move_deltas(self, rank_of_expert: np.ndarray) -> np.ndarray:
        """[experts, ranks] objective change of moving expert e alone to rank r (0 for its own rank)."""
        rank_E = np.asarray(rank_of_expert, dtype=np.int64)
        W = self.levels[0].num_groups
        out = np.zeros((len(rank_E), W))
        ranks = np.arange(W)
        for lvl in self.levels:
            group_E = rank_E // lvl.divisor
            move_EG, _ = self._level_tables(group_E, lvl.num_groups)
            level_delta = move_EG[:, ranks // lvl.divisor]
            level_delta[group_E[:, None] == (ranks // lvl.divisor)[None, :]] = 0.0
            out += lvl.cost * level_delta
        return out

    def swap_deltas(self, rank_of_expert: np.ndarray, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """[len(rows), experts] objective change of swapping expert rows[i] with expert f."""
        rank_E = np.asarray(rank_of_expert, dtype=np.int64)
        rows = np.arange(len(rank_E)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), len(rank_E)))
        for lvl in self.levels:
            group_E = rank_E // lvl.divisor
            move_EG, sole_ME = self._level_tables(group_E, lvl.num_groups)
            both = (sole_ME[:, rows].T @ self.H_ME + self.H_ME[:, rows].T @ sole_ME).astype(np.float64)
            delta = move_EG[rows][:, group_E] + move_EG[:, group_E[rows]].T + both
            delta[group_E[rows][:, None] == group_E[None, :]] = 0.0  # same group at this level: no change
            out += lvl.cost * delta
        return out
