"""One copy per (token, destination node) across nodes, then one copy per destination GPU inside it.

Stage A ("rail", cross node): the source sends each token once to every other node hosting one of
its experts, to its rail peer there (same local index), as one packed row: token, k weights and
a per-choice code (local GPU * L + slot on that node, -1 elsewhere). Only rail peers with rows
exchange messages (sparse P2P).
Stage B ("node"): the rail peer (forwarder) forwards the packed rows it received, and its own
tokens' rows for its own node, unchanged to each GPU of the node that hosts one of the token's
choices: one gather of byte rows and one all_to_all_single on the node group. The receiver keeps
the choices whose code names its own local index.
Every count of both stages is known after the one count exchange (a source tells its rail peer
how many rows it will forward to each GPU of that node), so stage B needs no second host sync.
Combine mirrors it: per-row weighted sums on the experts' GPU, the node all2all back, the
forwarder sums its node's partials per row, and one partial per (token, node) crosses back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import CommSite
from c2r_comm.counting import bucket_counts
from c2r_comm.dispatch.base import DispatchHandle, Dispatcher, ExpertBatch, Route, RouteStage
from c2r_comm.dispatch.comm import CountExchange, metadata_dtype
from c2r_comm.dispatch.dedup import expanded_grad_packer, grad_format, link_token_rows, token_format, weighted_partials
from c2r_comm.dispatch.exchange_plan import ExchangePlan, StageTraffic
from c2r_comm.dispatch.layout import (RankGeometry, distinct_counts, expert_offsets, group_rows,
                                      pairs_by_slot, valid_choices)
from c2r_comm.dispatch.pack import RowFormat
from c2r_comm.dispatch.row_sum import RowSum, csr_sum_available
from c2r_comm.dispatch.transport import Exchange, LinkTape, Pending, link
from c2r_comm.groups import ProcessGroups
from c2r_comm.plan import PlacementPlan


@dataclass(frozen=True)
class HierarchicalPlan(ExchangePlan):
    token_of_row_R: torch.Tensor  # int64 [T*K]: node rows, other nodes (rail-peer order) then own node
    code_RK: torch.Tensor  # [T*K, K] metadata_dtype: local GPU * L + slot on the row's node, -1 elsewhere
    row_format: RowFormat


@dataclass(frozen=True)
class HierarchicalHandle(DispatchHandle):
    pair_sum: RowSum  # expert rows into their stage B rows
    # stage B rows into one [T + arrivals] buffer: a row's partial lands on its own token (own
    # rows) or on T + its arrival index (rows that came over stage A)
    target_sum: RowSum
    cross_sum: RowSum  # stage A rows into their tokens


class HierarchicalDispatcher(Dispatcher):
    name = "hierarchical"

    def __init__(self, plan: PlacementPlan, groups: ProcessGroups, hidden_size: int, debug_checks: bool = False,
                 label: Optional[str] = None, equal_tokens: bool = False):
        topo = groups.topology
        super().__init__(plan, groups, hidden_size, debug_checks, label, equal_tokens)
        N = topo.nodes
        self.node_index, self.local_index = topo.node_of(self.rank), topo.local_index_of(self.rank)
        # Other nodes in rotated order (next node first), so this node's own rows sort last.
        self.rail_peers = tuple(topo.rank_of((self.node_index + 1 + i) % N, self.local_index) for i in range(N - 1))

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

    @staticmethod
    def layout_rank(geo: RankGeometry, x_TD, topk_idx_TK, topk_weight_TK, status, status_detail,
                    agree) -> HierarchicalPlan:
        topo, W, L, device, rank = geo.topology, geo.world_size, geo.num_local_experts, x_TD.device, geo.rank
        N, G = topo.nodes, topo.gpus_per_node
        my_node, my_local = topo.node_of(rank), topo.local_index_of(rank)
        T, K = topk_idx_TK.shape
        valid_TK, idx_TK = valid_choices(topk_idx_TK)
        rank_TK, slot_TK = geo.copies(idx_TK, valid_TK, by_node=True)
        node_TK = torch.div(rank_TK, G, rounding_mode="floor")
        # rotated: own node is group N-1
        rows = group_rows((node_TK - my_node - 1) % N, N, valid_TK, with_token_order=False)
        code_TK = (rank_TK % G) * L + slot_TK
        meta = metadata_dtype(G * L)
        code_RK = torch.where(rows.member_RK, code_TK.index_select(0, rows.token_of_row_R), -1).to(meta)
        fmt = token_format(x_TD, topk_weight_TK, meta)
        # Count exchange columns, per peer p: [0] stage A rows to p (p a rail peer; for p = this
        # rank: its own node's rows), [1:1+G] rows p forwards for us to each GPU of p's node,
        # [1+G] distinct (token, p) rows, [2+G:] (token, choice) pairs per slot of p.
        per_rank_W = distinct_counts(rank_TK, W, valid_TK)
        node_of_W = torch.div(torch.arange(W, device=device), G, rounding_mode="floor")
        is_rail_W = (torch.arange(W, device=device) % G == my_local) & (node_of_W != my_node)
        col_a = torch.where(is_rail_W, rows.counts_G[(node_of_W - my_node - 1) % N], 0)
        col_a[rank] = rows.counts_G[N - 1]
        counts_WC = torch.cat([col_a.unsqueeze(1), per_rank_W.reshape(N, G)[node_of_W],
                               per_rank_W.unsqueeze(1), bucket_counts(rank_TK * L + slot_TK, W * L, valid_TK).reshape(W, L)], 1)
        back_bytes = x_TD.shape[1] * x_TD.element_size()
        rail_rows = torch.where(is_rail_W, col_a, 0)
        forwarder_of_dest = tuple(topo.rank_of(topo.node_of(d), my_local) for d in range(W))
        stages = (StageTraffic("rail", (rank,) * W, rail_rows, fmt.row_bytes, back_bytes),
                  StageTraffic("node", forwarder_of_dest, per_rank_W, fmt.row_bytes, back_bytes))
        return HierarchicalPlan(HierarchicalDispatcher.name, rank, W, T, x_TD.shape[1], K, stages, counts_WC, status,
                                status_detail, agree, rows.token_of_row_R, code_RK, fmt)

    def _route(self, plan: HierarchicalPlan, counts: CountExchange, site: CommSite) -> Route:
        topo, G = self.topology, self.topology.gpus_per_node
        sent, recv = counts.sent_WC, counts.recv_WC
        ex_a = Exchange(self.groups.ep, self.rail_peers, tuple(sent[list(self.rail_peers), 0].tolist()),
                        tuple(recv[list(self.rail_peers), 0].tolist()), sparse=True,
                        reverse_group=self.groups.ep_reverse, site=site, stage="cross-node")
        node_ranks = topo.ranks_on_node(self.node_index)
        forwarded = recv[list(self.rail_peers), 1:1 + G].sum(0) if self.rail_peers else recv.new_zeros(G)  # host ints
        send_b = sent[node_ranks, 1 + G] + forwarded  # own rows for each GPU here + rail peers' rows
        # from forwarder i: the rows of every source on rail i that are meant for this rank
        recv_b = recv[:, 1 + G].reshape(topo.nodes, G).sum(0)
        ex_b = Exchange(self.groups.node, tuple(range(G)), tuple(send_b.tolist()), tuple(recv_b.tolist()),
                        sparse=False, site=site, stage="intra-node")
        a, b = plan.stages
        stages = (RouteStage(ex_a, self.rail_peers, a.dispatch_row_bytes, a.combine_row_bytes),
                  RouteStage(ex_b, tuple(node_ranks), b.dispatch_row_bytes, b.combine_row_bytes))
        return Route(plan, stages, tuple(recv[:, 2 + G:].sum(0).tolist()),
                     expert_offsets(counts.recv_device_WC[:, 2 + G:].sum(0)), counts)

    def _send(self, x_TD, topk_weight_TK, route: Route, tape: Optional[LinkTape]) -> Pending:
        plan: HierarchicalPlan = route.plan
        fmt, device, T = plan.row_format, x_TD.device, plan.num_tokens
        ex_a, ex_b = route.stages[0].exchange, route.stages[1].exchange
        r_cross, r_own = ex_a.rows_sent, int(route.counts.sent_WC[self.rank, 0])
        r_nodes, r_arrived = r_cross + r_own, ex_a.rows_received
        token_of_node_row = plan.token_of_row_R[:r_nodes]
        # One buffer: rows for other nodes (stage A sends), own node's rows, stage A arrivals.
        # Own rows + arrivals are contiguous: the "fan" rows stage B forwards from.
        buf_RB = fmt.empty(r_nodes + r_arrived, device)
        fmt.pack_into(buf_RB.narrow(0, 0, r_nodes), {"x": (x_TD, token_of_node_row),
                                                     "w": (topk_weight_TK, token_of_node_row),
                                                     "id": plan.code_RK[:r_nodes]})
        works = ex_a.start(buf_RB.narrow(0, 0, r_cross), buf_RB.narrow(0, r_nodes, r_arrived))
        token_of_cross, token_of_own = token_of_node_row[:r_cross], token_of_node_row[r_cross:]

        def finish() -> tuple[ExpertBatch, HierarchicalHandle]:
            arrived_RB = buf_RB.narrow(0, r_nodes, r_arrived)
            cross_sum = RowSum.build(token_of_cross, T, x_TD.dtype)
            arr_x, arr_w = link_token_rows(ex_a, fmt, arrived_RB, x_TD, topk_weight_TK, cross_sum, tape=tape)
            fan_RB = buf_RB.narrow(0, r_cross, r_own + r_arrived)
            code_FK = fmt.view(fan_RB, "id").long()
            L, G = self.num_local_experts, self.topology.gpus_per_node
            here = code_FK >= 0
            gpu_FK = torch.where(here, torch.div(code_FK, L, rounding_mode="floor"), 0)
            fan_of_row = group_rows(gpu_FK, G, valid_TK=here, with_token_order=False).token_of_row_R[:ex_b.rows_sent]
            send_RB = fan_RB.index_select(0, fan_of_row)  # forward packed rows unchanged
            recv_RB = fmt.empty(ex_b.rows_received, device)
            for work in ex_b.start(send_RB, recv_RB):
                work.wait()
            code_RK = fmt.view(recv_RB, "id").long()
            mine = (code_RK >= 0) & (torch.div(code_RK, L, rounding_mode="floor") == self.local_index)
            pairs = pairs_by_slot(torch.where(mine, code_RK % L, L), L, sum(route.tokens_per_expert),
                                  with_row_order=csr_sum_available(x_TD.device, x_TD.dtype))
            own_pad = torch.cat([token_of_own, token_of_own.new_zeros(1)])  # safe gather when no own rows
            target = torch.where(fan_of_row < r_own, own_pad[fan_of_row.clamp(max=r_own)], T + fan_of_row - r_own)
            target_sum = RowSum.build(target, T + r_arrived, x_TD.dtype)
            pair_sum = pairs.row_sum(x_TD.dtype)
            x_PD, recv_w = self._link_stage_b(ex_b, fmt, recv_RB, x_TD, topk_weight_TK, arr_x, arr_w, target_sum,
                                              pairs, pair_sum, tape)
            weight_P = recv_w.reshape(-1).index_select(0, pairs.choice_of_pair_P)
            handle = HierarchicalHandle(route, weight_P, self.rank, self.topology, pair_sum, target_sum, cross_sum)
            return ExpertBatch(x_PD, route.tokens_per_expert, route.offsets_E, weight_P), handle

        return Pending(works, finish, (buf_RB,))

    @staticmethod
    def _link_stage_b(ex_b, fmt, recv_RB, x_TD, topk_weight_TK, arr_x, arr_w, target_sum: RowSum, pairs, pair_sum,
                      tape: Optional[LinkTape]):
        """Stage B's received rows, expanded to expert inputs (x_PD) and weights, as a function of
        the fan rows' sources: this rank's own tokens (x_TD, topk_weight_TK) and the stage A
        arrivals (arr_x, arr_w). Backward adds each returned row into one [T + arrivals] buffer."""
        gfmt, T = grad_format(fmt), x_TD.shape[0]

        def scatter(back):
            gx, gw = target_sum.sum(gfmt.view(back, "x")), target_sum.sum(gfmt.view(back, "w"))
            return gx[:T], gw[:T], gx[T:], gw[T:]

        return link(ex_b, [fmt.view(recv_RB, "x").index_select(0, pairs.row_of_pair_P), fmt.view(recv_RB, "w")],
                    [x_TD, topk_weight_TK, arr_x, arr_w], expanded_grad_packer(gfmt, pair_sum), scatter, tape)

    def _combine_start(self, expert_out_PD, handle: HierarchicalHandle, weighted: bool,
                       tape: Optional[LinkTape]) -> Pending:
        ex_a = handle.route.stages[0].exchange.reversed()
        ex_b = handle.route.stages[1].exchange.reversed()
        D, T = handle.hidden_size, handle.num_tokens
        partial_RD = weighted_partials(expert_out_PD, None if weighted else handle.combine_weight, handle.pair_sum)
        send_RD = partial_RD.detach()
        recv_RD = send_RD.new_empty(ex_b.rows_received, D)
        works = ex_b.start(send_RD, recv_RD)

        def finish() -> Pending[torch.Tensor]:
            (back_b,) = link(ex_b, [recv_RD], [partial_RD], lambda g: g[0], lambda back: (back,), tape)
            # The forwarder sums its node's partials per fan row: own rows straight into their
            # token, arrivals into one partial per (token, source node) to send back over stage A.
            # (ex_a is reversed: it sends back one row per stage A arrival)
            sums = handle.target_sum(back_b)  # [T + stage A arrivals]
            cross_FD = sums[T:]
            send_a = cross_FD.detach().contiguous()
            recv_a = send_a.new_empty(ex_a.rows_received, D)
            works_a = ex_a.start(send_a, recv_a)  # the cross-node return, in flight until waited on

            def finish_a() -> torch.Tensor:
                (back_a,) = link(ex_a, [recv_a], [cross_FD], lambda g: g[0], lambda back: (back,), tape)
                return sums[:T] + handle.cross_sum(back_a)

            return Pending(works_a, finish_a, (send_a, recv_a))

        return Pending(works, finish, (send_RD, recv_RD), then=True)
