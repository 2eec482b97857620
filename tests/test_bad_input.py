"""Bad input on ONE rank raises a clear error on EVERY rank before any data moves; nothing hangs."""
from __future__ import annotations

import pytest
import torch
from ranks import run_ranks

from c2r_comm.dispatch import InputError, build_dispatcher
from c2r_comm.experts import GroupedExperts
from c2r_comm.plan import PlacementPlan
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology

E, D, K, T = 8, 4, 2, 5


def _inputs(rank: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(T, D, generator=g), torch.randint(0, E, (T, K), generator=g), torch.rand(T, K, generator=g)


FAULTS = [("id_too_large", "out of range"), ("id_negative", "out of range"), ("shape", "shapes"),
          ("hidden", "hidden size"), ("int_x", "shapes or dtypes"), ("k_differs", "top-k / dtypes differ"),
          ("dtype_differs", "top-k / dtypes differ"),
          ("grad_differs", "rank 0: k=2, x float32, topk_weight float32, no grad; rank 1: k=2, x float32, "
                           "topk_weight float32, needs grad")]


def _bad_input_worker(rank, world, dispatcher):
    groups = build_process_groups(Topology(1, world), timeout_s=30)
    disp = build_dispatcher(dispatcher, PlacementPlan.contiguous(E, world), groups, D)
    return [_one_fault(rank, disp, fault) for fault, _ in FAULTS]


def _one_fault(rank, disp, fault):
    x, idx, w = _inputs(rank)
    if rank == 1:  # only one rank is wrong
        if fault == "id_too_large":
            idx[0, 0] = E
        elif fault == "id_negative":  # -1 is a dropped choice (capacity mode); below it is an error
            idx[2, 1] = -2
        elif fault == "shape":
            idx = idx[:-1]
        elif fault == "hidden":
            x = torch.randn(T, D + 1)
        elif fault == "int_x":
            x = x.long()
        elif fault == "k_differs":  # consistent on this rank, but k differs from the other ranks'
            idx, w = torch.stack([torch.randperm(E)[:K + 1] for _ in range(T)]), torch.rand(T, K + 1)
        elif fault == "dtype_differs":
            x = x.double()
        elif fault == "grad_differs":  # its backward would wait for reverse exchanges rank 0 never issues
            x.requires_grad_(True)
    try:
        disp.dispatch(x, idx, w)
        raised = None
    except InputError as exc:
        raised = str(exc)
    # The group is still usable: a good dispatch goes through afterwards.
    x, idx, w = _inputs(rank)
    experts = GroupedExperts.for_rank(disp.plan, rank, D, 6)
    batch, handle = disp.dispatch(x, idx, w)
    out = disp.combine(experts(batch.x_PD, batch.tokens_per_expert), handle)
    return raised, tuple(out.shape)


@pytest.mark.parametrize("dispatcher", ["alltoall", "dedup"])
def test_bad_input_raises_on_every_rank(dispatcher):
    per_rank = run_ranks(2, _bad_input_worker, dispatcher, timeout_s=60)
    for i, (fault, words) in enumerate(FAULTS):
        results = [r[i] for r in per_rank]
        for rank, (raised, shape) in enumerate(results):
            assert raised is not None, f"rank {rank} did not raise for {fault}"
            assert words in raised, raised
            assert "rank 1" in raised
            assert shape == (T, D)
        assert "allowed 0..7" in results[1][0] or fault not in ("id_too_large", "id_negative")


def _plan_mismatch_worker(rank, world):
    groups = build_process_groups(Topology(1, world), timeout_s=30)
    plan = PlacementPlan.contiguous(E, world) if rank == 0 else PlacementPlan.random(E, world, seed=3)
    try:
        build_dispatcher("dedup", plan, groups, D)
    except InputError as exc:
        return str(exc)
    return None


def test_plans_that_differ_across_ranks_are_refused_everywhere():
    for msg in run_ranks(2, _plan_mismatch_worker, timeout_s=60):
        assert msg is not None and "placement plan" in msg and "differs across ranks" in msg


def _world_mismatch_worker(rank, world):
    try:
        build_process_groups(Topology(2, 2), timeout_s=30)
    except ValueError as exc:
        return str(exc)
    return None


def test_topology_that_does_not_match_the_world_is_refused():
    for msg in run_ranks(2, _world_mismatch_worker, timeout_s=60):
        assert msg is not None and "world size" in msg


def _bad_combine_worker(rank, world):
    """With run.debug_checks every rank agrees on the combine input (one tiny all_gather)."""
    groups = build_process_groups(Topology(1, world), timeout_s=30)
    out = {}
    for name in ("alltoall", "dedup", "hierarchical"):
        disp = build_dispatcher(name, PlacementPlan.contiguous(E, world), groups, D, debug_checks=True)
        x, idx, w = _inputs(rank)
        batch, handle = disp.dispatch(x, idx, w)
        y = GroupedExperts.for_rank(disp.plan, rank, D, 6)(batch.x_PD, batch.tokens_per_expert)
        if rank == 0:
            y = y[:-1]  # a buggy expert on one rank only
        try:
            disp.combine(y, handle)
            out[name] = None
        except InputError as exc:
            out[name] = str(exc)
    return out


def test_bad_combine_input_on_one_rank_raises_everywhere():
    for rank, out in enumerate(run_ranks(2, _bad_combine_worker, timeout_s=60)):
        for name, msg in out.items():
            assert msg is not None and "rank 0: expert output shape" in msg, (rank, name, msg)


def _local_combine_check_worker(rank, world):
    """Without debug_checks, combine checks the expert output against the handle locally: no
    collective of its own on a good call, and a clear error (naming the rank) before any
    exchange on a bad one."""
    import torch.distributed as dist

    groups = build_process_groups(Topology(1, world), timeout_s=30)
    out = {}
    for name in ("alltoall", "dedup", "hierarchical"):
        disp = build_dispatcher(name, PlacementPlan.contiguous(E, world), groups, D)
        x, idx, w = _inputs(rank)
        batch, handle = disp.dispatch(x, idx, w)
        y = GroupedExperts.for_rank(disp.plan, rank, D, 6)(batch.x_PD, batch.tokens_per_expert)
        calls = []
        originals = {f: getattr(dist, f) for f in ("all_gather", "all_reduce", "broadcast")}
        for f, orig in originals.items():
            setattr(dist, f, lambda *a, _f=f, _o=orig, **k: (calls.append(_f), _o(*a, **k))[1])
        try:
            if name == "alltoall":  # weights are applied at the source: pre-weighted rows are refused
                try:
                    disp.combine(y, handle, weighted=True)
                    calls.append("weighted combine accepted")
                except ValueError:
                    pass
            disp.combine(y, handle)
            try:
                disp.combine(y[:-1], handle)
                out[name] = (calls, None)
            except ValueError as exc:
                out[name] = (calls, str(exc))
        finally:
            for f, orig in originals.items():
                setattr(dist, f, orig)
    return out


def test_combine_check_is_local_without_debug_checks():
    (out,) = run_ranks(1, _local_combine_check_worker, timeout_s=60)
    for name, (calls, msg) in out.items():
        assert calls == [], (name, calls)
        assert msg is not None and "rank 0: combine needs expert_out" in msg, (name, msg)
