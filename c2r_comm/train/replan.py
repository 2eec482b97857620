"""Live re-planning in a training loop (train-demo --replan-every N).

Every training step feeds each MoE layer's routing (already computed: no extra work on the
device but one bincount-like update) to a CollaborationProfiler. Every N steps the counts are
summed over the ranks (one all_reduce), each layer gets a new placement from its co-activation
counts (Occult's greedy clustering: it needs counts only, no token lists), and
`MoELayer.apply_plan` moves experts and their optimizer state with one all_to_all per layer. The
placement never changes results: losses with and without re-planning agree (float64 to 1e-9,
tests/test_train_demo.py); what changes is the copies per token the exchanges send.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from c2r_comm.placement.occult import normalised_coactivation, occult_greedy_ranks
from c2r_comm.plan import PlacementPlan
from c2r_comm.routing.collaboration import CollaborationProfiler


def new_profiler(model) -> CollaborationProfiler:
    return CollaborationProfiler(len(model.moes), model.moes[0].dispatcher.plan.num_experts)


def replan(model, profiler: CollaborationProfiler, optimizer: torch.optim.Optimizer, group: Any) -> list[PlacementPlan]:
    """Collective: sum the profile over ranks, plan every layer from it, migrate; returns the plans."""
    profiler.all_reduce(group)
    stats = profiler.stats()
    plans = []
    for layer, moe in enumerate(model.moes):
        counts_EE, load_E = stats.counts_LEE[layer], stats.loads_LE[layer]
        W = moe.dispatcher.world_size
        ranks = occult_greedy_ranks(normalised_coactivation(counts_EE, load_E), W)
        plan = PlacementPlan(tuple(int(r) for r in np.asarray(ranks)), W)
        moe.apply_plan(plan, optimizer)
        plans.append(plan)
    return plans
