"""Replaying one layer of a routing trace over any number of ranks (the cost model's token dealing).

Token dealing: the selected prompts hold N tokens (trace rows 0..N-1 after `--prompts`). With W
ranks of T tokens each, rank r takes the tokens j = r*T + i (i = 0..T-1) of an endless repetition
of them, trace row j mod N. With W*T <= N this is exactly `RoutingTrace.rank_block`, what
`c2r-comm bench --trace` deals, so predictions and measurements see the same tokens.

Expert copies: a PlacementPlan needs the expert count divisible by the world size, so a 64-expert
trace cannot be spread over 1,024 GPUs as it is. With S copies the simulated model has S*E experts
and replayed token j uses copy (j mod S) of each expert it chose: expert e becomes e + E*(j mod S).
A token keeps its k choices and their co-activation pattern, every copy sees the same number of
tokens and the same load shape; the simulated model is a bigger one whose experts form S disjoint
communities (how a real model of S*E experts co-activates is not in the trace). S defaults to the
smallest S with S*E divisible by W, S = W / gcd(E, W), which is 1 whenever W divides E.

Planner tokens: placements are fitted on every distinct replayed (trace row, copy) once: the first
min(W*T, lcm(N, S)) tokens of the stream, where the stream repeats itself with period lcm(N, S).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from c2r_comm.config import ConfigError


def default_expert_copies(num_experts: int, world_size: int) -> int:
    """Smallest S >= 1 with S * num_experts divisible by world_size."""
    return world_size // math.gcd(num_experts, world_size)


def resolve_expert_copies(copies: Optional[int], num_experts: int, world_size: int, topology: str) -> int:
    """`copies` (None: the default) checked against the world; ConfigError names the flag."""
    if copies is None:
        return default_expert_copies(num_experts, world_size)
    if copies < 1 or (copies * num_experts) % world_size:
        raise ConfigError("--expert-copies", copies,
                          f"an integer S >= 1 with S * {num_experts} experts divisible by the {world_size} GPUs of "
                          f"topology {topology} (smallest: {default_expert_copies(num_experts, world_size)})")
    return copies


@dataclass(frozen=True)
class Replay:
    """One trace layer dealt to `world_size` ranks of `tokens_per_rank` tokens, with expert copies."""

    ids_NK: np.ndarray  # int64 [N, K]: the layer's expert ids of the selected prompts
    num_experts: int  # E of the trace
    world_size: int
    tokens_per_rank: int
    copies: int  # S

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids_NK, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError(f"a replay needs >= 1 trace token [N, K], got shape {ids.shape}")
        if self.world_size < 1 or self.tokens_per_rank < 1 or self.copies < 1:
            raise ValueError(f"world_size ({self.world_size}), tokens_per_rank ({self.tokens_per_rank}) and copies "
                             f"({self.copies}) must be >= 1")
        if (self.num_experts * self.copies) % self.world_size:
            raise ValueError(f"{self.num_experts} experts x {self.copies} copies cannot be split equally over "
                             f"{self.world_size} ranks")
        object.__setattr__(self, "ids_NK", ids)

    @property
    def simulated_experts(self) -> int:
        return self.num_experts * self.copies

    @property
    def top_k(self) -> int:
        return self.ids_NK.shape[1]

    @property
    def total_tokens(self) -> int:
        return self.world_size * self.tokens_per_rank

    def stream_ids(self, start: int, stop: int) -> np.ndarray:
        """int64 [stop - start, K]: expert ids (with copies) of stream tokens j in [start, stop)."""
        j = np.arange(start, stop, dtype=np.int64)
        return self.ids_NK[j % self.ids_NK.shape[0]] + (self.num_experts * (j % self.copies))[:, None]

    def rank_ids(self, rank: int) -> np.ndarray:
        """int64 [T, K]: the tokens dealt to `rank` (stream tokens rank*T .. rank*T + T - 1)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        T = self.tokens_per_rank
        return self.stream_ids(rank * T, (rank + 1) * T)

    def planner_ids(self) -> np.ndarray:
        """Every distinct replayed token once (see the module docstring): what placements are fitted on."""
        return self.stream_ids(0, min(self.total_tokens, math.lcm(self.ids_NK.shape[0], self.copies)))


def copies_of(ids_NK: np.ndarray, num_experts: int, copies: int) -> np.ndarray:
    """int64 [S*N, K]: every token once per expert copy (fit prompts given apart from the dealt ones)."""
    ids = np.asarray(ids_NK, dtype=np.int64)
    return np.concatenate([ids + num_experts * c for c in range(copies)]) if copies > 1 else ids
