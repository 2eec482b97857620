"""The count exchange (the one host sync of a dispatch) and the agreement steps for bad input.

The count exchange doubles as the agreement step for bad input: every rank sends a status code
with its counts, so a rank that found bad input makes *every* rank raise before any data moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import CommSite, group_site, guard


class InputError(ValueError):
    """Bad dispatch input, raised on every rank of the group before any data collective."""


class StatusCode(IntEnum):
    """What a rank found wrong with its own input; carried by the count exchange (0 = fine)."""

    OK = 0
    BAD_SHAPE_OR_DTYPE = 1
    EXPERT_ID_OUT_OF_RANGE = 2
    HIDDEN_SIZE_MISMATCH = 3
    COMBINE_SHAPE_MISMATCH = 4


STATUS_MESSAGES = {
    StatusCode.BAD_SHAPE_OR_DTYPE: "x_TD / topk_idx_TK / topk_weight_TK shapes or dtypes are inconsistent",
    StatusCode.EXPERT_ID_OUT_OF_RANGE: "expert ids out of range (below -1, the dropped choice, or >= num_experts)",
    StatusCode.HIDDEN_SIZE_MISMATCH: "hidden size differs from the dispatcher's",
    StatusCode.COMBINE_SHAPE_MISMATCH: "expert output shape does not match the dispatched rows",
}


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_rejected(what: str, statuses: Sequence[int], my_status: int, me: int,
                    detail: Optional[str | Callable[[], str]]) -> None:
    bad = {r: s for r, s in enumerate(statuses) if s}
    lines = [f"rank {r}: {STATUS_MESSAGES.get(s, f'status {s}')}" for r, s in sorted(bad.items())]
    if my_status and detail:
        lines.append(f"this rank ({me}): {detail() if callable(detail) else detail}")
    raise InputError(f"{what} rejected on every rank before any data was sent:\n  " + "\n  ".join(lines))


def exchange_counts(send_counts_WC: torch.Tensor, status: torch.Tensor, group: Any,
                    status_detail: Optional[str | Callable[[], str]] = None, agree: Sequence[int] = (),
                    site: CommSite = CommSite()) -> "CountExchange":
    """Send row `w` of send_counts_WC (int64 [peers, C]) to peer w; learn what each peer sent us.

    This is the one host sync of a dispatch: a single all_to_all_single of a few int64 per peer,
    then one device->host copy that brings back what the peers sent *and* this rank's own counts.
    Each row also carries this rank's `status` (a device scalar, StatusCode) and the `agree`
    values (top-k, dtype codes) that must be equal everywhere: a nonzero status or a mismatch on
    any rank makes every rank raise InputError here, before any data moves. A failed peer raises
    comm_failures.CommError naming `site` (its stage is set to "count exchange" here).
    """
    W, C = send_counts_WC.shape
    device = send_counts_WC.device
    # One buffer for both directions, so a single device->host copy brings back both.
    both = torch.empty(2, W, C + 1 + len(agree), dtype=torch.int64, device=device)
    recv, packed = both[0], both[1]
    packed[:, :C] = send_counts_WC
    packed[:, C] = status.to(device, torch.int64)
    for j, value in enumerate(agree):  # filled on the device: no host->device copy (a sync on CUDA)
        packed[:, C + 1 + j] = value
    with guard(lambda: site.at(stage="count exchange", group=group, group_peers=tuple(range(W)))):
        dist.all_to_all_single(recv, packed, group=group)
    # The host sync. A copy of its own also when the group runs on the CPU (where .cpu() would
    # return `both` itself), so the host's copy and the device's are never the same tensor.
    host = both.to("cpu", copy=True)
    recv_rows, sent_rows = host.tolist()
    statuses = [row[C] for row in recv_rows]
    me = dist.get_rank(group)
    if any(statuses):
        _raise_rejected("dispatch input", statuses, sent_rows[0][C], me, status_detail)
    values = [tuple(row[C + 1:]) for row in recv_rows]
    if any(v != values[0] for v in values):
        grads = {v[3] for v in values if len(v) >= 4}
        detail = "; ".join(f"rank {r}: k={v[0]}, x {dtype_name(v[1])}, topk_weight {dtype_name(v[2])}"
                           + (f", {'needs' if v[3] else 'no'} grad" if len(grads) > 1 else "")
                           + (f", {v[4]} tokens" if len(v) == 5 else "") if len(v) in (4, 5)
                           else f"rank {r}: {list(v)}" for r, v in enumerate(values))
        equal_tokens = len(values[0]) == 5
        raise InputError(f"top-k / dtypes{' / gradients' if len(grads) > 1 else ''}"
                         f"{' / token counts' if equal_tokens else ''} differ across ranks ({detail}); "
                         "every rank must dispatch the same k and dtypes (x, topk_weight)"
                         + (", and all or none with inputs that need gradients (grad mode on and x or topk_weight "
                            "requiring grad: backward's exchanges are collectives)" if len(grads) > 1 else "")
                         + (" and, with routing.pad_to_capacity (capacity from each rank's tokens), the same number "
                            "of tokens" if equal_tokens else ""))
    return CountExchange(host[0, :, :C], host[1, :, :C], recv[:, :C])


@dataclass(frozen=True)
class CountExchange:
    """What the count exchange returned: host copies for splits, the device copy for offsets."""

    recv_WC: torch.Tensor  # int64 [W, C] on the host: row w = what peer w sent us
    sent_WC: torch.Tensor  # int64 [W, C] on the host: our own counts (same sync)
    recv_device_WC: torch.Tensor  # int64 [W, C] on the device (no sync needed to use it there)


def agree_on_status(status: int, group: Any, what: str, detail: Optional[str] = None) -> None:
    """One tiny all_gather so a problem found on one rank raises on all of them (never a hang)."""
    world = dist.get_world_size(group)
    device = _collective_device(group)
    gathered = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
    with guard(lambda: group_site(f"agreement on {what}", group)):
        dist.all_gather(gathered, torch.tensor([status], dtype=torch.int64, device=device), group=group)
    statuses = [int(g.item()) for g in gathered]
    if any(statuses):
        _raise_rejected(what, statuses, status, dist.get_rank(group), detail)


def check_same_on_all_ranks(values: Sequence[int], what: str, group: Any, local_problem: Optional[str] = None,
                            step: str = "dispatcher set-up") -> None:
    """Gather a few int64 values (and a local-problem flag) from every rank; raise on all ranks if any
    rank has a problem (named by `step`, the set-up step it stops) or the values (`what`) differ."""
    mine = torch.tensor([int(local_problem is not None), *values], dtype=torch.int64)
    world = dist.get_world_size(group)
    device = _collective_device(group)
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    with guard(lambda: group_site("set-up", group, stage=f"agreement on {what}")):
        dist.all_gather(gathered, mine.to(device), group=group)
    rows = [g.cpu().tolist() for g in gathered]
    me = dist.get_rank(group)
    if any(r[0] for r in rows):
        bad = [r for r, row in enumerate(rows) if row[0]]
        mine_text = f"; this rank ({me}): {local_problem}" if local_problem else ""
        raise InputError(f"{step} rejected on every rank before any data was sent: ranks {bad} found a "
                         f"problem{mine_text}")
    if any(r[1:] != rows[0][1:] for r in rows):
        detail = ", ".join(f"rank {r}: {v[1:]}" for r, v in enumerate(rows))
        raise InputError(f"{what} differs across ranks ({detail}); every rank must use the same one")


PAYLOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_name(code: int) -> str:
    """A dtype code's name for messages ('float32'), as dtype_code numbers them."""
    if not 0 <= code < len(PAYLOAD_DTYPES):
        return "an unsupported dtype"
    return str(PAYLOAD_DTYPES[code]).removeprefix("torch.")


def dtype_code(dtype: torch.dtype) -> int:
    """The code of a payload dtype in the count exchange's agreement values (99: unsupported)."""
    return PAYLOAD_DTYPES.index(dtype) if dtype in PAYLOAD_DTYPES else 99


def metadata_dtype(max_value: int) -> torch.dtype:
    """Narrowest signed int holding -1..max_value: per-choice slot ids travel in it (bytes count)."""
    return torch.int16 if max_value < 2 ** 15 else torch.int32
