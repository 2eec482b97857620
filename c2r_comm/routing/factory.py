"""Build the router a MoE layer uses from its config (routing.kind = topk | c2r | device_constrained)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from c2r_comm.config import ConfigError, ModelConfig, RoutingConfig, check_top_t
from c2r_comm.plan import PlacementPlan, expert_to_node
from c2r_comm.routing.collaboration import CollaborationStats
from c2r_comm.routing.router import C2RRouter, DeviceConstrainedRouter, TopKRouter
from c2r_comm.topology import Topology


def load_collaborators(path: str | Path, layer: int, num_experts: int, top_t: int) -> np.ndarray:
    """One layer's Top-T lists [E, top_t] from a .npz.

    Accepts either explicit lists (`collaborators_LET`, strongest partner first, e.g. imported from
    the paper's release) or a profiler stats file (`counts_LEE`), from which Top-T is derived.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("routing.collaborators", str(path), "an existing profiler .npz (c2r-comm profile --out)")
    with np.load(path) as z:
        if "collaborators_LET" in z:
            lists_LET = np.asarray(z["collaborators_LET"])
            if lists_LET.ndim != 3 or lists_LET.shape[1] != num_experts:
                raise ValueError(f"{path}: collaborators_LET must be [layers, num_experts={num_experts}, T], "
                                 f"got shape {lists_LET.shape}")
            if not 0 <= layer < lists_LET.shape[0]:
                raise ValueError(f"{path} has collaborator lists for layers 0..{lists_LET.shape[0] - 1}, "
                                 f"not layer {layer}")
            return lists_LET[layer]
    stats = CollaborationStats.load(path)
    if stats.num_experts != num_experts:
        raise ValueError(f"{path} was profiled with {stats.num_experts} experts but the model has {num_experts}")
    row = stats.row_of_layer(layer)
    return stats.collaborators(top_t)[row]  # checks top_t (config.check_top_t)


def build_router(model: ModelConfig, routing: RoutingConfig, plan: PlacementPlan, topology: Topology,
                 layer: int, generator: Optional[torch.Generator] = None) -> TopKRouter:
    """The router for MoE layer `layer` (0-based trace layer index used for profiled lists).

    generator: the gate's initial weights come from it alone, not torch's global RNG (see TopKRouter).
    """
    common = dict(renormalize=routing.renormalize, noise_std=routing.noise_std,
                  aux_loss_weight=routing.aux_loss_weight, z_loss_weight=routing.z_loss_weight, generator=generator)
    E, K = model.num_experts, model.top_k
    if routing.kind == "topk":
        return TopKRouter(model.hidden_size, E, K, **common)
    if routing.kind == "c2r":
        check_top_t(routing.top_t, E, K)  # before reading the file: a bad T fails the same way with any file
        if routing.collaborators is None:
            raise ConfigError("routing.collaborators", None, "a path to a profiler .npz (required for kind=c2r)")
        lists_ET = load_collaborators(routing.collaborators, layer, E, routing.top_t)
        return C2RRouter(model.hidden_size, E, K, torch.from_numpy(np.ascontiguousarray(lists_ET)).long(),
                         routing.top_t, **common)
    if routing.kind == "device_constrained":
        if routing.max_groups is None or routing.max_groups < 1:
            raise ConfigError("routing.max_groups", routing.max_groups, "an integer >= 1")
        plan.check_matches(E, topology.world_size, what="routing config")
        group_E = np.asarray(plan.expert_to_rank) if routing.level == "gpu" else expert_to_node(plan, topology)
        return DeviceConstrainedRouter(model.hidden_size, E, K, torch.from_numpy(group_E).long(),
                                       routing.max_groups, **common)
    raise ConfigError("routing.kind", routing.kind, "one of ('topk', 'c2r', 'device_constrained')")
