"""Live re-planning: move a layer's expert weights (and optimizer state) to a new placement plan.

Every rank knows both plans, so it knows, without asking, which rows it sends to whom and which
it receives: each expert slot of the new plan is filled from the old plan's primary copy of that
expert. One all_to_all_single moves all of them, each row packing the expert's three weight
matrices and, with an optimizer, its per-parameter state tensors of the same shape (Adam's
exp_avg / exp_avg_sq; SGD's momentum_buffer). The Parameters keep their identity (the optimizer
keeps its param groups); their data and state are replaced. Results before and after a
migration are identical for the same weights (tests/test_replicas.py).
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Optional

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.dispatch.comm import check_same_on_all_ranks
from c2r_comm.experts import GroupedExperts
from c2r_comm.plan import PlacementPlan


def _state_keys(optimizer: Optional[torch.optim.Optimizer], params) -> tuple[list[str], Optional[str]]:
    """(per-parameter state keys to move, a problem or None). Moved: tensors shaped like the
    parameter, present for all three expert tensors; a state tensor with the slots' leading
    dimension but another shape, or present for only some tensors, cannot be moved: a problem."""
    if optimizer is None:
        return [], None
    per_param = []
    for p in params:
        state = optimizer.state.get(p, {})
        odd = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() and v.shape != p.shape
               and v.shape[:1] == p.shape[:1]]
        if odd:
            return [], f"optimizer state {odd} has the experts' leading dimension but not their shape: cannot move it"
        per_param.append({k for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape})
    if any(keys != per_param[0] for keys in per_param):
        return [], f"optimizer state differs across the expert tensors ({[sorted(k) for k in per_param]})"
    return sorted(per_param[0]), None


def _fingerprint(values: list) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(values).encode()).digest()[:8], "little") >> 2


def migrate_experts(experts: GroupedExperts, old: PlacementPlan, new: PlacementPlan, rank: int, group: Any,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Collective over the EP group: afterwards `experts` holds new.rank_experts[rank] (weights and,
    with `optimizer`, its state), taken from each expert's primary copy under `old`. Every rank
    first agrees on what moves (the state keys and dtypes; that its experts match `old`), so a
    mismatch raises on every rank before any data moves."""
    if (old.num_experts, old.world_size) != (new.num_experts, new.world_size):
        raise ValueError(f"apply_plan: the new plan is for {new.num_experts} experts on {new.world_size} ranks, the "
                         f"layer's for {old.num_experts} on {old.world_size}")
    params = [experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD]
    keys, problem = _state_keys(optimizer, params)
    if problem is None and tuple(experts.global_ids) != tuple(old.rank_experts[rank]):
        problem = (f"the experts hold {list(experts.global_ids)}, the current plan puts {list(old.rank_experts[rank])} "
                   "here")
    tensors = [p.data for p in params] + [optimizer.state[p][k] for k in keys for p in params]
    check_same_on_all_ranks([_fingerprint([keys, [str(t.dtype) for t in tensors]])],
                            "expert migration (apply_plan): optimizer state keys and dtypes", group, problem,
                            step="expert migration (apply_plan)")
    W = old.world_size
    widths = [t[0].numel() for t in tensors]
    ref = params[0]
    pack_dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])  # exact for every tensor
    # Rows this rank sends: for every destination d, the new slots of d whose expert's primary is here.
    send_slots: list[int] = []
    send_counts = [0] * W
    for d in range(W):
        for e in new.rank_experts[d]:
            if old.expert_to_rank[e] == rank:
                send_slots.append(old.expert_to_slot[e])
                send_counts[d] += 1
    # Rows this rank receives, in source-rank order, and the new slot each fills.
    recv_order: list[int] = []
    recv_counts = [0] * W
    for src in range(W):
        for s, e in enumerate(new.rank_experts[rank]):
            if old.expert_to_rank[e] == src:
                recv_order.append(s)
                recv_counts[src] += 1
    width = sum(widths)
    send = torch.empty(len(send_slots), width, dtype=pack_dtype, device=ref.device)
    if send_slots:
        index = torch.tensor(send_slots, device=ref.device)
        offset = 0
        for t, n in zip(tensors, widths):
            send[:, offset:offset + n] = t.index_select(0, index).reshape(len(send_slots), n).to(pack_dtype)
            offset += n
    recv = torch.empty(len(recv_order), width, dtype=pack_dtype, device=ref.device)
    with guard(group_site("expert migration (apply_plan)", group)):
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    L_new = len(new.rank_experts[rank])
    place = torch.empty(L_new, dtype=torch.long, device=ref.device)
    place[torch.tensor(recv_order, dtype=torch.long, device=ref.device)] = torch.arange(L_new, device=ref.device)
    rows = recv.index_select(0, place)  # new slot order
    offset = 0
    moved = []
    for t, n in zip(tensors, widths):
        moved.append(rows[:, offset:offset + n].reshape((L_new,) + tuple(t.shape[1:])).to(t.dtype).contiguous())
        offset += n
    for p, data in zip(params, moved[:3]):
        p.data = data
        p.grad = None
    for i, k in enumerate(keys):
        for j, p in enumerate(params):
            optimizer.state[p][k] = moved[3 + i * 3 + j]
    experts.global_ids = tuple(new.rank_experts[rank])
