"""The token hypergraph: vertices are experts, each hyperedge is one distinct expert set, weighted
by how many tokens selected exactly that set.

Merging identical sets keeps the objective exact (a weight-w edge counts w times) while shrinking
a real trace's ~80k tokens to ~40-60k edges. Edges are stored CSR-style so the per-node
sub-hypergraphs of the hierarchical planner (variable edge sizes) fit the same type.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from c2r_comm.routing.trace import check_distinct_experts


@dataclass(frozen=True)
class TokenHypergraph:
    num_vertices: int
    edge_offsets: np.ndarray  # [M + 1] int64, edge m = pins[offs[m]:offs[m+1]]
    pins: np.ndarray  # [num_pins] int64 vertex ids, ascending within an edge
    edge_weights: np.ndarray  # [M] int64 token counts

    def __post_init__(self) -> None:
        offs = np.asarray(self.edge_offsets, dtype=np.int64)
        pins = np.asarray(self.pins, dtype=np.int64)
        w = np.asarray(self.edge_weights, dtype=np.int64)
        if offs.ndim != 1 or len(offs) != len(w) + 1 or offs[0] != 0 or offs[-1] != len(pins):
            raise ValueError(f"edge_offsets must run 0..{len(pins)} with one entry per edge + 1, got {len(offs)} "
                             f"offsets for {len(w)} edges")
        if pins.size and (pins.min() < 0 or pins.max() >= self.num_vertices):
            raise ValueError(f"pins must lie in 0..{self.num_vertices - 1}, found {pins.min()}..{pins.max()}")
        object.__setattr__(self, "edge_offsets", offs)
        object.__setattr__(self, "pins", pins)
        object.__setattr__(self, "edge_weights", w)

    @classmethod
    def from_ids(cls, ids_TK: np.ndarray, num_experts: int) -> "TokenHypergraph":
        """One edge per distinct expert set of the [tokens, k] selections (rows must be distinct ids)."""
        ids_TK = np.asarray(ids_TK, dtype=np.int64)
        if ids_TK.ndim != 2:
            raise ValueError(f"ids_TK must be [tokens, k], got shape {ids_TK.shape}")
        if ids_TK.size and (ids_TK.min() < 0 or ids_TK.max() >= num_experts):
            raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, found {ids_TK.min()}..{ids_TK.max()}")
        sets_TK = np.sort(ids_TK, axis=1)
        if sets_TK.shape[1] > 1 and (np.diff(sets_TK, axis=1) == 0).any():
            check_distinct_experts(ids_TK)  # the product-wide rule and message, naming the first offending token
        if sets_TK.shape[0] == 0:
            return cls(num_experts, np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        unique_MK, weights_M = np.unique(sets_TK, axis=0, return_counts=True)
        K = unique_MK.shape[1]
        return cls(num_experts, np.arange(len(unique_MK) + 1, dtype=np.int64) * K, unique_MK.reshape(-1), weights_M)

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return len(self.edge_weights)

    @property
    def total_weight(self) -> int:
        return int(self.edge_weights.sum())

    @cached_property
    def edge_of_pin(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_edges, dtype=np.int64), np.diff(self.edge_offsets))

    def edge_lists(self) -> list[list[int]]:
        sizes = np.diff(self.edge_offsets)
        if self.num_edges and (sizes == sizes[0]).all():  # one reshape instead of M slices
            return self.pins.reshape(self.num_edges, int(sizes[0])).tolist()
        return [self.pins[a:b].tolist() for a, b in zip(self.edge_offsets[:-1], self.edge_offsets[1:])]

    @cached_property
    def incidence_ME(self) -> np.ndarray:
        """Dense 0/1 incidence [edges, vertices] float32; vertex counts are small (experts)."""
        H = np.zeros((self.num_edges, self.num_vertices), dtype=np.float32)
        H[self.edge_of_pin, self.pins] = 1.0
        return H

    # ---- objective ----------------------------------------------------------------------------
    def pins_per_group(self, group_of_vertex: np.ndarray, num_groups: int) -> np.ndarray:
        """[edges, groups] count of each edge's pins in each group."""
        counts = np.zeros((self.num_edges, num_groups), dtype=np.int64)
        np.add.at(counts, (self.edge_of_pin, np.asarray(group_of_vertex)[self.pins]), 1)
        return counts

    def connectivity(self, group_of_vertex: np.ndarray) -> int:
        """Sum over edges of weight x distinct groups touched (km1 + total weight)."""
        g = np.asarray(group_of_vertex)
        num_groups = int(g.max()) + 1 if g.size else 1
        lam = (self.pins_per_group(g, num_groups) > 0).sum(axis=1)
        return int((lam * self.edge_weights).sum())

    def restrict(self, vertices: Sequence[int]) -> "TokenHypergraph":
        """Sub-hypergraph on `vertices` (relabelled 0..n-1 in the given order); edges keep only those
        pins, edges left with < 2 pins are dropped (they cannot be cut), identical edges merge."""
        vertices = np.asarray(vertices, dtype=np.int64)
        new_id = np.full(self.num_vertices, -1, dtype=np.int64)
        new_id[vertices] = np.arange(len(vertices))
        keep = new_id[self.pins] >= 0
        sizes = np.bincount(self.edge_of_pin[keep], minlength=self.num_edges)
        kept_edges = sizes >= 2
        pin_kept = keep & kept_edges[self.edge_of_pin]
        edge_ids = self.edge_of_pin[pin_kept]
        local = new_id[self.pins[pin_kept]]
        # Merge identical restricted edges: key each by its sorted pin tuple.
        order = np.lexsort((local, edge_ids))
        edge_ids, local = edge_ids[order], local[order]
        groups: dict[tuple[int, ...], int] = {}
        starts = np.flatnonzero(np.r_[True, edge_ids[1:] != edge_ids[:-1]]) if len(edge_ids) else np.zeros(0, int)
        bounds = np.r_[starts, len(edge_ids)]
        for i in range(len(starts)):
            key = tuple(local[bounds[i]:bounds[i + 1]].tolist())
            groups[key] = groups.get(key, 0) + int(self.edge_weights[edge_ids[bounds[i]]])
        keys = sorted(groups)
        offs = np.zeros(len(keys) + 1, dtype=np.int64)
        offs[1:] = np.cumsum([len(k) for k in keys])
        pins = np.fromiter((v for k in keys for v in k), dtype=np.int64, count=int(offs[-1]))
        return TokenHypergraph(len(vertices), offs, pins, np.array([groups[k] for k in keys], dtype=np.int64))
