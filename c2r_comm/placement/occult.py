"""Occult's greedy co-activation placement (baseline), on a normalised pairwise co-activation graph.

Occult (Luo et al., 2025) fills GPUs one at a time: GPU 0 is seeded with the most-collaborating
pair, each later GPU with the unplaced expert that collaborates least (mean) with everything placed
so far, and each GPU is filled with the unplaced expert of largest mean collaboration with the GPU's
members. Ties go to the lower expert id, so the result is deterministic.

Normalisation: counts C[i, j] / sqrt(load_i * load_j) (cosine-style), so two popular experts do not
look collaborative merely because both are frequent.
"""
from __future__ import annotations

import numpy as np



def normalised_coactivation(counts_EE: np.ndarray, load_E: np.ndarray) -> np.ndarray:
    load = np.asarray(load_E, dtype=np.float64)
    scale = np.sqrt(np.outer(load, load))
    return np.divide(counts_EE.astype(np.float64), scale, out=np.zeros(counts_EE.shape), where=scale > 0)


def occult_greedy_ranks(collab_EE: np.ndarray, world_size: int) -> np.ndarray:
    """[experts] rank of each expert under Occult's greedy fill of `world_size` equal GPUs."""
    C = np.asarray(collab_EE, dtype=np.float64)
    E = C.shape[0]
    if C.shape != (E, E) or E % world_size:
        raise ValueError(f"need a square [E, E] collaboration matrix with E divisible by {world_size}, got {C.shape}")
    per = E // world_size
    rank_E = np.full(E, -1, dtype=np.int64)
    masked = C.copy()
    np.fill_diagonal(masked, -np.inf)
    i, j = np.unravel_index(int(np.argmax(masked)), masked.shape)
    for g in range(world_size):
        unplaced = np.flatnonzero(rank_E < 0)
        if g == 0:
            seeds = [min(i, j), max(i, j)][:per]
        else:
            placed = np.flatnonzero(rank_E >= 0)
            seeds = [int(unplaced[np.argmin(C[np.ix_(unplaced, placed)].mean(axis=1))])]
        members = list(seeds)
        rank_E[members] = g
        while len(members) < per:
            unplaced = np.flatnonzero(rank_E < 0)
            best = int(unplaced[np.argmax(C[np.ix_(unplaced, members)].mean(axis=1))])
            members.append(best)
            rank_E[best] = g
    return rank_E
