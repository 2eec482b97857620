"""Timing helpers every benchmark shares: median / p10 / p90, device sync, a barrier on the right device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import group_site, guard


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> "Timing":
        t_ms = torch.tensor(list(samples_s), dtype=torch.float64) * 1e3
        return cls(*torch.quantile(t_ms, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(group: Any, device: torch.device) -> None:
    with guard(group_site("benchmark barrier", group)):
        if device.type == "cuda":  # NCCL barrier on this rank's own GPU
            dist.barrier(group=group, device_ids=[device.index])
        else:
            dist.barrier(group=group)
