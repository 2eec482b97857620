"""Hierarchical dispatcher on real gloo ranks: reference results, link accounting, sparse messages, errors.

Each spawn runs many cases (process start-up dominates on 2 cores). Every P2P op the dispatcher
posts is recorded in the ranks, so the message checks use what was actually sent.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from moe_cases import Case, make_plan, rank_inputs, run_case_on_rank
from ranks import run_ranks

from c2r_comm.dispatch import HierarchicalDispatcher, InputError
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import ProcessGroups, build_process_groups
from c2r_comm.topology import Topology

TOL = 1e-10  # float64 end to end


# ---- rank side --------------------------------------------------------------------------------
def _run_recording(rank: int, case: Case) -> dict:
    """run_case_on_rank, recording every batch_isend_irecv op: (is_send, peer, rows)."""
    ops_seen, groups_seen, orig = [], [], dist.batch_isend_irecv

    def recording(ops):
        ops_seen.extend((op.op is dist.isend, op.peer, op.tensor.shape[0]) for op in ops)
        # gloo direction groups: True where the op went on the EP group itself (WORLD here)
        groups_seen.extend((op.op is dist.isend, op.peer, op.group in (None, dist.group.WORLD)) for op in ops)
        return orig(ops)

    dist.batch_isend_irecv = recording
    try:
        res = run_case_on_rank(rank, case)
    finally:
        dist.batch_isend_irecv = orig
    res["p2p"] = ops_seen
    res["p2p_groups"] = groups_seen
    return res


def _error_checks(rank: int) -> dict[str, str]:
    """Bad plan / topology / groups on the odd ranks only: every rank raises (no rank is left waiting
    in the constructor's agreement step), and the odd ranks say what is wrong."""
    groups = build_process_groups(Topology(2, 2), timeout_s=60)
    out: dict[str, str] = {}
    bad = {
        "plan_world": lambda: HierarchicalDispatcher(PlacementPlan.contiguous(8, 8), groups, 8),
        "topo_world": lambda: HierarchicalDispatcher(
            PlacementPlan.contiguous(8, 4), ProcessGroups(Topology(4, 2), rank, groups.ep, groups.node, groups.rail,
                                                          groups.timeout), 8),
        "node_group": lambda: HierarchicalDispatcher(
            PlacementPlan.contiguous(8, 4), ProcessGroups(Topology(1, 4), rank, groups.ep, groups.node, groups.rail,
                                                          groups.timeout), 8),
    }
    for name, make in bad.items():
        try:
            make() if rank % 2 else HierarchicalDispatcher(PlacementPlan.contiguous(8, 4), groups, 8)
            out[name] = "no error"
        except InputError as exc:
            out[name] = str(exc)
    dist.barrier()
    disp = HierarchicalDispatcher(PlacementPlan.contiguous(8, 4), groups, 8)
    idx = torch.zeros(3, 2, dtype=torch.int64)
    if rank == 2:
        idx[0, 0] = 99  # bad on one rank only: every rank must raise
    try:
        disp.dispatch(torch.randn(3, 8), idx, torch.rand(3, 2))
        out["bad_input"] = "no error"
    except InputError as exc:
        out["bad_input"] = str(exc)
    return out


def worker(rank: int, world: int, cases: list[Case], error_checks: bool) -> dict:
    results = []
    for case in cases:
        assert case.world == world
        results.append(_run_recording(rank, case))
        dist.barrier()
    return {"cases": results, "errors": _error_checks(rank) if error_checks else None}


# ---- independent counts (plain Python over the same inputs) -----------------------------------
def _dest_ranks(case: Case, rank: int) -> list[set[int]]:
    """Per token of `rank`: the set of ranks hosting its experts."""
    plan = make_plan(case)
    return [{plan.expert_to_rank[e] for e in row} for row in rank_inputs(case, rank)[1].tolist()]


def expected(case: Case, rank: int) -> dict[str, int]:
    topo = Topology(case.nodes, case.gpus_per_node)
    node, local = topo.node_of(rank), topo.local_index_of(rank)
    dests = {s: _dest_ranks(case, s) for s in range(case.world)}
    rail = [s for s in topo.rail_ranks(local) if s != rank]  # same local index, other nodes
    my_nodes = [{topo.node_of(d) for d in ds} - {node} for ds in dests[rank]]
    fan = [ds for s in topo.rail_ranks(local) for ds in dests[s]]  # tokens this rank forwards in its node
    into = lambda s: sum(any(topo.node_of(d) == node for d in ds) for ds in dests[s])  # noqa: E731
    return {
        "cross_rows": sum(len(n) for n in my_nodes),  # distinct (token, remote node)
        "cross_msgs": len(set().union(*my_nodes)),
        "same_rows": sum(sum(topo.node_of(d) == node and d != rank for d in ds) for ds in fan),
        "local_rows": sum(rank in ds for ds in fan),
        "cross_rows_in": sum(into(s) for s in rail),
        "cross_msgs_in": sum(into(s) > 0 for s in rail),
        # stage B rows arriving here from the other GPUs of the node (their rails' tokens for me)
        "same_rows_in": sum(rank in ds for f in topo.ranks_on_node(node) if f != rank
                            for s in topo.rail_ranks(topo.local_index_of(f)) for ds in dests[s]),
        "rows_to_node": {topo.node_of(p): sum(topo.node_of(p) in n for n in my_nodes) for p in rail},
        "rows_from_node": {topo.node_of(p): into(p) for p in rail},
    }


# ---- checks -----------------------------------------------------------------------------------
def _check_reference(cases, by_rank):
    for rank, out in enumerate(by_rank):
        for case, res in zip(cases, out["cases"]):
            bad = {k: v for k, v in res["err"].items() if not v <= TOL}
            assert not bad, f"rank {rank} {case}: {bad}"


def _check_accounting(cases, by_rank):
    for i, case in enumerate(cases):
        if case.dispatcher != "hierarchical":
            continue
        topo = Topology(case.nodes, case.gpus_per_node)
        for rank, out in enumerate(by_rank):
            res, exp = out["cases"][i], expected(case, rank)
            d, c = res["dispatch_stats"], res["combine_stats"]
            where = f"rank {rank} {case}"
            assert (d.rows_cross_node, d.rows_same_node, d.rows_local) == \
                (exp["cross_rows"], exp["same_rows"], exp["local_rows"]), where
            assert (c.rows_cross_node, c.rows_same_node, c.rows_local) == \
                (exp["cross_rows_in"], exp["same_rows_in"], exp["local_rows"]), where
            assert d.messages_cross_node == exp["cross_msgs"] and c.messages_cross_node == exp["cross_msgs_in"], where
            assert sum(res["tokens_per_expert"]) >= d.rows_local  # every kept row feeds >= 1 expert
            # What was actually posted: no empty message, only rail peers on other nodes, and per
            # peer the expected messages, each with the expected rows: token, weights and codes
            # travel packed, so one message per direction and pass (dispatch + combine-backward
            # as source; combine + dispatch-backward as forwarder).
            ops = res["p2p"]
            assert all(rows > 0 for _, _, rows in ops), f"{where}: empty P2P message {ops}"
            assert all(not topo.same_node(p, rank) and topo.local_index_of(p) == topo.local_index_of(rank)
                       for _, p, _ in ops), f"{where}: P2P to a non-rail peer {ops}"
            # gloo: each direction of a pair on its own group (connection): sends to a higher rank
            # and receives from a lower one on the EP group, the others on its reverse group.
            for is_send, p, on_ep in res["p2p_groups"]:
                assert on_ep == ((p > rank) if is_send else (p < rank)), (where, is_send, p, on_ep)
            for p in topo.rail_ranks(topo.local_index_of(rank)):
                if p == rank:
                    continue
                n_to, n_from = exp["rows_to_node"][topo.node_of(p)], exp["rows_from_node"][topo.node_of(p)]
                sends = sorted(r for s, q, r in ops if s and q == p)
                recvs = sorted(r for s, q, r in ops if not s and q == p)
                assert sends == sorted([n_to] * 2 * (n_to > 0) + [n_from] * 2 * (n_from > 0)), (where, p, ops)
                assert recvs == sorted([n_from] * 2 * (n_from > 0) + [n_to] * 2 * (n_to > 0)), (where, p, ops)


def _spawn(world, cases, error_checks=False):
    by_rank = run_ranks(world, worker, cases, error_checks, timeout_s=90)
    _check_reference(cases, by_rank)
    _check_accounting(cases, by_rank)
    return by_rank


def test_four_ranks_2x2_1x4_4x1_and_errors():
    H = "hierarchical"
    cases = [Case(H, nodes=2, gpus_per_node=2, plan=p, top_k=3, tokens=(9, 7, 8, 6)) for p in ("contiguous", "random")]
    cases += [
        # node 1 hosts none of the used experts (receives nothing) and ranks without tokens
        Case(H, nodes=2, gpus_per_node=2, routing="subset", tokens=(0, 5, 0, 4)),
        Case(H, nodes=2, gpus_per_node=2, plan="random", tokens=(0, 0, 5, 4), seed=3),  # a node sends nothing
        Case(H, nodes=2, gpus_per_node=2, routing="single", top_k=1),
        Case(H, nodes=2, gpus_per_node=2, top_k=8, plan="random"),  # every token everywhere
    ]
    # 1 node behaves like dedup; 1 GPU per node like dedup across nodes (same rows, bytes, messages).
    twins = [dict(nodes=1, gpus_per_node=4, top_k=3, plan="random"),
             dict(nodes=4, gpus_per_node=1, top_k=3, plan="random")]
    for kw in twins:
        cases += [Case(H, **kw), Case("dedup", **kw)]
    by_rank = _spawn(4, cases, error_checks=True)

    for rank, out in enumerate(by_rank):
        for j in range(len(cases) - 2 * len(twins), len(cases), 2):
            h, dd = out["cases"][j], out["cases"][j + 1]
            # rows_local differs at 1 GPU per node: forwarded rows land on the forwarder itself (a
            # local copy after their cross-node hop); every link count must match.
            for key in ("dispatch_stats", "combine_stats"):
                assert h[key].as_tuple()[1:] == dd[key].as_tuple()[1:], (rank, cases[j], key)
                assert cases[j].nodes > 1 or h[key] == dd[key], (rank, cases[j], key)
            assert h["tokens_per_expert"] == dd["tokens_per_expert"], (rank, cases[j])
        err = out["errors"]
        assert "rank 2: expert ids out of range" in err["bad_input"], (rank, err)
        for name in ("plan_world", "topo_world", "node_group"):
            assert "ranks [1, 3] found a problem" in err[name], (rank, err)
        if rank % 2:
            assert "8 experts on 8 ranks" in err["plan_world"] and "on 4 ranks" in err["plan_world"], err
            assert "topology 4x2 needs world size" in err["topo_world"], err
            assert "node process group" in err["node_group"] and "1x4" in err["node_group"], err


def test_eight_ranks_2x4_and_4x2():
    H = "hierarchical"
    zero = (7, 0, 5, 3, 6, 6, 1, 4)
    cases = [Case(H, nodes=2, gpus_per_node=4, num_experts=16, top_k=4, plan=p, tokens=zero)
             for p in ("contiguous", "random")]
    cases += [Case(H, nodes=2, gpus_per_node=4, num_experts=16, top_k=2, routing="subset",
                   tokens=(5, 0, 0, 3, 0, 0, 0, 0)),
              Case(H, nodes=4, gpus_per_node=2, num_experts=16, top_k=4, plan="random", tokens=zero, seed=1)]
    _spawn(8, cases)
