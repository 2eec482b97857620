"""Placement metrics on a set of tokens: the objective every planner and the benchmark share.

All "distinct" counts go through plan.distinct_per_token. Remote counts need each token's source
rank; by default tokens are dealt to ranks in order (rank r takes the r-th contiguous block, block
sizes differing by at most one), the way a data-parallel batch is split.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from c2r_comm.placement.replica_choice import choose_copies
from c2r_comm.plan import PlacementPlan, distinct_per_token, expert_to_node
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class PlacementMetrics:
    tokens: int
    gpus_per_token: float  # E[distinct GPUs a token's experts live on]
    nodes_per_token: float  # E[distinct nodes]
    remote_gpus_per_token: float  # E[distinct GPUs other than the token's source GPU]
    remote_nodes_per_token: float  # E[distinct nodes other than the token's source node]
    gpu_load_max_over_mean: float  # token load = (token, expert) assignments a GPU's experts compute
    node_load_max_over_mean: float
    experts_per_gpu: int

    def to_dict(self) -> dict:
        return asdict(self)


def expert_loads(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """[experts] number of (token, expert) assignments per expert."""
    return np.bincount(np.asarray(ids_TK, dtype=np.int64).reshape(-1), minlength=num_experts)


def rank_loads(load_E: np.ndarray, rank_of_expert: np.ndarray, world_size: int) -> np.ndarray:
    """[ranks] summed load of the experts each rank hosts."""
    return np.bincount(np.asarray(rank_of_expert), weights=np.asarray(load_E, dtype=np.float64), minlength=world_size)


def dealt_source_ranks(num_tokens: int, world_size: int) -> np.ndarray:
    """Rank r gets the r-th contiguous block of tokens (np.array_split sizes)."""
    return (np.arange(num_tokens, dtype=np.int64) * world_size) // max(num_tokens, 1)


def _holds(group_of_expert: np.ndarray, ids_TK: np.ndarray, group_T: np.ndarray) -> np.ndarray:
    return (group_of_expert[ids_TK] == group_T[:, None]).any(axis=1)


def chosen_copies(plan: PlacementPlan, topology: Topology, ids_TK: np.ndarray, source_rank_T: np.ndarray) -> np.ndarray:
    """int64 [T, K]: the rank each (token, choice) goes to under a replica plan, by the dispatchers'
    own rule (replica_choice.choose_copies), each source rank's tokens as one batch. On several
    nodes it is the hierarchical exchange's choice (other nodes first); dedup and alltoall choose by
    ranks alone, so there their realised counts can differ slightly."""
    host_rank_EH, host_slot_EH = plan.host_tensors()
    ids = torch.as_tensor(ids_TK, dtype=torch.int64)
    out = np.zeros(ids_TK.shape, dtype=np.int64)
    for r in range(plan.world_size):  # host loop over source ranks (each its own batch, as in dispatch)
        rows = np.nonzero(source_rank_T == r)[0]
        block = ids[torch.from_numpy(rows)]
        rank_TK, _ = choose_copies(block, torch.ones_like(block, dtype=torch.bool), host_rank_EH, host_slot_EH,
                                   plan.world_size, topology.gpus_per_node, r, by_node=topology.nodes > 1,
                                   load_cap=plan.copy_load_cap)
        out[rows] = rank_TK.numpy()
    return out


def max_over_mean(loads: np.ndarray) -> float:
    """Imbalance of non-negative loads: max / mean, 1.0 = perfectly balanced.

    All-zero (or empty) loads give 1.0: with no load there is no imbalance, and a tolerance check
    `max_over_mean(loads) <= tol` (tol >= 1) holds, as it should for a layer no token reached.
    """
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean() if loads.size else 0.0
    return float(loads.max() / mean) if mean > 0 else 1.0


def placement_metrics(plan: PlacementPlan, topology: Topology, ids_TK: np.ndarray,
                      source_rank_T: Optional[np.ndarray] = None) -> PlacementMetrics:
    """Metrics of `plan` for tokens `ids_TK` [tokens, k]; `source_rank_T` [tokens] defaults to dealt."""
    ids_TK = np.asarray(ids_TK, dtype=np.int64)
    if ids_TK.ndim != 2:
        raise ValueError(f"ids_TK must be [tokens, k], got shape {ids_TK.shape}")
    topology.check_world_size(plan.world_size)
    E, T = plan.num_experts, ids_TK.shape[0]
    if ids_TK.size and (ids_TK.min() < 0 or ids_TK.max() >= E):
        raise ValueError(f"expert ids must lie in 0..{E - 1} (the plan's experts), found {ids_TK.min()}..{ids_TK.max()}")
    if T == 0:
        raise ValueError("placement metrics need at least one token, got 0")
    if source_rank_T is None:
        source_rank_T = dealt_source_ranks(T, plan.world_size)
    source_rank_T = np.asarray(source_rank_T, dtype=np.int64)
    if source_rank_T.shape != (T,) or source_rank_T.min() < 0 or source_rank_T.max() >= plan.world_size:
        raise ValueError(f"source_rank_T must be [{T}] ranks in 0..{plan.world_size - 1}, got shape "
                         f"{source_rank_T.shape} with values {source_rank_T.min()}..{source_rank_T.max()}")
    source_node_T = source_rank_T // topology.gpus_per_node
    if plan.replicas:  # each token's copies, as the dispatchers choose them (one batch per source rank)
        rank_TK = chosen_copies(plan, topology, ids_TK, source_rank_T)
        node_TK = rank_TK // topology.gpus_per_node
        gpus_T, nodes_T = distinct_per_token(np.arange(plan.world_size), rank_TK), \
            distinct_per_token(np.arange(topology.nodes), node_TK)
        remote_gpus_T = gpus_T - (rank_TK == source_rank_T[:, None]).any(1)
        remote_nodes_T = nodes_T - (node_TK == source_node_T[:, None]).any(1)
        load_R = np.bincount(rank_TK.reshape(-1), minlength=plan.world_size).astype(np.float64)
    else:
        rank_E = np.asarray(plan.expert_to_rank, dtype=np.int64)
        node_E = expert_to_node(plan, topology)
        gpus_T = distinct_per_token(rank_E, ids_TK)
        nodes_T = distinct_per_token(node_E, ids_TK)
        remote_gpus_T = gpus_T - _holds(rank_E, ids_TK, source_rank_T)
        remote_nodes_T = nodes_T - _holds(node_E, ids_TK, source_node_T)
        load_R = rank_loads(expert_loads(ids_TK, E), rank_E, plan.world_size)
    load_N = load_R.reshape(topology.nodes, topology.gpus_per_node).sum(axis=1)
    return PlacementMetrics(
        tokens=int(T), gpus_per_token=float(gpus_T.mean()), nodes_per_token=float(nodes_T.mean()),
        remote_gpus_per_token=float(remote_gpus_T.mean()), remote_nodes_per_token=float(remote_nodes_T.mean()),
        gpu_load_max_over_mean=max_over_mean(load_R), node_load_max_over_mean=max_over_mean(load_N),
        experts_per_gpu=plan.experts_per_rank)
