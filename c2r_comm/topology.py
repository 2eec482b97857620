"""Topology (nodes x GPUs per node) and rank maps: pure geometry, no torch.distributed.

Ranks are laid out node-major: rank r lives on node r // gpus_per_node with local index
r % gpus_per_node, which is what torchrun and mpirun give with one process per GPU. Process groups over these ranks
live in `c2r_comm.groups`, so numpy-only code (planners, metrics) never imports torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass


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
