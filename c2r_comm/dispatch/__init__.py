"""Dispatchers: alltoall (baseline), dedup (one copy per rank), hierarchical (one copy per node).

Each runs as phases: layout (pure) -> exchange_counts (the one host sync) -> send / wait ->
combine_start / wait; `dispatch()` and `combine()` compose them. See base.py.
"""
from __future__ import annotations

from typing import Optional

from c2r_comm.dispatch.alltoall import AllToAllDispatcher
from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, Route
from c2r_comm.dispatch.comm import InputError, StatusCode
from c2r_comm.dispatch.dedup import DedupDispatcher
from c2r_comm.dispatch.exchange_plan import CommStats, ExchangePlan, traffic_stats, world_traffic
from c2r_comm.dispatch.hierarchical import HierarchicalDispatcher
from c2r_comm.dispatch.layout import DROPPED_CHOICE
from c2r_comm.dispatch.transport import Pending
from c2r_comm.groups import ProcessGroups
from c2r_comm.plan import PlacementPlan

DISPATCHERS: dict[str, type[Dispatcher]] = {
    AllToAllDispatcher.name: AllToAllDispatcher,
    DedupDispatcher.name: DedupDispatcher,
    HierarchicalDispatcher.name: HierarchicalDispatcher,
}


def build_dispatcher(name: str, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int,
                     debug_checks: bool = False, label: Optional[str] = None,
                     equal_tokens: bool = False) -> Dispatcher:
    """label: what failure reports call the layer (e.g. "layer 3"); equal_tokens: every rank must
    dispatch the same number of tokens per call (checked in the count exchange)."""
    if name not in DISPATCHERS:
        raise ValueError(f"dispatcher {name!r} is unknown: allowed {sorted(DISPATCHERS)}")
    return DISPATCHERS[name](plan, groups, hidden_size, debug_checks, label, equal_tokens)


__all__ = ["AllToAllDispatcher", "CommStats", "DROPPED_CHOICE", "DedupDispatcher", "DispatchHandle", "Dispatcher",
           "ExchangePlan", "ExpertBatch", "HierarchicalDispatcher", "InputError", "Pending", "Route", "StatusCode",
           "build_dispatcher", "DISPATCHERS", "traffic_stats", "world_traffic"]
