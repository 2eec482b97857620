"""Plan every selected layer of a routing trace on fit prompts, score on eval prompts, build the
PlanFile; also the comparison methods (contiguous, occult_greedy) under the same options."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from c2r_comm.placement.metrics import PlacementMetrics, placement_metrics
from c2r_comm.placement.planners import LayerPlan, PlannerOptions, plan_layer
from c2r_comm.placement.replicas import select_replicas
from c2r_comm.plan import PlanFile
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class LayerReport:
    layer: int  # 0-based trace layer index
    plans: Mapping[str, LayerPlan]  # method -> plan (the chosen method and the comparisons)
    metrics: Mapping[str, PlacementMetrics]  # method -> metrics on the eval tokens


@dataclass(frozen=True)
class TracePlanResult:
    plan_file: PlanFile
    reports: tuple[LayerReport, ...]
    method: str
    plan_seconds: float  # time spent planning the chosen method over all layers


def plan_trace(fit: RoutingTrace, evaluation: RoutingTrace, topology: Topology, method: str,
               layers: Sequence[int], options: PlannerOptions = PlannerOptions(),
               compare: Sequence[str] = ("contiguous", "occult_greedy"), fit_info: Optional[Mapping[str, Any]] = None,
               on_layer: Optional[Callable[[int, int], None]] = None) -> TracePlanResult:
    """Plan `layers` with `method` (and each of `compare`), metrics on `evaluation`'s tokens.
    on_layer(done, total) is called after each layer (progress)."""
    if fit.num_experts != evaluation.num_experts:
        raise ValueError(f"fit trace has {fit.num_experts} experts but the eval trace has {evaluation.num_experts}")
    if not layers:
        raise ValueError("no layers selected to plan")
    methods = [method] + [m for m in compare if m != method]
    reports, plans, metrics_by_layer = [], {}, {}
    plan_seconds = 0.0
    partitioners = set()
    for i, layer in enumerate(layers):
        fit_ids, eval_ids = fit.layer(layer), evaluation.layer(layer)
        layer_plans, layer_metrics = {}, {}
        selection = None
        for m in methods:
            lp = plan_layer(m, fit_ids, fit.num_experts, topology, options)
            if m == method and options.replica_slots:  # replicas on the chosen plan; comparisons stay as they are
                started = time.perf_counter()
                selection = select_replicas(lp.plan, fit_ids, topology, options.replica_slots,
                                            options.replica_load_tolerance, options.replica_pinned_load_cap,
                                            options.copy_load_cap, pinned_blocks=options.replica_pinned_blocks)
                lp = dataclasses.replace(lp, plan=selection.plan, seconds=lp.seconds + time.perf_counter() - started)
            layer_plans[m] = lp
            layer_metrics[m] = placement_metrics(lp.plan, topology, eval_ids)
        chosen = layer_plans[method]
        plan_seconds += chosen.seconds
        if chosen.partitioner:
            partitioners.add(chosen.partitioner)
        plans[layer] = chosen.plan
        entry = {"eval": layer_metrics[method].to_dict()}
        if chosen.balance is not None:
            entry["fit_gpu_load_max_over_mean"] = chosen.balance.load_max_over_mean
            entry["load_tolerance_met"] = chosen.balance.met
            entry["balance"] = chosen.balance.message
        if selection is not None:
            entry["replicas_fit"] = {"gpus_per_token_before": selection.fit_gpus_per_token[0],
                                     "gpus_per_token_after": selection.fit_gpus_per_token[1],
                                     "modelled_gpu_load_max_over_mean": selection.modelled_load_max_over_mean}
            if selection.fit_nodes_per_token is not None:
                entry["replicas_fit"].update(nodes_per_token_before=selection.fit_nodes_per_token[0],
                                             nodes_per_token_after=selection.fit_nodes_per_token[1])
        metrics_by_layer[layer] = entry
        reports.append(LayerReport(layer, layer_plans, layer_metrics))
        if on_layer is not None:
            on_layer(i + 1, len(layers))
    fit_doc = dict(fit_info or {})
    fit_doc.update(load_tolerance=options.load_tolerance, refine=options.refine, seed=options.seed,
                   hierarchical=(topology.nodes > 1 if options.hierarchical is None else options.hierarchical),
                   inter_node_cost=options.inter_node_cost, polish_kicks=options.polish_kicks,
                   partitioner=sorted(partitioners) or None,
                   initial_partitioning_runs=options.partition.initial_partitioning_runs,
                   fit_tokens=fit.num_tokens, eval_tokens=evaluation.num_tokens, plan_seconds=round(plan_seconds, 3))
    if options.replica_slots:  # absent without replicas: those plan files stay byte-identical
        fit_doc["replica_slots"] = options.replica_slots
        fit_doc["replica_load_tolerance"] = options.replica_load_tolerance
        fit_doc["replica_pinned_load_cap"] = options.replica_pinned_load_cap
        fit_doc["replica_pinned_blocks"] = options.replica_pinned_blocks
        fit_doc["copy_load_cap"] = options.copy_load_cap
    plan_file = PlanFile(topology, fit.num_experts, plans, method, metrics_by_layer, fit_doc)
    return TracePlanResult(plan_file, tuple(reports), method, plan_seconds)
