"""Topology (nodes x GPUs per node), rank maps and the process groups dispatchers use.

Ranks are laid out node-major: rank r lives on node r // gpus_per_node with local index
r % gpus_per_node, which is what torchrun and mpirun give with one process per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"Topology needs nodes >= 1 and gpus_per_node >= 1, got {self.nodes}x{self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_index_of(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def rank_of(self, node: int, local_index: int) -> int:
        return node * self.gpus_per_node + local_index

    def ranks_on_node(self, node: int) -> list[int]:
        return [self.rank_of(node, i) for i in range(self.gpus_per_node)]

    def rail_ranks(self, local_index: int) -> list[int]:
        """Same-local-index peers on every node (the ranks one NIC rail connects)."""
        return [self.rank_of(n, local_index) for n in range(self.nodes)]

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(
                f"topology {self} needs world size nodes*gpus_per_node = {self.world_size}, "
                f"but the process group has {world_size} ranks")

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}"


@dataclass(frozen=True)
class ProcessGroups:
    """The groups one rank takes part in; every group is created with the same timeout."""

    topology: Topology
    rank: int
    ep: Any  # whole expert-parallel group
    node: Any  # this rank's node
    rail: Any  # this rank's same-local-index peers across nodes
    timeout: timedelta

    @property
    def node_index(self) -> int:
        return self.topology.node_of(self.rank)

    @property
    def local_index(self) -> int:
        return self.topology.local_index_of(self.rank)


def build_process_groups(topology: Topology, timeout_s: float, ep_group: Optional[Any] = None) -> ProcessGroups:
    """Create node and rail groups. Collective: every rank of `ep_group` must call it together.

    new_group() must be called by all ranks for every group in the same order, so we create all
    node groups and all rail groups here and keep the ones this rank belongs to.
    """
    ep = ep_group if ep_group is not None else dist.group.WORLD
    world = dist.get_world_size(ep)
    topology.check_world_size(world)
    rank = dist.get_rank(ep)
    timeout = timedelta(seconds=timeout_s)
    global_ranks = dist.get_process_group_ranks(ep)
    my_node = my_rail = None
    for n in range(topology.nodes):
        g = dist.new_group([global_ranks[r] for r in topology.ranks_on_node(n)], timeout=timeout)
        if n == topology.node_of(rank):
            my_node = g
    for i in range(topology.gpus_per_node):
        g = dist.new_group([global_ranks[r] for r in topology.rail_ranks(i)], timeout=timeout)
        if i == topology.local_index_of(rank):
            my_rail = g
    return ProcessGroups(topology=topology, rank=rank, ep=ep, node=my_node, rail=my_rail, timeout=timeout)
