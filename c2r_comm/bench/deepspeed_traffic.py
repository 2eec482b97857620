"""What DeepSpeed's MoE layer sends, as our rows count it (the deepspeed peer, deepspeed_peer.py).

The module-level `dist` that deepspeed.moe.sharded_moe calls is wrapped (CommRecorder, installed by
deepspeed_peer.import_deepspeed) to record the tensors each all_to_all_single / all_reduce is given
(shapes only: no copies, no syncs); deepspeed_traffic turns one forward's calls into our CommStats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.distributed as dist

from c2r_comm.bench.peers import DEEPSPEED_VERSION, PeerTraffic
from c2r_comm.dispatch.exchange_plan import stats_of_messages

if TYPE_CHECKING:
    from c2r_comm.bench.deepspeed_peer import DeepSpeedPeer


@dataclass(frozen=True)
class CommCall:
    op: str  # "all_to_all_single" or "all_reduce"
    shape: tuple[int, ...]  # the input tensor's
    element_size: int
    input_split_sizes: Optional[tuple[int, ...]]
    group: Any

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.element_size

    def rows_to(self, group_size: int) -> list[int]:
        """Rows (last dim = one row) this call sends to each rank of its group."""
        rows = math.prod(self.shape[:-1]) if self.shape else 0
        if self.input_split_sizes is None:
            return [rows // group_size] * group_size  # all_to_all_single without splits: equal chunks
        per_first = rows // self.shape[0] if self.shape[0] else 0
        return [s * per_first for s in self.input_split_sizes]


class CommRecorder:
    """deepspeed.comm as deepspeed.moe.sharded_moe sees it; while recording, notes every all_to_all_single
    and all_reduce it is given (shapes only: no copies, no syncs) and passes the call on unchanged."""

    def __init__(self, comm):
        self._comm = comm
        self.calls: Optional[list[CommCall]] = None

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _note(self, op: str, tensor: torch.Tensor, splits, group) -> None:
        if self.calls is not None:
            self.calls.append(CommCall(op, tuple(tensor.shape), tensor.element_size(),
                                       None if splits is None else tuple(int(s) for s in splits), group))

    def all_to_all_single(self, output, tensor, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False, **kwargs):
        self._note("all_to_all_single", tensor, input_split_sizes, group)
        return self._comm.all_to_all_single(output, tensor, output_split_sizes=output_split_sizes,
                                            input_split_sizes=input_split_sizes, group=group, async_op=async_op,
                                            **kwargs)

    def all_reduce(self, tensor, *args, **kwargs):
        self._note("all_reduce", tensor, None, kwargs.get("group"))
        return self._comm.all_reduce(tensor, *args, **kwargs)


def sharded_moe_recorder() -> CommRecorder:
    from deepspeed.moe import sharded_moe
    return sharded_moe.dist


def deepspeed_traffic(peer: "DeepSpeedPeer", fwd_calls: Sequence[CommCall], bwd_calls: Sequence[CommCall],
                      tokens: int, groups, device: torch.device) -> PeerTraffic:
    """Rows and bytes its forward's two all2alls sent (dispatch, combine), over all ranks, classified by
    our topology, padding rows included; plus notes on what differs. Collective (one all_reduce)."""
    W, me = groups.topology.world_size, groups.rank
    a2a = [c for c in fwd_calls if c.op == "all_to_all_single"]
    reduces = [c for c in fwd_calls if c.op == "all_reduce"]
    if W > 1 and len(a2a) != 2:
        raise RuntimeError(f"expected deepspeed's forward to call all_to_all_single twice, it called it {len(a2a)} "
                           f"times (a deepspeed other than {DEEPSPEED_VERSION}?)")
    ds_ranks = dist.get_process_group_ranks(peer.ep_group) if W > 1 else [me]
    ep_ranks = dist.get_process_group_ranks(groups.ep)
    to_topo = [ep_ranks.index(g) for g in ds_ranks]
    routes = int(peer.moe.deepspeed_moe.exp_counts.sum())
    t = torch.zeros(2, W, W, dtype=torch.int64)
    for i, call in enumerate(a2a):
        for j, rows in enumerate(call.rows_to(len(ds_ranks))):
            t[i, me, to_topo[j]] = rows
    extra = torch.tensor([tokens, routes, len(reduces), sum(c.bytes for c in reduces),
                          sum(c.bytes for c in bwd_calls if c.op == "all_to_all_single")], dtype=torch.int64)
    flat = torch.cat([t.reshape(-1), extra]).to(device)
    dist.all_reduce(flat, group=groups.ep)
    flat = flat.cpu()
    t, (tokens_all, routes_all, n_reduce, reduce_bytes, bwd_bytes) = flat[:-5].reshape(2, W, W), flat[-5:].tolist()
    stats = []
    for i in range(2):
        row_bytes = a2a[i].shape[-1] * a2a[i].element_size if a2a else 0
        msgs = [(s, r, int(t[i, s, r])) for s in range(W) for r in range(W)]
        stats.append(stats_of_messages(msgs, row_bytes, groups.topology))
    rows_all = int(t[0].sum())
    L = peer.moe.deepspeed_moe.num_local_experts
    capacity = int(t[0, me].max()) // L if W > 1 and L else None
    notes = {
        "peer": "deepspeed", "layer": "deepspeed.moe.layer.MoE", "version": deepspeed_version(),
        "routing": ("given routing (trace ids, weights 1/k) through its own top-k gating functions"
                    if peer.given_routing else "its TopKGate with our router's gate weights"),
        "capacity_per_expert": capacity,
        "routes": routes_all,  # (token, expert) pairs, all ranks: the rows a dropless layer must carry
        "all2all_rows_per_iteration": rows_all,  # dispatch, all ranks, own chunk included
        "padding_factor": rows_all / routes_all if routes_all else None,
        "all_to_all_forward": len(a2a), "all_to_all_backward": sum(c.op == "all_to_all_single" for c in bwd_calls),
        "all_to_all_backward_bytes_all_ranks": bwd_bytes,
        "all_reduce_forward_per_rank": n_reduce // W if W else 0,  # the dropless capacity (MAX)
        "all_reduce_bytes_all_ranks": reduce_bytes,
        "expert_rows_computed_per_rank": (capacity or 0) * W * L,
        "placement": "contiguous (rank r holds experts r*E/W .. (r+1)*E/W - 1)",
        "differs": ["pads every expert to the largest count on any rank (C), padding rows sent and computed",
                    "one all-reduce (MAX) of the capacity per forward",
                    "k copies per token (one per chosen expert), no dedup per rank or node",
                    "equal-split all_to_all_single of W x E_local x C rows per rank, dispatch and combine",
                    "contiguous placement only (a --plan applies to our rows)"],
    }
    return PeerTraffic(stats[0], stats[1], int(tokens_all), notes)


def deepspeed_version() -> str:
    import deepspeed
    return deepspeed.__version__
