"""Replica gradient sync: every copy of a replicated expert gets the sum of all copies' gradients.

With replicas (plan.replicas) the tokens of one expert are split over its copies, so each copy's
weight gradient holds only its share; the model's gradient is their sum. After backward (and
before the optimizer step) `ReplicaGradSync` adds them up: one packed all_reduce (SUM) per step
over the expert-parallel group, of a buffer with one row per replicated expert (its three weight
gradients flattened). A rank fills the rows of the experts it holds a copy of and leaves the rest
zero; afterwards every copy reads its row back, so copies see identical gradients and, stepped by
the same optimizer, stay bit-identical. A rank whose experts had no tokens this step (grad None)
gets a zero gradient tensor too, without looking at the values (no host sync): were it left None,
its optimizer would skip the step while another copy's (with momentum) moved, and they would drift.

Why one all_reduce over the whole EP group rather than one per expert over its holders: the
replicated experts' host sets differ (up to W*R of them), so per-expert groups would mean up to
W*R process groups and collectives per step in a fixed order on every rank; a reduce-scatter
would need the rows grouped by an owner and a second all-gather to return them. The packed
all_reduce is one collective of W*R rows at most, the same on every rank. Its cost (ring model,
NCCL's): each rank sends 2 (W-1)/W of the buffer; `bytes_per_step` reports the world total so a
user can weigh it against the token bytes the replicas save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.experts import GroupedExperts
from c2r_comm.dispatch.exchange_plan import CommStats
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class ReplicaGradSync:
    plan: PlacementPlan
    rank: int
    group: Any  # the expert-parallel process group
    topology: Topology  # classifies the sync's links (stats)

    @property
    def replicated_experts(self) -> tuple[int, ...]:
        return tuple(e for e, hosts in enumerate(self.plan.hosts_of_expert) if len(hosts) > 1)

    def bytes_per_step(self, hidden_size: int, ffn_size: int, element_size: int) -> int:
        """World total of the sync's bytes on the links per step (ring all_reduce model)."""
        return self.stats(hidden_size, ffn_size, element_size).bytes_off_rank

    def stats(self, hidden_size: int, ffn_size: int, element_size: int) -> CommStats:
        """The sync's traffic per optimizer step, by link class, under the ring all_reduce model (NCCL's):
        every rank sends 2 (W-1) chunks of buffer/W to the next rank of the ring 0 -> 1 -> ... -> W-1 -> 0.
        Rows are not counted (the buffer rows are expert gradients, not tokens)."""
        W, topo = self.plan.world_size, self.topology
        buffer = len(self.replicated_experts) * 3 * hidden_size * ffn_size * element_size
        if W == 1 or buffer == 0:
            return CommStats()
        per_link = 2 * (W - 1) * buffer // W
        cross = sum(not topo.same_node(r, (r + 1) % W) for r in range(W))
        return CommStats(bytes_same_node=per_link * (W - cross), bytes_cross_node=per_link * cross,
                         messages_same_node=2 * (W - 1) * (W - cross), messages_cross_node=2 * (W - 1) * cross)

    def __call__(self, experts: GroupedExperts) -> None:
        """Sum the replicated experts' gradients over their copies, in place (collective: every rank)."""
        replicated = self.replicated_experts
        if not replicated:
            return
        params = (experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD)
        row_of = {e: i for i, e in enumerate(replicated)}
        width = sum(p[0].numel() for p in params)
        ref = params[0]
        buf = torch.zeros(len(replicated), width, dtype=ref.dtype, device=ref.device)
        mine = [(slot, row_of[e]) for slot, e in enumerate(experts.global_ids) if e in row_of]
        for slot, row in mine:  # host loop over this rank's replicated slots (at most E/W + R)
            offset = 0
            for p in params:
                n = p[0].numel()
                if p.grad is not None:
                    buf[row, offset:offset + n] = p.grad[slot].reshape(-1)
                offset += n
        with guard(group_site("replica gradient sync", self.group)):
            dist.all_reduce(buf, group=self.group)
        for slot, row in mine:
            offset = 0
            for p in params:
                n = p[0].numel()
                part = buf[row, offset:offset + n].view_as(p[0])
                if p.grad is None:  # no local tokens this step: every copy still gets the (maybe zero) sum
                    p.grad = torch.zeros_like(p)
                p.grad[slot].copy_(part)
                offset += n
