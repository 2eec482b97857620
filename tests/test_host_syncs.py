"""No hidden host syncs (the guide's hot-path rule; issue 9): a layer's forward and backward read
device data on the host only in the count exchange, for every dispatcher, serial and pipelined,
with replicas, dropped choices and a shared expert; the routers and the training loop's
co-activation profiler not at all. tests/host_reads.py finds the reads on the CPU by name."""
from __future__ import annotations

import pytest
import torch
from host_reads import HostReadGuard
from ranks import run_ranks
from test_fuzz_dispatch import FuzzCase, SHARED_FFN, rank_inputs, routing_weights

from c2r_comm.dispatch import build_dispatcher
from c2r_comm.experts import GroupedExperts, SharedExpert
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import MoELayer
from c2r_comm.routing.capacity import CapacitySpec
from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.routing.router import C2RRouter, DeviceConstrainedRouter, TopKRouter
from c2r_comm.topology import Topology


def test_the_guard_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    reads = [lambda: x.sum().item(), lambda: bool(x[0]), lambda: x.tolist(), lambda: x.numpy(),
             lambda: x.nonzero(), lambda: x[x > 2], lambda: torch.bincount(x.long()), lambda: x.unique(),
             lambda: torch.repeat_interleave(x, x.long()), lambda: torch.equal(x, x)]
    for read in reads:
        with HostReadGuard() as guard:
            read()
        assert len(guard.violations) >= 1, read
    with HostReadGuard() as guard:  # host data overwritten with device data is device data
        host = torch.zeros(3)
        guard._mark_host(host)
        host.tolist()
        host.copy_(x[:3])
        host.tolist()
    assert len(guard.violations) == 1, guard.violations
    with HostReadGuard() as guard:  # Python data copied to a device
        torch.tensor([1, 2], device=x.device)
    assert len(guard.violations) == 1, guard.violations
    with HostReadGuard() as guard:  # device work that needs no host value
        torch.repeat_interleave(x, x.long(), output_size=15)
        x.sort().indices.index_select(0, torch.arange(3)).cumsum(0)
    assert not guard.violations, guard.violations


def _case(dispatcher: str, nodes: int, gpus: int, **kw) -> FuzzCase:
    E = 4 * nodes * gpus
    return FuzzCase(dispatcher, nodes, gpus, tuple(e % (nodes * gpus) for e in range(E)), top_k=3,
                    tokens=(9, 5, 0, 7)[:nodes * gpus], **kw)


def _layer_step(rank: int, world: int, case: FuzzCase, backward_exchanges: str, capacity) -> tuple[list[str], int]:
    """Two forward + backward steps of the layer; the host reads the guard found in the second and
    the count exchanges it saw there."""
    groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=30)
    plan = case.plan
    disp = build_dispatcher(case.dispatcher, plan, groups, case.hidden)
    experts = GroupedExperts.for_rank(plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)
    shared = SharedExpert(case.hidden, SHARED_FFN, case.seed, torch.float64) if case.shared else None
    layer = MoELayer(None, disp, experts, shared, overlap_degree=case.overlap, capacity=capacity,
                     backward_exchanges=backward_exchanges)
    x, idx, src, grad = rank_inputs(case, rank)
    x.requires_grad_(), src.requires_grad_()
    for step in range(2):  # the second step is guarded: one-time set-up (cached tables) may read the host
        w = routing_weights(case, x, idx, src)
        with HostReadGuard() as guard:
            out = layer.forward_routed(x, idx, w).out_TD
            (out * grad).sum().backward()
            if layer.replica_grad_sync is not None:
                layer.replica_grad_sync(experts)
    return guard.violations, guard.count_exchanges


LAYER_CASES = {
    "alltoall": _case("alltoall", 1, 2, shared=True),
    "dedup": _case("dedup", 1, 2, dropped=0.3, gate=True),
    "hierarchical-2x1": _case("hierarchical", 2, 1, shared=True),
    "hierarchical-1x2": _case("hierarchical", 1, 2),
    "alltoall-pipelined": _case("alltoall", 1, 2, overlap=2),
    "dedup-pipelined-shared": _case("dedup", 1, 2, overlap=3, shared=True),
    "hierarchical-2x1-pipelined": _case("hierarchical", 2, 1, overlap=2, dropped=0.3),
    "dedup-replicas": _case("dedup", 1, 2, replicas=((1,), (0,))),
    "hierarchical-2x1-replicas-pipelined": _case("hierarchical", 2, 1, overlap=2, replicas=((1,), (0,))),
    "hierarchical-1x2-pipelined": _case("hierarchical", 1, 2, overlap=2, shared=True),
    "alltoall-replicas": _case("alltoall", 1, 2, replicas=((1,), (0,)), dropped=0.3),
}


def _assert_clean(per_rank: list[tuple[list[str], int]]) -> None:
    assert [v for v, _ in per_rank] == [[], []], per_rank
    assert all(n >= 1 for _, n in per_rank), per_rank  # the guard saw the dispatches it let through


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_reads_the_host_only_in_the_count_exchange(name):
    # the split backward: the GPU's (the CPU's default exchange thread is not seen by the guard)
    _assert_clean(run_ranks(2, _layer_step, LAYER_CASES[name], "split", None, timeout_s=60))


@pytest.mark.parametrize("case", [_case("dedup", 1, 2), _case("hierarchical", 2, 1)], ids=["dedup", "hierarchical"])
def test_capacity_mode_reads_the_host_only_in_the_count_exchange(case):
    _assert_clean(run_ranks(2, _layer_step, case, "split", CapacitySpec(1.0), timeout_s=60))


def test_routers_and_the_profiler_read_nothing_on_the_host():
    g = torch.Generator().manual_seed(0)
    D, E, K, T = 8, 8, 3, 20
    x = torch.randn(T, D, generator=g)
    collaborators = torch.stack([torch.roll(torch.arange(E), -e)[1:5] for e in range(E)])
    routers = [TopKRouter(D, E, K, aux_loss_weight=0.01, z_loss_weight=0.001, generator=g),
               C2RRouter(D, E, K, collaborators, top_t=4, generator=g),
               DeviceConstrainedRouter(D, E, K, torch.arange(E) // 2, max_groups=2, generator=g)]
    profiler = CollaborationProfiler(num_layers=1, num_experts=E)
    for router in routers:
        with HostReadGuard() as guard:
            out = router(x)
            (out.topk_weight_TK.sum() + out.aux_loss).backward()
            profiler.update(0, out.topk_idx_TK, check=False)
        assert not guard.violations, (type(router).__name__, guard.violations)
