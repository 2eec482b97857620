"""Counting ids on the device without a host sync, for every layer that counts routed experts.

`torch.bincount` on CUDA reads the ids' minimum and maximum on the host (two stream syncs per
call), so a training step that counted expert loads or co-activations with it would stall the GPU
once per layer. `bucket_counts` is the same count as one `index_add_` into a fixed-size tensor.
"""
from __future__ import annotations

from typing import Optional

import torch


def bucket_counts(bucket: torch.Tensor, num_buckets: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [num_buckets] occurrences of each bucket id (a bincount without the GPU sync);
    entries where `valid` is False are not counted. Ids must lie in [0, num_buckets)."""
    counts = torch.zeros(num_buckets + 1, dtype=torch.int64, device=bucket.device)
    if valid is not None:
        bucket = torch.where(valid, bucket, num_buckets)
    ones = torch.ones_like(bucket, dtype=torch.int64).reshape(-1)
    return counts.index_add_(0, bucket.reshape(-1), ones)[:num_buckets]
