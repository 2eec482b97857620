"""Sparse point-to-point exchange: rows go only to peers with a non-zero count (no empty messages).

The hierarchical dispatcher uses it across nodes, between rail peers. Both sides know every
count beforehand (from the count exchange), so each rank posts exactly the sends and receives
that match its peers' and no rank waits on a message that never comes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def _exchange(tensors: Sequence[torch.Tensor], send_counts: Sequence[int], recv_counts: Sequence[int],
              peers: Sequence[int], group: Any) -> tuple[torch.Tensor, ...]:
    """Rows of each tensor, in peer blocks of send_counts, to `peers` (group ranks); returns the
    received rows in peer blocks of recv_counts. Only non-empty messages are posted."""
    outs = [t.new_empty((sum(recv_counts),) + tuple(t.shape[1:])) for t in tensors]
    ins = [t.contiguous() for t in tensors]
    ops, s_off, r_off = [], 0, 0
    for group_peer, ns, nr in zip(peers, send_counts, recv_counts):
        peer = dist.get_global_rank(group, group_peer)  # P2POp's `peer` is global on every torch >= 2.4
        # One tag per tensor keeps several messages to the same peer matched on any backend.
        for tag, (t, o) in enumerate(zip(ins, outs)):
            if ns:
                ops.append(dist.P2POp(dist.isend, t.narrow(0, s_off, ns), peer, group=group, tag=tag))
            if nr:
                ops.append(dist.P2POp(dist.irecv, o.narrow(0, r_off, nr), peer, group=group, tag=tag))
        s_off, r_off = s_off + ns, r_off + nr
    if ops:  # batch_isend_irecv refuses an empty list; a rank with nothing to do skips it
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return tuple(outs)


class _SparseExchange(torch.autograd.Function):
    """Forward: the exchange; backward: the reverse exchange (counts swapped) of the gradients.

    All tensors travel in one Function so forward and backward post the same messages in the
    same order on every rank. Integer tensors (metadata) get no gradient and are not sent back;
    the rule depends only on dtypes, which are the same on every rank.
    """

    @staticmethod
    def forward(ctx, send_counts, recv_counts, peers, group, *tensors):
        ctx.send_counts, ctx.recv_counts, ctx.peers, ctx.group = send_counts, recv_counts, peers, group
        ctx.float_mask = tuple(t.is_floating_point() for t in tensors)
        outs = _exchange(tensors, send_counts, recv_counts, peers, group)
        # Shapes only (not the tensors), to build zero gradients for outputs autograd leaves None.
        ctx.out_meta = tuple((tuple(o.shape), o.dtype, o.device) for o in outs)
        ctx.mark_non_differentiable(*(o for o, f in zip(outs, ctx.float_mask) if not f))
        return outs

    @staticmethod
    def backward(ctx, *grads):
        floats = [g if g is not None else torch.zeros(shape, dtype=dtype, device=dev)
                  for g, f, (shape, dtype, dev) in zip(grads, ctx.float_mask, ctx.out_meta) if f]
        back = iter(_exchange(floats, ctx.recv_counts, ctx.send_counts, ctx.peers, ctx.group))
        return (None, None, None, None, *(next(back) if f else None for f in ctx.float_mask))


def sparse_exchange(tensors: Sequence[torch.Tensor], send_counts: Sequence[int], recv_counts: Sequence[int],
                    peers: Sequence[int], group: Any) -> tuple[torch.Tensor, ...]:
    """Differentiable sparse exchange of several tensors with the same row counts per peer.

    send_counts[i] rows (consecutive, in peer order) go to group rank peers[i]; recv_counts[i]
    rows come from it. Float tensors get the reverse exchange as their backward.
    """
    if len(send_counts) != len(peers) or len(recv_counts) != len(peers):
        raise ValueError(f"need one send and one recv count per peer: {len(peers)} peers, "
                         f"{len(send_counts)} send, {len(recv_counts)} recv counts")
    return _SparseExchange.apply(tuple(send_counts), tuple(recv_counts), tuple(peers), group, *tensors)


def messages_sent(send_counts: Sequence[int], peers: Sequence[int]) -> tuple[int, ...]:
    """The peers a sparse exchange actually messages (those with a non-zero count)."""
    return tuple(p for p, n in zip(peers, send_counts) if n)
