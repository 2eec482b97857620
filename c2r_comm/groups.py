"""Process groups dispatchers use (EP, per node, rails), all created with one timeout."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch.distributed as dist

from c2r_comm.comm_failures import PeerDirectory
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class ProcessGroups:
    """The groups one rank takes part in; every group is created with the same timeout."""

    topology: Topology
    rank: int
    ep: Any  # whole expert-parallel group
    node: Any  # this rank's node
    rail: Any  # this rank's same-local-index peers across nodes
    timeout: timedelta
    # gloo only: a second group over the EP ranks. On emulated links a gloo pair (one TCP
    # connection) appeared to move one direction at a time (docs/benchmarks.md, issue 10); sparse
    # exchanges send to higher ranks on `ep` and to lower ranks here, so each direction of a pair
    # has its own connection. None on NCCL (already duplex).
    ep_reverse: Optional[Any] = None

    @property
    def node_index(self) -> int:
        return self.topology.node_of(self.rank)

    @property
    def local_index(self) -> int:
        return self.topology.local_index_of(self.rank)


def build_process_groups(topology: Topology, timeout_s: float, ep_group: Optional[Any] = None,
                         all_ep_ranks: Optional[Sequence[Sequence[int]]] = None) -> ProcessGroups:
    """Create node and rail groups. Collective: every rank of `ep_group` must call it together.

    new_group() must be called by all ranks for every group in the same order, so we create all
    node groups and all rail groups here and keep the ones this rank belongs to.

    all_ep_ranks: when the EP group is one of several (an EP group smaller than the world, e.g.
    Megatron's expert-parallel groups next to data-parallel replicas), the global ranks of every
    EP group, the same list on every rank of the world. The groups of every EP group are then
    created on every rank (as new_group() requires), so the call is collective over the world.
    """
    ep = ep_group if ep_group is not None else dist.group.WORLD
    world = dist.get_world_size(ep)
    topology.check_world_size(world)
    rank = dist.get_rank(ep)
    timeout = timedelta(seconds=timeout_s)
    global_ranks = tuple(dist.get_process_group_ranks(ep))
    ep_groups = [global_ranks] if all_ep_ranks is None else [tuple(int(r) for r in g) for g in all_ep_ranks]
    flat = sorted(r for g in ep_groups for r in g)
    if global_ranks not in ep_groups or any(len(g) != world for g in ep_groups) or \
            (all_ep_ranks is not None and flat != list(range(dist.get_world_size()))):
        # the same list on every rank: every rank raises here, before any new_group
        raise ValueError(f"all_ep_ranks {ep_groups} must list this rank's EP group {list(global_ranks)} and only "
                         f"groups of {world} ranks that split the world's {dist.get_world_size()} ranks")
    my_node = my_rail = ep_reverse = None
    backend = dist.get_backend(ep)
    PeerDirectory.publish()  # this rank's host and pid, for failure reports (comm_failures.CommError)
    for ranks in ep_groups:
        mine = ranks == global_ranks
        for n in range(topology.nodes):
            g = dist.new_group([ranks[r] for r in topology.ranks_on_node(n)], timeout=timeout)
            if mine and n == topology.node_of(rank):
                my_node = g
        for i in range(topology.gpus_per_node):
            g = dist.new_group([ranks[r] for r in topology.rail_ranks(i)], timeout=timeout)
            if mine and i == topology.local_index_of(rank):
                my_rail = g
        if backend == "gloo":
            g = dist.new_group(list(ranks), timeout=timeout, backend=backend)
            ep_reverse = g if mine else ep_reverse
    return ProcessGroups(topology=topology, rank=rank, ep=ep, node=my_node, rail=my_rail, timeout=timeout,
                         ep_reverse=ep_reverse)
