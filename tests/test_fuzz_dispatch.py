"""Fuzzing (issue 14 item 4): hypothesis draws whole MoE steps and every rank of a persistent gloo
pool (rank_pool.py) runs them; outputs and gradients (x, routing / gate weights, routed and shared
expert weights) must equal a float64 single-process reference to 1e-10 (relative).

A case draws: world topology (nodes x GPUs, 2x4 and more at world 8), dispatcher (every one in
DISPATCHERS), a random balanced plan (PlacementPlan needs E/W experts per rank), E, k in 1..min(E, 6)
or k = E, tokens per rank in 0..24 (zeros, all zeros), the routing (uniform distinct experts,
skewed to a few hot experts, all-to-one: every token's top-1 on one rank, every token the same
experts) with none, 30 % or all choices dropped (expert id -1, as capacity mode drops them), a plan
with 0, 1 or 2 replica slots per rank (expert gradients then compared summed over copies), routing weights (random leaves, or a softmax gate whose matrix gets a gradient), a
shared expert or none, the schedule (the layer serially or pipelined over 2 or 3 chunks, or the
dispatcher called directly with weights applied at combine) and debug_checks. Each rank rebuilds
its inputs from (seed, rank); the parent computes the reference once and compares.

CI runs a bounded number of examples with a fixed seed; `--fuzz-long` runs thousands per world size
(`--fuzz-examples N` sets the count, `--fuzz-seed S` the seed). Each test prints
"fuzz world=W: N examples, F failures".
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from moe_cases import _maxdiff
from rank_pool import RankPool
from ranks import RankError

from c2r_comm.dispatch import DISPATCHERS, DROPPED_CHOICE, build_dispatcher
from c2r_comm.experts import GroupedExperts, SharedExpert, init_expert_weights, reference_moe, swiglu
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import MoELayer
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

TOL = 1e-10  # relative to max(1, |reference|), float64 end to end
MAX_TOKENS = 24
SHARED_FFN = 5
ROUTINGS = ("uniform", "skewed", "all_to_one", "same")
TOPOLOGIES = {2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4), (4, 1)], 8: [(2, 4), (1, 8), (4, 2)]}
CI_EXAMPLES = {2: 150, 4: 90, 8: 30}  # split equally over the dispatchers
LONG_EXAMPLES = {2: 2100, 4: 2100, 8: 2100}
CI_SEED = 2026  # CI is reproducible; --fuzz-long draws a random seed (printed), --fuzz-seed S replays one


@dataclass(frozen=True)
class FuzzCase:
    dispatcher: str
    nodes: int
    gpus_per_node: int
    expert_to_rank: tuple[int, ...]  # a balanced plan
    top_k: int
    tokens: tuple[int, ...]  # per rank
    routing: str = "uniform"  # one of ROUTINGS
    hot: int = 1  # skewed: hot experts; all_to_one: the rank every token's top-1 lives on
    gate: bool = False  # weights = renormalised softmax(x @ W_gate) at the chosen experts
    shared: bool = False
    overlap: int = 1  # MoELayer overlap_degree (chunks)
    direct: bool = False  # dispatch / experts / combine(weighted=False) instead of the layer (overlap 1)
    debug_checks: bool = False
    dropped: float = 0.0  # fraction of choices dropped (expert id -1, as capacity mode drops them)
    replicas: tuple[tuple[int, ...], ...] = ()  # per rank: experts it holds a copy of (plan.replicas)
    copy_load_cap: Optional[float] = None  # plan.copy_load_cap (with replicas)
    hidden: int = 4
    ffn: int = 6
    seed: int = 0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def plan(self) -> PlacementPlan:
        return PlacementPlan(self.expert_to_rank, self.world, self.replicas, self.copy_load_cap)


# ---- inputs, identical in the ranks and in the parent ---------------------------------------------
def gate_matrix(case: FuzzCase) -> torch.Tensor:
    g = torch.Generator().manual_seed(7_000_003 * case.seed + 11)
    return torch.randn(case.hidden, case.num_experts, generator=g, dtype=torch.float64)


def rank_inputs(case: FuzzCase, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_TD, topk_idx_TK, weight source, upstream grad g_TD) of `rank`, float64. The weight source
    is the [T, K] routing weights, or with case.gate the [D, E] gate matrix (see routing_weights)."""
    T, E, K = case.tokens[rank], case.num_experts, case.top_k
    shared_g = torch.Generator().manual_seed(7_000_003 * case.seed + 1)  # the same on every rank
    g = torch.Generator().manual_seed(7_000_003 * case.seed + 100 + rank)
    x = torch.randn(T, case.hidden, generator=g, dtype=torch.float64)
    scores = torch.rand(T, E, generator=g, dtype=torch.float64)
    if case.routing == "skewed":  # a few hot experts win most top-k slots
        hot = torch.randperm(E, generator=shared_g)[:case.hot]
        scores[:, hot] += 3.0 * torch.rand(T, 1, generator=g, dtype=torch.float64) + 0.5
    elif case.routing == "all_to_one":  # top-1 on a random expert of rank `hot`, the rest anywhere
        experts = torch.tensor(case.plan.rank_experts[case.hot])
        top1 = experts[torch.randint(len(experts), (T,), generator=g)]
        scores[torch.arange(T), top1] = 2.0
    elif case.routing == "same":  # every token of every rank: the same experts
        scores = torch.rand(E, generator=shared_g, dtype=torch.float64).expand(T, E)
    idx = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :K]
    src = gate_matrix(case) if case.gate else torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    grad = torch.randn(T, case.hidden, generator=g, dtype=torch.float64)
    if case.dropped:
        idx = torch.where(torch.rand(T, K, generator=g) < case.dropped, DROPPED_CHOICE, idx)
    return x, idx, src, grad


def routing_weights(case: FuzzCase, x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if not case.gate:
        return src
    w = F.softmax(x @ src, dim=-1).gather(1, idx.clamp_min(0))  # a dropped choice's weight is unused
    return w / w.sum(dim=-1, keepdim=True)


# ---- rank side ----------------------------------------------------------------------------------
_GROUPS: dict[tuple[int, int], object] = {}  # per topology, built once per pool (same order on every rank)


def _numpy(t: Optional[torch.Tensor], like: torch.Tensor) -> np.ndarray:
    return (t if t is not None else torch.zeros_like(like)).detach().numpy().copy()


def fuzz_rank(rank: int, world: int, case: FuzzCase) -> dict[str, object]:
    """One MoE step on this rank; returns its outputs and gradients (numpy, for the parent)."""
    assert case.world == world, (case, world)
    topo = (case.nodes, case.gpus_per_node)
    if topo not in _GROUPS:
        _GROUPS[topo] = build_process_groups(Topology(*topo), timeout_s=30)
    plan = case.plan
    disp = build_dispatcher(case.dispatcher, plan, _GROUPS[topo], case.hidden, debug_checks=case.debug_checks)
    experts = GroupedExperts.for_rank(plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)
    shared = SharedExpert(case.hidden, SHARED_FFN, case.seed, torch.float64) if case.shared else None
    x, idx, src, grad = rank_inputs(case, rank)
    x.requires_grad_(), src.requires_grad_()
    w = routing_weights(case, x, idx, src)
    chunks = 1
    if case.direct:
        batch, handle = disp.dispatch(x, idx, w)
        out = disp.combine(experts(batch.x_PD, batch.tokens_per_expert), handle)
        if shared is not None:
            out = out + shared(x)
    else:
        res = MoELayer(None, disp, experts, shared, overlap_degree=case.overlap).forward_routed(x, idx, w)
        out, chunks = res.out_TD, len(res.handles)
    if out.requires_grad:
        (out * grad).sum().backward()
    params = [experts.w_gate_LDF, experts.w_up_LDF, experts.w_down_LFD]
    shared_params = [] if shared is None else [shared.w_gate_DF, shared.w_up_DF, shared.w_down_FD]
    return {"out": _numpy(out, out), "grad_x": _numpy(x.grad, x), "grad_w": _numpy(src.grad, src),
            "grad_experts": [_numpy(p.grad, p) for p in params],
            "grad_shared": [_numpy(p.grad, p) for p in shared_params], "chunks": chunks}


# ---- parent side: reference and comparison -------------------------------------------------------
def reference(case: FuzzCase) -> list[dict[str, object]]:
    """Per rank, what fuzz_rank must return, computed in one process (float64)."""
    experts = [[w.double().requires_grad_() for w in init_expert_weights(e, case.hidden, case.ffn, case.seed)]
               for e in range(case.num_experts)]
    per_rank = []
    for r in range(case.world):
        x, idx, src, grad = rank_inputs(case, r)
        x.requires_grad_(), src.requires_grad_()
        shared = [w.double().requires_grad_() for w in init_expert_weights(-1, case.hidden, SHARED_FFN, case.seed)] \
            if case.shared else []
        out = reference_moe(x, idx, routing_weights(case, x, idx, src), experts)
        if shared:
            out = out + swiglu(x, *shared)
        if out.requires_grad:
            (out * grad).sum().backward()
        per_rank.append({"out": _numpy(out, out), "grad_x": _numpy(x.grad, x), "grad_w": _numpy(src.grad, src),
                         "grad_shared": [_numpy(p.grad, p) for p in shared]})
    for r, mine in enumerate(case.plan.rank_experts):  # expert grads sum over every rank's tokens
        per_rank[r]["grad_experts"] = [np.stack([_numpy(experts[e][i].grad, experts[e][i]) for e in mine])
                                       for i in range(3)]
    per_rank[0]["grad_by_expert"] = [[_numpy(w.grad, w) for w in expert] for expert in experts]
    return per_rank


def summed_over_copies(case: FuzzCase, per_rank: list[dict]) -> list[list[np.ndarray]]:
    """[expert][param]: each expert's weight gradients summed over its copies (a replica plan splits
    an expert's tokens over its copies; the model's gradient is the sum)."""
    out = [[0.0, 0.0, 0.0] for _ in range(case.num_experts)]
    for r, mine in enumerate(case.plan.rank_experts):
        for slot, e in enumerate(mine):
            for i in range(3):
                out[e][i] = out[e][i] + per_rank[r]["grad_experts"][i][slot]
    return out


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    if not got.size:
        return 0.0
    return _maxdiff(torch.from_numpy(got), torch.from_numpy(want)) / max(1.0, float(np.abs(want).max()))


def compare(case: FuzzCase, got: list[dict], want: list[dict]) -> tuple[float, list[str]]:
    """(max relative error, one line per mismatch); also checks the chunk count."""
    worst, bad = 0.0, []
    for r, (g, w) in enumerate(zip(got, want)):
        chunks = 1 if case.direct else case.overlap
        if g["chunks"] != chunks:
            bad.append(f"rank {r}: {g['chunks']} handles, want {chunks}")
        pairs = [("out", g["out"], w["out"]), ("grad_x", g["grad_x"], w["grad_x"]),
                 ("grad_gate" if case.gate else "grad_w", g["grad_w"], w["grad_w"])]
        if not case.replicas:
            pairs += [(f"grad_experts[{i}]", a, b) for i, (a, b) in enumerate(zip(g["grad_experts"], w["grad_experts"]))]
        elif r == 0:  # copies hold shares of an expert's gradient: compare the sums
            got_e, want_e = summed_over_copies(case, got), want[0]["grad_by_expert"]
            pairs += [(f"grad_experts[expert {e}][{i}] (summed over copies)", np.asarray(got_e[e][i]),
                       np.asarray(want_e[e][i])) for e in range(case.num_experts) for i in range(3)]
        pairs += [(f"grad_shared[{i}]", a, b) for i, (a, b) in enumerate(zip(g["grad_shared"], w["grad_shared"]))]
        if len(g["grad_shared"]) != len(w["grad_shared"]):
            pairs.append(("grad_shared count", np.zeros(len(g["grad_shared"])), np.zeros(len(w["grad_shared"]))))
        for name, a, b in pairs:
            err = _rel_err(a, b)
            worst = max(worst, err)
            if not err <= TOL:
                bad.append(f"rank {r} {name}: rel err {err:.3g}" + (f" (shape {a.shape} vs {b.shape})"
                                                                      if a.shape != b.shape else ""))
    return worst, bad


# ---- strategy -------------------------------------------------------------------------------------
@st.composite
def fuzz_cases(draw, world: int, dispatcher: Optional[str] = None) -> FuzzCase:
    nodes, gpus = draw(st.sampled_from(TOPOLOGIES[world]))
    per_rank = draw(st.integers(max(1, -(-4 // world)), 16 // world))  # E = W * L in 4..16
    E = world * per_rank
    base = [e // per_rank for e in range(E)]
    expert_to_rank = tuple(draw(st.permutations(base)))  # random balanced plan, shrinks to contiguous
    R = draw(st.sampled_from([0, 0, 1, 2]))
    R = min(R, E - per_rank)  # a rank holds copies of other ranks' experts only
    order = draw(st.permutations(list(range(E)))) if R else []
    copies = [0] * E
    replicas = []
    for r in range(world if R else 0):  # each rank takes the R least-copied experts it does not own
        pick = sorted((e for e in order if expert_to_rank[e] != r and copies[e] < R), key=lambda e: copies[e])[:R]
        if len(pick) < R:  # no valid plan this way (an expert would exceed R copies): no replicas
            replicas = []
            break
        for e in pick:
            copies[e] += 1
        replicas.append(tuple(pick))
    k = E if draw(st.sampled_from([False, False, False, True])) else draw(st.integers(1, min(E, 6)))
    count = st.integers(0, MAX_TOKENS)  # hypothesis draws 0 (and all zeros) often enough
    tokens = tuple(draw(st.lists(count, min_size=world, max_size=world)))
    routing = draw(st.sampled_from(ROUTINGS))
    hot = draw(st.integers(1, min(3, E))) if routing == "skewed" else \
        draw(st.integers(0, world - 1)) if routing == "all_to_one" else 1
    overlap = draw(st.sampled_from([1, 2, 2, 3]))
    return FuzzCase(
        dispatcher=dispatcher or draw(st.sampled_from(sorted(DISPATCHERS))), nodes=nodes, gpus_per_node=gpus,
        expert_to_rank=expert_to_rank, top_k=k, tokens=tokens, routing=routing, hot=hot, gate=draw(st.booleans()),
        shared=draw(st.booleans()), overlap=overlap, direct=overlap == 1 and draw(st.booleans()),
        debug_checks=draw(st.booleans()), dropped=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
        replicas=tuple(replicas), copy_load_cap=draw(st.sampled_from([None, 1.0, 1.2])) if replicas else None,
        hidden=draw(st.integers(1, 8)), ffn=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**16)))


# ---- tests ------------------------------------------------------------------------------------------
def _fuzz_settings(config, world: int) -> tuple[settings, int, str]:
    long_run = config.getoption("--fuzz-long")
    n = config.getoption("--fuzz-examples") or (LONG_EXAMPLES if long_run else CI_EXAMPLES)[world]
    n = max(1, -(-n // len(DISPATCHERS)))  # per dispatcher
    s = config.getoption("--fuzz-seed")
    if s is None:
        s = random.randrange(2**32) if long_run else CI_SEED
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]), s, f"seed {s}"


@pytest.mark.fuzz
@pytest.mark.parametrize("world", [2, 4, 8])
def test_fuzz_dispatchers_match_reference(world, request, capsys):
    fuzz_settings, fuzz_seed, how = _fuzz_settings(request.config, world)
    stats = {"examples": 0, "failures": 0, "worst": 0.0,
             "by": {name: 0 for name in sorted(DISPATCHERS)}, "zero_rank": 0, "overlap>1": 0, "k=E": 0,
             "dropped": 0, "replicas": 0}
    t0 = time.monotonic()
    with RankPool(world, timeout_s=90 if world == 8 else 60) as pool:

        def run_one(case: FuzzCase) -> None:
            stats["examples"] += 1
            stats["by"][case.dispatcher] += 1
            stats["zero_rank"] += 0 in case.tokens
            stats["overlap>1"] += not case.direct and case.overlap > 1
            stats["k=E"] += case.top_k == case.num_experts
            stats["dropped"] += case.dropped > 0
            stats["replicas"] += bool(case.replicas)
            try:
                got = pool.run(fuzz_rank, case)
            except RankError:
                stats["failures"] += 1
                raise
            worst, bad = compare(case, got, reference(case))
            note(f"max relative error {worst:.3g}")
            stats["worst"] = max(stats["worst"], worst)
            if bad:
                stats["failures"] += 1
            assert not bad, "\n".join(bad)

        try:
            # one hypothesis run per dispatcher (hypothesis favours the first of sampled_from), one pool
            for name in sorted(DISPATCHERS):
                # seeded per (seed, world, dispatcher): reproducible, and the dispatchers see different cases
                seed(f"{fuzz_seed}-{world}-{name}")(fuzz_settings(given(fuzz_cases(world, name))(run_one)))()
        finally:
            with capsys.disabled():
                print(f"\nfuzz world={world}: {stats['examples']} examples, {stats['failures']} failures "
                      f"({how}; {time.monotonic() - t0:.1f} s; per dispatcher {stats['by']}; rank with 0 tokens "
                      f"{stats['zero_rank']}, pipelined {stats['overlap>1']}, k=E {stats['k=E']}, with dropped choices "
                      f"{stats['dropped']}, with replicas {stats['replicas']}; pool restarts "
                      f"{pool.restarts}; worst rel err {stats['worst']:.2g})")
    assert stats["examples"] > 0


# ---- the harness itself ----------------------------------------------------------------------------
def _raise_on_rank_1(rank: int, world: int) -> None:
    import torch.distributed as dist
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes: the pool must not hang


def _sleep(rank: int, world: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def test_pool_notices_wrong_results_and_survives_rank_errors():
    case = FuzzCase("dedup", 1, 2, (1, 0, 0, 1, 1, 0), top_k=3, tokens=(5, 0), routing="uniform", gate=True,
                    shared=True, overlap=2, seed=3)
    hier = replace(case, dispatcher="hierarchical", nodes=2, gpus_per_node=1, tokens=(4, 7), overlap=1, direct=True)
    with RankPool(2, timeout_s=60, error_grace_s=1.0) as pool:
        got = pool.run(fuzz_rank, case)
        want = reference(case)
        worst, bad = compare(case, got, want)
        assert not bad and worst <= TOL, bad
        # the comparison is not vacuous: a 1e-8 change anywhere in the reference is caught
        for key, r in (("out", 0), ("grad_x", 0), ("grad_w", 0), ("grad_w", 1), ("grad_experts", 1),
                       ("grad_shared", 0)):
            perturbed = [{k: (list(v) if isinstance(v, list) else v) for k, v in d.items()} for d in want]
            item = perturbed[r][key]
            arr = (item[0] if isinstance(item, list) else item).copy()
            arr.reshape(-1)[0] += 1e-8
            if isinstance(item, list):
                perturbed[r][key][0] = arr
            else:
                perturbed[r][key] = arr
            _, bad = compare(case, got, perturbed)
            assert bad and all(f"rank {r} " in b for b in bad), (key, r, bad)
        # a wrong expected chunk count is caught too
        assert compare(replace(case, overlap=3), got, want)[1]

        # an error on one rank (the other stuck in a collective) is reported, the pool restarts clean
        with pytest.raises(RankError, match="boom on rank 1") as info:
            pool.run(_raise_on_rank_1)
        assert 1 in info.value.errors and pool.restarts == 1
        assert not compare(hier, pool.run(fuzz_rank, hier), reference(hier))[1]
        # a rank that overruns the task's time limit: timed out, restarted, next task fine
        with pytest.raises(RankError, match="timed out"):
            pool.run(_sleep, 30.0, timeout_s=1.0)
        assert pool.restarts == 2 and pool.run(_sleep, 0.0) == [0, 1]
        assert pool.tasks == 3 and pool.running
    assert not pool.running
