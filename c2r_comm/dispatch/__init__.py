"""Dispatchers: alltoall (baseline), dedup (one copy per rank), hierarchical (one copy per node)."""
from __future__ import annotations

from c2r_comm.dispatch.alltoall import AllToAllDispatcher
from c2r_comm.dispatch.base import CommStats, DispatchHandle, Dispatcher, ExpertBatch
from c2r_comm.dispatch.comm import InputError
from c2r_comm.dispatch.dedup import DedupDispatcher
from c2r_comm.dispatch.hierarchical import HierarchicalDispatcher
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import ProcessGroups

DISPATCHERS: dict[str, type[Dispatcher]] = {
    AllToAllDispatcher.name: AllToAllDispatcher,
    DedupDispatcher.name: DedupDispatcher,
    HierarchicalDispatcher.name: HierarchicalDispatcher,
}


def build_dispatcher(name: str, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int) -> Dispatcher:
    if name not in DISPATCHERS:
        raise ValueError(f"dispatcher {name!r} is unknown: allowed {sorted(DISPATCHERS)}")
    return DISPATCHERS[name](plan, groups, hidden_size)


__all__ = ["AllToAllDispatcher", "CommStats", "DedupDispatcher", "DispatchHandle", "Dispatcher", "ExpertBatch",
           "HierarchicalDispatcher", "InputError", "build_dispatcher", "DISPATCHERS"]
