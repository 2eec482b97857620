"""ExchangePlan is the single source of counts: what layout() says equals what the exchanges send.

Three views must agree exactly, per rank and link class, for dispatch and combine:
  1. world accounting: every rank's layout computed in ONE process (no collective) and combined;
  2. the handle's CommStats, from the counts the dispatcher passed to its collectives;
  3. what was actually posted: every all_to_all_single / P2P send recorded with its rows and bytes.
Routings are fuzzed with hypothesis, generated identically on every rank (derandomized, no
shrinking: all ranks must run the same examples in the same order).
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from moe_cases import Case, make_plan, rank_inputs
from ranks import run_ranks

from c2r_comm.dispatch import DISPATCHERS, CommStats, build_dispatcher, traffic_stats, world_traffic
from c2r_comm.dispatch.layout import RankGeometry
from c2r_comm.experts import GroupedExperts
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology


@contextmanager
def recording(log: list):
    """Record (global peer, rows, bytes) of every message this rank posts."""
    a2a, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def rec_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        for i, rows in enumerate(input_split_sizes):
            log.append((dist.get_global_rank(group, i) if group is not None else i, rows, rows * row_bytes))
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def rec_batch(ops):
        for op in ops:
            if op.op is dist.isend:
                log.append((op.peer, op.tensor.shape[0], op.tensor.numel() * op.tensor.element_size()))
        return batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = rec_a2a, rec_batch
    try:
        yield log
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = a2a, batch


def stats_of_messages(log, me: int, topo: Topology) -> CommStats:
    f = dict(rows_local=0, rows_same_node=0, rows_cross_node=0, bytes_same_node=0, bytes_cross_node=0,
             messages_same_node=0, messages_cross_node=0)
    for peer, rows, nbytes in log:
        if peer == me:
            f["rows_local"] += rows
            continue
        cls = "same_node" if topo.same_node(peer, me) else "cross_node"
        f[f"rows_{cls}"] += rows
        f[f"bytes_{cls}"] += nbytes
        f[f"messages_{cls}"] += int(rows > 0)
    return CommStats(**f)


def world_stats(case: Case, name: str, me: int) -> tuple[CommStats, CommStats]:
    """Every rank's layout, computed here without communication, combined; what `me` sends."""
    topo, placement = Topology(case.nodes, case.gpus_per_node), make_plan(case)
    plans = []
    for r in range(case.world):
        x, idx, w, _ = rank_inputs(case, r)
        plans.append(DISPATCHERS[name].layout_for(RankGeometry.of(r, topo, placement), case.hidden, x, idx, w))
    return traffic_stats(world_traffic(plans), plans[0].stages, topo, sender=me)


def check_case(rank: int, case: Case, groups) -> None:
    topo = groups.topology
    disp = build_dispatcher(case.dispatcher, make_plan(case), groups, case.hidden)
    experts = GroupedExperts.for_rank(disp.plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)
    x, idx, w, grad = rank_inputs(case, rank)
    x.requires_grad_()
    route = disp.exchange_counts(disp.layout(x, idx, w))
    with recording([]) as sent:
        batch, handle = disp.send(x, w, route).wait()
    y = experts(batch.x_PD, batch.tokens_per_expert, batch.offsets_E)
    with recording([]) as returned:
        out = disp.combine(y, handle)
    (out * grad).sum().backward()
    want_d, want_c = world_stats(case, case.dispatcher, rank)
    where = f"rank {rank} {case}"
    assert handle.dispatch_stats == want_d, (where, handle.dispatch_stats, want_d)
    assert handle.combine_stats == want_c, (where, handle.combine_stats, want_c)
    assert stats_of_messages(sent, rank, topo) == want_d, (where, sent, want_d)
    assert stats_of_messages(returned, rank, topo) == want_c, (where, returned, want_c)


def fuzz_worker(rank: int, world: int, nodes: int, names: tuple[str, ...], examples: int) -> int:
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    groups = build_process_groups(Topology(nodes, world // nodes), timeout_s=60)
    ran = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
    @given(st.sampled_from(names), st.integers(1, 3), st.integers(1, 8), st.lists(st.integers(0, 9), min_size=world,
           max_size=world), st.sampled_from(["contiguous", "random"]), st.sampled_from(["random", "subset", "single"]),
           st.integers(0, 10_000))
    def run(name, experts_per_rank, k, tokens, plan, routing, seed):
        E = experts_per_rank * world
        case = Case(name, nodes=nodes, gpus_per_node=world // nodes, num_experts=E, top_k=min(k, E), hidden=4, ffn=6,
                    tokens=tuple(tokens), plan=plan, routing=routing, seed=seed)
        check_case(rank, case, groups)
        ran.append(case)

    run()
    return len(ran)


def test_layout_counts_equal_what_is_sent_world2():
    assert run_ranks(2, fuzz_worker, 1, ("alltoall", "dedup", "hierarchical"), 30) == [30, 30]


def fuzz_topologies(rank: int, world: int, runs) -> list[int]:
    """fuzz_worker for each (nodes, names, examples) of `runs`, in one launch."""
    return [fuzz_worker(rank, world, nodes, names, examples) for nodes, names, examples in runs]


def test_layout_counts_equal_what_is_sent_world4_and_2x2():
    runs = [(1, ("alltoall", "dedup"), 20), (2, ("alltoall", "dedup", "hierarchical"), 30)]
    assert run_ranks(4, fuzz_topologies, runs, timeout_s=300) == [[20, 30]] * 4  # 50 examples per launch


def test_placement_metrics_agree_with_the_exchange_plans():
    """placement/metrics (numpy, below dispatch in the import order) counts what the dispatchers'
    plans send: E[GPUs/token] = dedup rows incl. local / tokens, remote nodes = rail rows / tokens."""
    import numpy as np

    from c2r_comm.placement.metrics import placement_metrics
    from c2r_comm.plan import PlacementPlan

    topo = Topology(2, 4)
    placement = PlacementPlan.random(32, 8, seed=3)
    g = torch.Generator().manual_seed(0)
    per_rank = [torch.argsort(torch.rand(n, 32, generator=g), dim=1)[:, :6] for n in (9, 0, 13, 7, 8, 11, 5, 6)]
    ids = torch.cat(per_rank)
    source = np.repeat(np.arange(8), [t.shape[0] for t in per_rank])
    want = placement_metrics(placement, topo, ids.numpy(), source)
    plans = {}
    for name in ("dedup", "hierarchical"):
        plans[name] = [DISPATCHERS[name].layout_for(RankGeometry.of(r, topo, placement), 4,
                                                    torch.zeros(t.shape[0], 4), t, torch.ones(t.shape, dtype=torch.float32))
                       for r, t in enumerate(per_rank)]
    dedup = world_traffic(plans["dedup"])[0]
    assert int(dedup.sum()) / ids.shape[0] == pytest.approx(want.gpus_per_token)
    assert (int(dedup.sum()) - int(dedup.diagonal().sum())) / ids.shape[0] == pytest.approx(want.remote_gpus_per_token)
    rail = world_traffic(plans["hierarchical"])[0]
    assert int(rail.sum()) / ids.shape[0] == pytest.approx(want.remote_nodes_per_token)
