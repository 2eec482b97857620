"""Planner registry: one layer's fit tokens -> a PlacementPlan with equal experts per GPU.

Methods: contiguous, random and occult_greedy are baselines, returned as their published rules
give them (no refinement); hypergraph is followed by the load refinement.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from c2r_comm.placement.hypergraph import PartitionSettings, hypergraph_ranks
from c2r_comm.placement.metrics import expert_loads
from c2r_comm.placement.occult import normalised_coactivation, occult_greedy_ranks
from c2r_comm.routing.collaboration import coactivation_counts
from c2r_comm.placement.refine import BalanceResult, balance_load, polish_by_kicks
from c2r_comm.placement.replicas import (COPY_LOAD_CAP, PINNED_BLOCKS, PINNED_LOAD_CAP, REPLICA_LOAD_TOLERANCE,
                                         check_pinned_blocks)
from c2r_comm.placement.swap_cost import SwapCost, topology_levels
from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.plan import PlacementPlan, check_copy_load_cap
from c2r_comm.topology import Topology

METHODS = ("hypergraph", "occult_greedy", "contiguous", "random")
BASELINES = ("contiguous", "random", "occult_greedy")  # returned as is: no load refinement


@dataclass(frozen=True)
class PlannerOptions:
    load_tolerance: float = 1.10  # per-GPU token load max/mean on the fit tokens
    refine: bool = True  # load refinement for non-baseline methods
    recover_objective: bool = True  # after balancing, improving swaps that keep the load bound
    hierarchical: Optional[bool] = None  # None: hierarchical when there are several nodes
    inter_node_cost: float = 4.0  # refinement: one more node per token costs this many more GPUs
    polish_kicks: int = 0  # iterated-local-search rounds on the exact objective after refinement (slow)
    replica_slots: int = 0  # R replica slots per GPU on the chosen method's plan (placement/replicas.py)
    replica_load_tolerance: float = REPLICA_LOAD_TOLERANCE  # the replica selection's modelled load bound
    # replicas first go to GPUs whose single-copy fit load / mean exceeds this (None: no repair)
    replica_pinned_load_cap: Optional[float] = PINNED_LOAD_CAP
    replica_pinned_blocks: int = PINNED_BLOCKS  # the pinned load is the worst of this many fit blocks'
    copy_load_cap: Optional[float] = COPY_LOAD_CAP  # written into replica plans (replica_choice.py); None: ties only
    seed: int = 0
    partition: PartitionSettings = field(default_factory=PartitionSettings)

    def __post_init__(self) -> None:
        if self.load_tolerance < 1.0:
            raise ValueError(f"load_tolerance = {self.load_tolerance} is invalid: allowed a max/mean ratio >= 1.0")
        if self.inter_node_cost < 0:
            raise ValueError(f"inter_node_cost = {self.inter_node_cost} is invalid: allowed >= 0")
        if isinstance(self.replica_slots, bool) or not isinstance(self.replica_slots, int) or self.replica_slots < 0:
            raise ValueError(f"replica_slots = {self.replica_slots!r} is invalid: allowed an integer >= 0")
        if not self.replica_load_tolerance >= 1.0:
            raise ValueError(f"replica_load_tolerance = {self.replica_load_tolerance} is invalid: allowed a max/mean "
                             "ratio >= 1.0")
        if self.replica_pinned_load_cap is not None and not (math.isfinite(self.replica_pinned_load_cap)
                                                             and self.replica_pinned_load_cap > 0):
            raise ValueError(f"replica_pinned_load_cap = {self.replica_pinned_load_cap} is invalid: allowed a "
                             "finite load / mean > 0, or none")
        check_pinned_blocks(self.replica_pinned_blocks, "replica_pinned_blocks")
        check_copy_load_cap(self.copy_load_cap, "copy_load_cap")
        if self.polish_kicks < 0:
            raise ValueError(f"polish_kicks = {self.polish_kicks} is invalid: allowed an integer >= 0")


@dataclass(frozen=True)
class LayerPlan:
    plan: PlacementPlan
    method: str
    balance: Optional[BalanceResult]  # None for baselines or refine=False
    partitioner: Optional[str]  # 'mtkahypar' / 'local_search' for hypergraph, else None
    seconds: float


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"placement method {method!r} is invalid: allowed {METHODS}")


def plan_layer(method: str, fit_ids_TK: np.ndarray, num_experts: int, topology: Topology,
               options: PlannerOptions = PlannerOptions()) -> LayerPlan:
    """Plan one layer from its fit tokens [tokens, k]."""
    _check_method(method)
    W = topology.world_size
    if num_experts % W:
        raise ValueError(f"{num_experts} experts cannot be split equally over topology {topology} ({W} GPUs)")
    start = time.perf_counter()
    if method == "contiguous":
        return LayerPlan(PlacementPlan.contiguous(num_experts, W), method, None, None, time.perf_counter() - start)
    if method == "random":
        plan = PlacementPlan.random(num_experts, W, options.seed)
        return LayerPlan(plan, method, None, None, time.perf_counter() - start)
    fit_ids_TK = np.asarray(fit_ids_TK, dtype=np.int64)
    if fit_ids_TK.ndim != 2 or fit_ids_TK.shape[0] == 0:
        raise ValueError(f"method {method!r} needs fit tokens [tokens, k] with >= 1 token, got {fit_ids_TK.shape}")
    hg = TokenHypergraph.from_ids(fit_ids_TK, num_experts)
    load_E = expert_loads(fit_ids_TK, num_experts)
    partitioner = None
    if method == "occult_greedy":
        collab = normalised_coactivation(coactivation_counts(fit_ids_TK, num_experts), load_E)
        rank_E = occult_greedy_ranks(collab, W)
    else:
        hierarchical = topology.nodes > 1 if options.hierarchical is None else options.hierarchical
        rank_E, partitioner = hypergraph_ranks(hg, topology, options.partition, hierarchical)
    balance = None
    if method not in BASELINES and (options.refine or options.polish_kicks):
        cost = SwapCost(hg, topology_levels(topology, options.inter_node_cost))
        if options.refine:
            balance = balance_load(cost, load_E, rank_E, options.load_tolerance, recover=options.recover_objective,
                                   polish_kicks=options.polish_kicks, seed=options.seed)
            rank_E = np.asarray(balance.expert_to_rank)
        else:  # --no-refine: polish without a load bound
            rank_E, _ = polish_by_kicks(cost, rank_E, options.polish_kicks, options.seed)
    plan = PlacementPlan(tuple(int(r) for r in rank_E), W)
    return LayerPlan(plan, method, balance, partitioner, time.perf_counter() - start)

