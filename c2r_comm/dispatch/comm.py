"""Collectives dispatchers build on: a differentiable all_to_all_single and the count exchange.

The count exchange doubles as the agreement step for bad input: every rank sends a status code
with its counts, so a rank that found bad input makes *every* rank raise before any data moves.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


class InputError(ValueError):
    """Bad dispatch input, raised on every rank of the group before any data collective."""


# Status codes carried by the count exchange; 0 = this rank's input is fine.
STATUS_MESSAGES = {
    1: "x_TD / topk_idx_TK / topk_weight_TK shapes or dtypes are inconsistent",
    2: "expert ids out of range (negative or >= num_experts)",
    3: "hidden size differs from the dispatcher's",
    4: "expert output shape does not match the dispatched rows",
}


def _a2a(output: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: Any) -> None:
    dist.all_to_all_single(output, inp.contiguous(), list(out_splits), list(in_splits), group=group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over several tensors with the same row splits, in a fixed order.

    Its backward is the same exchange with the splits swapped. Packing the tensors into one
    Function keeps the order of collectives identical on every rank in backward too (two
    independent autograd nodes could run in either order and deadlock).
    """

    @staticmethod
    def forward(ctx, out_splits, in_splits, group, *tensors):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        outs = []
        for t in tensors:
            out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
            _a2a(out, t, out_splits, in_splits, group)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads_in = []
        for g in grads:
            gi = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
            _a2a(gi, g, ctx.in_splits, ctx.out_splits, ctx.group)
            grads_in.append(gi)
        return (None, None, None, *grads_in)


def all_to_all(tensors: Sequence[torch.Tensor], out_splits: Sequence[int], in_splits: Sequence[int],
               group: Any) -> tuple[torch.Tensor, ...]:
    """Differentiable all_to_all_single of each tensor (rows split by `in_splits` per peer)."""
    return _AllToAll.apply(tuple(out_splits), tuple(in_splits), group, *tensors)


def all_to_all_plain(t: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: Any) -> torch.Tensor:
    """Non-differentiable all_to_all_single, for metadata (expert slots, node masks)."""
    out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
    _a2a(out, t, out_splits, in_splits, group)
    return out


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_rejected(what: str, statuses: Sequence[int], my_status: int, me: int, detail: Optional[str]) -> None:
    bad = {r: s for r, s in enumerate(statuses) if s}
    lines = [f"rank {r}: {STATUS_MESSAGES.get(s, f'status {s}')}" for r, s in sorted(bad.items())]
    if my_status and detail:
        lines.append(f"this rank ({me}): {detail}")
    raise InputError(f"{what} rejected on every rank before any data was sent:\n  " + "\n  ".join(lines))


def exchange_counts(send_counts_WC: torch.Tensor, status: int, group: Any, status_detail: Optional[str] = None,
                    agree: Sequence[int] = ()) -> torch.Tensor:
    """Send row `w` of send_counts_WC (int64 [peers, C]) to peer w; return what each peer sent us.

    Each row also carries this rank's `status` (STATUS_MESSAGES) and the `agree` values (e.g. top-k,
    dtype code) that must be equal everywhere; a nonzero status or a mismatch on any rank makes every
    rank raise InputError here, before any data moves.
    """
    W, C = send_counts_WC.shape
    extra = torch.tensor([status, *agree], dtype=torch.int64, device=send_counts_WC.device).expand(W, -1)
    packed = torch.cat([send_counts_WC.to(torch.int64), extra], dim=1)
    recv = torch.empty_like(packed)
    dist.all_to_all_single(recv, packed, group=group)
    recv = recv.cpu()
    statuses = recv[:, C].tolist()
    me = dist.get_rank(group)
    if any(statuses):
        _raise_rejected("dispatch input", statuses, status, me, status_detail)
    values = [tuple(v) for v in recv[:, C + 1:].tolist()]
    if any(v != values[0] for v in values):
        detail = ", ".join(f"rank {r}: {list(v)}" for r, v in enumerate(values))
        raise InputError(f"top-k / dtypes differ across ranks ({detail}); every rank must dispatch the same k and "
                         "dtypes (x, topk_weight)")
    return recv[:, :C]


def agree_on_status(status: int, group: Any, what: str, detail: Optional[str] = None) -> None:
    """One tiny all_gather so a problem found on one rank raises on all of them (never a hang)."""
    world = dist.get_world_size(group)
    device = _collective_device(group)
    gathered = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([status], dtype=torch.int64, device=device), group=group)
    statuses = [int(g.item()) for g in gathered]
    if any(statuses):
        _raise_rejected(what, statuses, status, dist.get_rank(group), detail)


def check_same_on_all_ranks(values: Sequence[int], what: str, group: Any, local_problem: Optional[str] = None) -> None:
    """Gather a few int64 values (and a local-problem flag) from every rank; raise on all ranks if any
    rank has a problem or the values differ."""
    mine = torch.tensor([int(local_problem is not None), *values], dtype=torch.int64)
    world = dist.get_world_size(group)
    device = _collective_device(group)
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine.to(device), group=group)
    rows = [g.cpu().tolist() for g in gathered]
    me = dist.get_rank(group)
    if any(r[0] for r in rows):
        bad = [r for r, row in enumerate(rows) if row[0]]
        mine_text = f"; this rank ({me}): {local_problem}" if local_problem else ""
        raise InputError(f"dispatcher set-up rejected on every rank: ranks {bad} found a problem{mine_text}")
    if any(r[1:] != rows[0][1:] for r in rows):
        detail = ", ".join(f"rank {r}: {v[1:]}" for r, v in enumerate(rows))
        raise InputError(f"{what} differs across ranks ({detail}); every rank must use the same one")


def metadata_dtype(max_value: int) -> torch.dtype:
    """Narrowest signed int holding -1..max_value: per-choice slot ids travel in it (bytes count)."""
    return torch.int16 if max_value < 2 ** 15 else torch.int32


def as_bytes(ids_RK: torch.Tensor) -> torch.Tensor:
    """[R, K] ints -> [R, K * itemsize] uint8 view: gloo has no int16, every backend moves bytes."""
    if ids_RK.numel() == 0:  # empty tensors may carry strides that view() refuses
        return torch.empty(ids_RK.shape[0], ids_RK.shape[1] * ids_RK.element_size(), dtype=torch.uint8,
                           device=ids_RK.device)
    return ids_RK.contiguous().view(torch.uint8)


def from_bytes(bytes_RB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if bytes_RB.numel() == 0:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return torch.empty(bytes_RB.shape[0], bytes_RB.shape[1] // itemsize, dtype=dtype, device=bytes_RB.device)
    return bytes_RB.contiguous().view(dtype)
