"""One copy per (token, destination node) across nodes, then one copy per destination GPU inside it.

Stage A (cross node): the source sends each token once to every other node hosting one of its
experts, to its rail peer there (same local index), with a per-choice code saying which local
GPU and slot needs it. Only rail peers with rows exchange messages (sparse P2P).
Stage B (inside the node): the rail peer ("forwarder") fans the rows it received, plus its own
tokens' rows for its own node, out to the node's GPUs with one all_to_all_single on the node
group, one row per (token, destination GPU), exactly like the flat dedup dispatcher.
Combine mirrors it: per-row weighted sums on the experts' GPU, the node all2all back, the
forwarder sums its node's partials per row, and one partial per (token, node) crosses back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from c2r_comm.dispatch.base import (CommStats, DispatchHandle, Dispatcher, ExpertBatch,
                                    stats_from_splits)
from c2r_comm.dispatch.comm import (all_to_all, all_to_all_plain, as_bytes, exchange_counts, from_bytes,
                                    metadata_dtype)
from c2r_comm.dispatch.layout import expand_to_slots, group_layout
from c2r_comm.dispatch.p2p import messages_sent, sparse_exchange
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import ProcessGroups


@dataclass(frozen=True)
class HierarchicalHandle(DispatchHandle):
    rail_peers: tuple[int, ...]  # ep ranks of this rank's rail peers on the other nodes (node order)
    cross_send_counts: tuple[int, ...]  # stage A rows to each rail peer
    cross_recv_counts: tuple[int, ...]  # stage A rows from each rail peer
    cross_messages_to: tuple[int, ...]  # rail peers stage A actually messaged (non-zero count)
    node_send_splits: tuple[int, ...]  # stage B rows to each GPU of the node (by local index)
    node_recv_splits: tuple[int, ...]  # stage B rows from each GPU of the node
    token_of_own_R: torch.Tensor  # own tokens' rows for this node = first fan rows
    token_of_cross_R: torch.Tensor  # source token of each stage A row (send order)
    fan_of_row_R: torch.Tensor  # fan row (own rows, then stage A arrivals) of each stage B row
    row_of_pair_P: torch.Tensor  # stage B received row of each expert input row
    weight_of_pair_P: torch.Tensor  # routing weight of each expert input row (differentiable)


class HierarchicalDispatcher(Dispatcher):
    name = "hierarchical"

    def __init__(self, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int):
        topo = groups.topology
        super().__init__(plan, groups, hidden_size)
        self.node_index, self.local_index = topo.node_of(self.rank), topo.local_index_of(self.rank)
        self.node_ranks = tuple(topo.ranks_on_node(self.node_index))
        self.rail_peers = tuple(topo.rank_of(n, self.local_index) for n in range(topo.nodes) if n != self.node_index)
        self._code_group: dict[torch.device, torch.Tensor] = {}

    def _setup_problem(self, plan: PlacementPlan, groups: ProcessGroups) -> Optional[str]:
        problem = super()._setup_problem(plan, groups)
        if problem is None:
            topo, node = groups.topology, groups.node
            # A node group that does not match the topology would scramble stage B silently.
            if dist.get_world_size(node) != topo.gpus_per_node or \
                    dist.get_rank(node) != topo.local_index_of(dist.get_rank(groups.ep)):
                problem = (f"node process group (size {dist.get_world_size(node)}, rank {dist.get_rank(node)}) does "
                           f"not match topology {topo} for ep rank {dist.get_rank(groups.ep)}; build the groups "
                           "with build_process_groups")
        return problem

    def _group_of_code(self, device: torch.device) -> torch.Tensor:
        """Stage B grouping of a choice code + 1: 0 (not on this node) -> dummy group G, else its GPU."""
        if device not in self._code_group:
            G, L = self.topology.gpus_per_node, self.num_local_experts
            self._code_group[device] = torch.cat([torch.tensor([G]), torch.arange(G * L) // L]).to(device)
        return self._code_group[device]

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        status, detail = self._check(x_TD, topk_idx_TK, topk_weight_TK)
        device, W, L, topo = x_TD.device, self.world_size, self.num_local_experts, self.topology
        N, G, me_node = topo.nodes, topo.gpus_per_node, self.node_index
        counts_W2 = torch.zeros(W, 2, dtype=torch.int64, device=device)
        if status == 0:
            e2r, e2s = self.expert_maps(device)
            nodes = group_layout(topk_idx_TK, torch.div(e2r, G, rounding_mode="floor"), N)  # (token, node) rows
            # Column 0: stage A rows to each rail peer; column 1: distinct (token, GPU) pairs, which
            # the destination sums over its forwarders' rails to know its stage B receive splits.
            counts_W2[list(self.rail_peers), 0] = nodes.counts_G[[topo.node_of(p) for p in self.rail_peers]]
            counts_W2[:, 1] = group_layout(topk_idx_TK, e2r, W).counts_G
        recv_W2 = exchange_counts(counts_W2, status, self.groups.ep, detail,  # raises on bad input everywhere
                                 agree=self.agreed_values(x_TD, topk_idx_TK, topk_weight_TK))

        # Per-choice code on its node: local GPU * L + slot; -1 for choices on other nodes.
        idx = topk_idx_TK.long()
        code_TK = ((e2r % G) * L + e2s)[idx]
        meta = metadata_dtype(G * L)
        code_RK = torch.where(nodes.member_RK, code_TK.index_select(0, nodes.token_of_row_R), -1).to(meta)
        weight_RK = topk_weight_TK.index_select(0, nodes.token_of_row_R) * nodes.member_RK
        own = (nodes.group_of_row_R == me_node).nonzero(as_tuple=True)[0]
        cross = (nodes.group_of_row_R != me_node).nonzero(as_tuple=True)[0]  # node order = rail peer order
        token_of_own = nodes.token_of_row_R.index_select(0, own)
        token_of_cross = nodes.token_of_row_R.index_select(0, cross)

        # Stage A: one copy per (token, remote node) to the rail peer there.
        send_A = counts_W2[list(self.rail_peers), 0].tolist()
        recv_A = recv_W2[list(self.rail_peers), 0].tolist()
        recv_x, recv_w, recv_code = sparse_exchange(
            [x_TD.index_select(0, token_of_cross), weight_RK.index_select(0, cross),
             as_bytes(code_RK.index_select(0, cross))], send_A, recv_A, self.rail_peers, self.groups.ep)
        recv_code = from_bytes(recv_code, meta)

        # Stage B: fan rows (own rows for this node, then arrivals) -> one row per destination GPU.
        fan_x = torch.cat([x_TD.index_select(0, token_of_own), recv_x])
        fan_w = torch.cat([weight_RK.index_select(0, own), recv_w])
        fan_code = torch.cat([code_RK.index_select(0, own), recv_code])
        gpus = group_layout(fan_code.long() + 1, self._group_of_code(device), G + 1)
        rows_B = int(gpus.counts_G[:G].sum())  # dummy-group rows (choices elsewhere) sort last: drop them
        fan_of_row, member_RK = gpus.token_of_row_R[:rows_B], gpus.member_RK[:rows_B]
        slot_RK = torch.where(member_RK, fan_code.index_select(0, fan_of_row) % L, -1).to(meta)
        weight_B = fan_w.index_select(0, fan_of_row) * member_RK
        send_B = gpus.counts_G[:G].tolist()
        recv_B = recv_W2[:, 1].reshape(N, G).sum(0).tolist()  # from forwarder i: sources on rail i
        recv_slot = from_bytes(all_to_all_plain(as_bytes(slot_RK), recv_B, send_B, self.groups.node), meta)
        recv_xb, recv_wb = all_to_all([fan_x.index_select(0, fan_of_row), weight_B], recv_B, send_B, self.groups.node)
        expansion = expand_to_slots(recv_slot, L)

        K = topk_idx_TK.shape[1]
        x_bytes = x_TD.shape[1] * x_TD.element_size()
        meta_bytes = K * (code_RK.element_size() + weight_RK.element_size())
        handle = HierarchicalHandle(
            num_tokens=x_TD.shape[0], hidden_size=x_TD.shape[1], tokens_per_expert=expansion.tokens_per_expert,
            dispatch_stats=self._stats(send_A, send_B, x_bytes + meta_bytes),
            combine_stats=self._stats(recv_A, recv_B, x_bytes),
            rail_peers=self.rail_peers, cross_send_counts=tuple(send_A), cross_recv_counts=tuple(recv_A),
            cross_messages_to=messages_sent(send_A, self.rail_peers),
            node_send_splits=tuple(send_B), node_recv_splits=tuple(recv_B),
            token_of_own_R=token_of_own, token_of_cross_R=token_of_cross, fan_of_row_R=fan_of_row,
            row_of_pair_P=expansion.row_of_pair_P,
            weight_of_pair_P=recv_wb.reshape(-1).index_select(0, expansion.choice_of_pair_P))
        return ExpertBatch(recv_xb.index_select(0, expansion.row_of_pair_P), expansion.tokens_per_expert), handle

    def combine(self, expert_out_PD, handle: HierarchicalHandle):
        self.check_combine(expert_out_PD, handle)
        D = handle.hidden_size
        weighted = expert_out_PD * handle.weight_of_pair_P.to(expert_out_PD.dtype).unsqueeze(1)
        # One partial per stage B row, i.e. per (token, forwarding GPU), back inside the node.
        partial = expert_out_PD.new_zeros(sum(handle.node_recv_splits), D).index_add(0, handle.row_of_pair_P, weighted)
        (back_B,) = all_to_all([partial], handle.node_send_splits, handle.node_recv_splits, self.groups.node)
        # The forwarder sums its node's partials per fan row: one per (token, source node).
        num_own = handle.token_of_own_R.shape[0]
        fan = expert_out_PD.new_zeros(num_own + sum(handle.cross_recv_counts), D)
        fan = fan.index_add(0, handle.fan_of_row_R, back_B)
        (back_A,) = sparse_exchange([fan[num_own:]], handle.cross_recv_counts, handle.cross_send_counts,
                                    handle.rail_peers, self.groups.ep)
        out = expert_out_PD.new_zeros(handle.num_tokens, D).index_add(0, handle.token_of_own_R, fan[:num_own])
        return out.index_add(0, handle.token_of_cross_R, back_A)

    def _stats(self, cross_counts: list[int], node_splits: list[int], bytes_per_row: int) -> CommStats:
        """Stage A counts per rail peer plus stage B splits per node GPU, classified by link."""
        return (stats_from_splits(cross_counts, bytes_per_row, self.rank, self.topology, peers=self.rail_peers)
                + stats_from_splits(node_splits, bytes_per_row, self.rank, self.topology, peers=self.node_ranks))
