"""Replica gradient sync: every copy of a replicated expert gets the sum of all copies' gradients.

With replicas (plan.replicas) the tokens of one expert are split over its copies, so each copy's
weight gradient holds only its share; the model's gradient is their sum. After backward (and
before the optimizer step) `ReplicaGradSync` adds them up among each expert's holders only, in two
sparse point-to-point exchanges over the expert-parallel group (dispatch/transport.Exchange, the
dispatchers' own; on gloo each direction of a pair on its own connection):
1. gather: every non-primary copy sends its gradient (one row: the three weight gradients
   flattened) to the expert's primary rank (plan.hosts_of_expert[e][0]), which sums them with its own;
2. return: the primary sends the sum back to every copy.
Rows to one peer travel as one message, ordered by expert id on both sides. Every copy then holds
the same sum and, stepped by the same optimizer, stays bit-identical. A rank whose experts had no
tokens this step (grad None) gets a zero gradient tensor too, without looking at the values (no
host sync): were it left None, its optimizer would skip the step while another copy moved.

Bytes: 2 x (copies - 1) x expert gradient per replicated expert, on the links between its holders
only. The previous design, one packed all_reduce over the whole EP group of a buffer with a row per
replicated expert, moved 2 (W-1)/W of the buffer per rank (ring): 2 (W-1) x replicated experts x
expert gradient in all, (W-1) / (copies-1) times more (7x at W = 8, R = 1), over every link.
`stats` reports the sync's bytes and messages per link class so a user can weigh them against the
token bytes the replicas save.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch

from c2r_comm.comm_failures import CommSite
from c2r_comm.dispatch.exchange_plan import CommStats, stats_of_messages
from c2r_comm.dispatch.transport import Exchange
from c2r_comm.experts import GroupedExperts
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology


@dataclass(frozen=True)
class SyncRoute:
    """This rank's side of the sync, fixed by the plan (host ints, computed once)."""

    peers: tuple[int, ...]  # EP ranks this rank exchanges gradients with, ascending
    send_experts: tuple[int, ...]  # gather: the experts whose copy this rank sends, grouped by peer (peers order)
    send_counts: tuple[int, ...]  # per peer
    recv_experts: tuple[int, ...]  # gather: the copies this rank (their primary) receives, grouped by peer
    recv_counts: tuple[int, ...]
    primary_experts: tuple[int, ...]  # replicated experts whose primary is this rank (sums kept here)

    @classmethod
    def of(cls, plan: PlacementPlan, rank: int) -> "SyncRoute":
        sends, recvs = [], []  # (peer, expert)
        for e, hosts in enumerate(plan.hosts_of_expert):
            if len(hosts) < 2:
                continue
            if rank in hosts[1:]:
                sends.append((hosts[0], e))
            if hosts[0] == rank:
                recvs.extend((h, e) for h in hosts[1:])
        sends.sort()
        recvs.sort()
        peers = tuple(sorted({p for p, _ in sends} | {p for p, _ in recvs}))
        count = lambda pairs: tuple(sum(1 for q, _ in pairs if q == p) for p in peers)  # noqa: E731
        primaries = tuple(e for e, hosts in enumerate(plan.hosts_of_expert) if len(hosts) > 1 and hosts[0] == rank)
        return cls(peers, tuple(e for _, e in sends), count(sends), tuple(e for _, e in recvs), count(recvs),
                   primaries)


@dataclass(frozen=True)
class ReplicaGradSync:
    plan: PlacementPlan
    rank: int
    group: Any  # the expert-parallel process group
    topology: Topology  # classifies the sync's links (stats)
    reverse_group: Any = None  # groups.ep_reverse (gloo: the second direction of each pair)

    @functools.cached_property
    def route(self) -> SyncRoute:
        return SyncRoute.of(self.plan, self.rank)

    def bytes_per_step(self, hidden_size: int, ffn_size: int, element_size: int) -> int:
        """World total of the sync's bytes on the links per optimizer step."""
        return self.stats(hidden_size, ffn_size, element_size).bytes_off_rank

    def stats(self, hidden_size: int, ffn_size: int, element_size: int) -> CommStats:
        """The sync's traffic per optimizer step over the whole world, by link class: for every
        replicated expert, each non-primary copy's gradient to the primary and the sum back (one
        message per (sender, receiver) pair and trip). Rows are not counted (they are expert
        gradients, not tokens)."""
        row = 3 * hidden_size * ffn_size * element_size
        gather: dict[tuple[int, int], int] = {}  # (copy's rank, primary) -> rows; the return trip mirrors it
        for hosts in self.plan.hosts_of_expert:
            for h in hosts[1:]:
                gather[(h, hosts[0])] = gather.get((h, hosts[0]), 0) + 1
        stats = (stats_of_messages(((s, r, n) for (s, r), n in gather.items()), row, self.topology)
                 + stats_of_messages(((r, s, n) for (s, r), n in gather.items()), row, self.topology))
        return replace(stats, rows_local=0, rows_same_node=0, rows_cross_node=0)

    def _indices(self, global_ids: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The sync's index tensors on `device`, built once (a host->device copy per call would stall a
        GPU stream): local slots of the rows sent and of the primaries' sums, and per gather peer the
        sums' rows its received rows add to."""
        key = (global_ids, device)
        if key not in self._index_cache:
            route, slot_of = self.route, {e: slot for slot, e in enumerate(global_ids)}
            primary_row = {e: i for i, e in enumerate(route.primary_experts)}
            tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
            sum_row = [primary_row[e] for e in route.recv_experts]
            self._index_cache[key] = {
                "send_slots": tensor([slot_of[e] for e in route.send_experts]),
                "primary_slots": tensor([slot_of[e] for e in route.primary_experts]),
                "sum_row": tensor(sum_row),
            }
        return self._index_cache[key]

    @functools.cached_property
    def _index_cache(self) -> dict:
        return {}

    def __call__(self, experts: GroupedExperts) -> None:
        """Sum the replicated experts' gradients over their copies, in place (collective: every rank)."""
        route = self.route
        if not (route.send_experts or route.primary_experts):  # no copy here: nothing to send or receive
            return
        params = (experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD)
        ref = params[0]
        idx = self._indices(experts.global_ids, ref.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

        def rows(slots: torch.Tensor) -> torch.Tensor:  # [n, 3 D F]: each expert's flat gradients
            return torch.cat([g.index_select(0, slots).flatten(1) for g in grads], dim=1)

        site = CommSite(phase="replica gradient sync", group=self.group)
        gather = Exchange(self.group, route.peers, route.send_counts, route.recv_counts, True, self.reverse_group,
                          site, "gather")
        received = ref.new_empty(len(route.recv_experts), sum(p[0].numel() for p in params))
        gather.run(rows(idx["send_slots"]), received)
        # Sums at the primaries: own gradient, then each peer's rows in peer order (within one peer's
        # block every expert occurs once, so each index_add_ has distinct indices: a fixed order of
        # additions on every device, no atomics).
        sums = rows(idx["primary_slots"])
        start = 0
        for n in route.recv_counts:  # host loop over peers (at most W)
            sums.index_add_(0, idx["sum_row"][start:start + n], received[start:start + n])
            start += n
        back = Exchange(self.group, route.peers, route.recv_counts, route.send_counts, True, self.reverse_group,
                        site, "return")
        totals = back.run(sums.index_select(0, idx["sum_row"]))  # rows in send_experts order
        for slots, values in ((idx["primary_slots"], sums), (idx["send_slots"], totals)):
            offset = 0
            for p, g in zip(params, grads):
                n = p[0].numel()
                g.index_copy_(0, slots, values[:, offset:offset + n].reshape((len(slots),) + tuple(p.shape[1:])))
                offset += n
        for p, g in zip(params, grads):
            p.grad = g
