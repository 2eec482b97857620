"""Why a replica plan's held-out GPU load stays where it is (docs/benchmarks.md, "Replicas").

Per layer of a plan file, on the given prompts of a trace (tokens dealt to the W source ranks in
order, each rank's block one dispatch batch, as `c2r-comm plan` reports):
- realised: GPUs per token and GPU load max/mean of the dispatch's own copy choice
  (`placement_metrics`: each source rank balances its own batch);
- round-robin (`--round-robin`): the same with token t on rank t mod W (batches that look like the
  whole set);
- bound: the least max/mean any split of each expert's tokens over its copies could reach, even
  fractional, knowing every token and ignoring GPUs per token. By Hall's theorem for fractional
  assignments it is max over GPU sets S of (load of the experts whose copies all lie in S) / |S|,
  computed exactly over the 2^W sets; also its mean over the source batches, each on its own;
- global choice (`--global-rounds N`): the same pricing rule as dispatch (replica_choice), but over
  every source rank's tokens at once (as if each rank knew the others' choices), ties only and with
  a load cap (`--cap`): GPUs per token and load;
- lower bound (`--cap`): a lower bound on E[GPUs per token] of any copy choice (even fractional,
  knowing every token) whose GPU loads stay within cap x the mean: for any prices lambda_r >= 0,
  mean_t min_c (GPUs(t, c) + sum_r lambda_r rows_r(t, c)) - cap x k / W x sum_r lambda_r is one
  (Lagrangian relaxation); the best of `--bound-iters` subgradient steps is printed;
- a lagged global signal (`--stream B`): the prompts as a stream of floor(2 T / (W x B)) steps of
  W x B tokens (about two passes), each source rank's batch priced with the rows the other ranks sent each rank two steps
  before (what every rank could learn for free by adding its last received load to the count
  exchange; replica_choice's background_W), against no signal: GPU load max/mean of the whole
  stream and the mean of the steps' own max/mean. The signal is undamped: every source rank sees
  nearly the same background and moves its ties away from the same ranks at once
  (`--stream-damping D` scales the background's deviation from its mean by D);
- one exchange pass (`--exchange-pass D`): each source rank first chooses as dispatch does, then
  chooses again with the rows the other ranks chose for this same step as background (what one
  all_reduce of W numbers after the first choice would tell every rank: an extra collective and a
  second pricing pass per dispatch, which the dispatchers do not pay), the background's deviation
  from its mean scaled by D (D scales the price step too: a background near flat weakens the
  batch's own balancing): GPUs per token and GPU load max/mean;
- lower bound over the layers' mean (`--mean-caps 1.00,1.05,...`): the table reports the mean of
  the layers' load max/mean, so a plan may keep some layers above the cap and others below. With
  each layer's bound B_l(c) above at the caps c_0 < c_1 < ... (c_0 = the layer's split bound, the
  least load any choice reaches), a layer whose load lies in (c_(j-1), c_j] has GPUs >= B_l(c_j);
  for any mu >= 0, mean_l min_j (B_l(c_j) + mu c_(j-1)) - mu x cap bounds the mean GPUs per token
  of every choice whose layers' mean load is <= cap (loads above the last cap: the exact minimum
  cover with mu x that cap); the best mu of a fine grid is printed ("infeasible" when the cap is
  below the mean of the layers' split bounds: no choice reaches it).

    .venv/bin/python examples/replica_load_analysis.py --trace ../shared/traces/deepseek_v2_lite_prefill_dev.npz \
        --plan out/replicas/plan_1x8_R2.json --prompts 800:999 [--round-robin] [--global-rounds 64 --cap 1.10]
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import numpy as np
import torch

from c2r_comm.placement import replica_choice
from c2r_comm.placement.metrics import dealt_source_ranks, placement_metrics
from c2r_comm.plan import PlacementPlan, PlanFile
from c2r_comm.routing.trace import RoutingTrace, parse_range


def split_bound(plan: PlacementPlan, ids_TK: np.ndarray) -> float:
    """max over GPU sets S of (load of experts hosted only inside S) / |S|, over the mean load."""
    W = plan.world_size
    load_E = np.bincount(ids_TK.reshape(-1), minlength=plan.num_experts).astype(np.float64)
    mask_E = np.array([sum(1 << r for r in hosts) for hosts in plan.hosts_of_expert])
    sets = np.arange(1, 1 << W)
    inside = (mask_E[None, :] & ~sets[:, None]) == 0  # [set, expert]: every copy inside the set
    size = np.array([bin(s).count("1") for s in sets])
    return float(((inside * load_E).sum(1) / size).max() / (load_E.sum() / W))


def world_keys(plan: PlacementPlan, gpus_per_node: int, ids_TK: np.ndarray, source_rank_T: np.ndarray):
    """(cover keys [T, C], copies' ranks [T, K, H], combinations [C, K]) of every token, each keyed
    from its own source rank (dispatch's key: fewest remote ranks, then fewest ranks)."""
    host_rank_EH, _ = plan.host_tensors()
    K, H = ids_TK.shape[1], host_rank_EH.shape[1]
    combo_CK = replica_choice.combinations(H, K, torch.device("cpu"))
    keys, ranks = [], []
    for s in range(plan.world_size):
        rank_TKH = host_rank_EH[torch.as_tensor(ids_TK[source_rank_T == s])]
        keys.append(replica_choice.cover_keys(rank_TKH, combo_CK, plan.world_size, gpus_per_node, s, False))
        ranks.append(rank_TKH)
    return torch.cat(keys), torch.cat(ranks), combo_CK


def chosen_stats(rank_TKH: torch.Tensor, combo_CK: torch.Tensor, combo_T: torch.Tensor, W: int) -> tuple[float, float]:
    """(GPUs per token, GPU load max/mean) of a choice of combinations."""
    rank_TK = torch.gather(rank_TKH, 2, combo_CK[combo_T].unsqueeze(2)).squeeze(2)
    gpus = (torch.nn.functional.one_hot(rank_TK, W).sum(1) > 0).sum(1).double().mean()
    load = torch.bincount(rank_TK.reshape(-1), minlength=W).double()
    return float(gpus), float(load.max() / load.mean())


def global_choice(key_TC, rank_TKH, combo_CK, W: int, cap, rounds: int) -> tuple[float, float]:
    """The dispatch's pricing over every source rank's tokens at once (`rounds` rounds)."""
    combo_T = replica_choice._priced(key_TC, rank_TKH, combo_CK, W, cap, rank_TKH.shape[1] + 2, rounds=rounds)
    return chosen_stats(rank_TKH, combo_CK, combo_T, W)


def gpus_lower_bound(key_TC, rank_TKH, combo_CK, W: int, cap: float, iters: int) -> float:
    """Lagrangian lower bound on E[GPUs per token] with every rank's rows <= cap x mean (module doc)."""
    T, K, H = rank_TKH.shape
    gpus_TC = torch.remainder(key_TC, K + 2).double()  # the key's last digit: distinct ranks
    onehot_JC = replica_choice._combination_onehot(H, K, "cpu").double()
    flat_TJ = rank_TKH.reshape(T, K * H)
    lam = torch.zeros(W + 1, dtype=torch.float64)  # rank W never occurs (no dropped choices here)
    best, step = -np.inf, 0.5
    for _ in range(iters):
        cost_TC = torch.addmm(gpus_TC, lam[flat_TJ], onehot_JC)
        combo_T = cost_TC.argmin(1)
        best = max(best, float(cost_TC[torch.arange(T), combo_T].mean() - cap * K / W * lam[:W].sum()))
        rank_TK = torch.gather(rank_TKH, 2, combo_CK[combo_T].unsqueeze(2)).squeeze(2)
        g = torch.bincount(rank_TK.reshape(-1), minlength=W).double() / T - cap * K / W  # subgradient
        lam[:W] = (lam[:W] + step * g / (g.norm() + 1e-12)).clamp(min=0)
        step *= 0.97
    return best


def stream_loads(plan: PlacementPlan, gpus_per_node: int, ids_TK: np.ndarray, batch: int, lag: Optional[int],
                 damping: float = 1.0):
    """(load max/mean of the whole stream, mean of the steps' max/mean): floor(2 T / (W x batch)) steps
    of W x batch tokens (about two passes of ids_TK); lag None: no signal, else (lag >= 1) the other
    ranks' rows of the step `lag` steps before (the first `lag` steps have none), their deviation from
    their mean scaled by `damping` (1: as they were)."""
    if lag is not None and lag < 1:
        raise ValueError(f"lag = {lag} is invalid: allowed >= 1 (a step's own rows are not known before its choice)")
    W = plan.world_size
    host_rank_EH, host_slot_EH = plan.host_tensors()
    total_W, per_step, history = np.zeros(W), [], []
    for step in range(max(1, 2 * len(ids_TK) // (W * batch))):
        picked = torch.as_tensor(ids_TK[(np.arange(W * batch) + step * W * batch) % len(ids_TK)]).view(W, batch, -1)
        rows_SW = np.zeros((W, W))
        for s in range(W):
            background = None
            if lag is not None and step >= lag:
                before = history[step - lag]
                others_W = before.sum(0) - before[s]
                background = torch.as_tensor(damping * (others_W - others_W.mean()) + others_W.mean(), dtype=torch.float32)
            rank_TK, _ = replica_choice.choose_copies(picked[s], torch.ones_like(picked[s], dtype=torch.bool), host_rank_EH,
                                                      host_slot_EH, W, gpus_per_node, s, load_cap=plan.copy_load_cap,
                                                      background_W=background)
            rows_SW[s] = np.bincount(rank_TK.reshape(-1).numpy(), minlength=W)
        history.append(rows_SW)
        load_W = rows_SW.sum(0)
        total_W += load_W
        per_step.append(load_W.max() / load_W.mean())
    return float(total_W.max() / total_W.mean()), float(np.mean(per_step))


def exchange_pass(plan: PlacementPlan, gpus_per_node: int, ids_TK: np.ndarray, source_rank_T: np.ndarray,
                  damping: float) -> tuple[float, float]:
    """(GPUs per token, GPU load max/mean) when every source rank chooses twice: as dispatch, then with
    the other ranks' first-choice rows of the same tokens as background (deviation x damping)."""
    W = plan.world_size
    host_rank_EH, host_slot_EH = plan.host_tensors()
    blocks = [torch.as_tensor(ids_TK[source_rank_T == s]) for s in range(W)]

    def choose(s: int, background: Optional[torch.Tensor]) -> torch.Tensor:
        return replica_choice.choose_copies(blocks[s], torch.ones_like(blocks[s], dtype=torch.bool), host_rank_EH,
                                            host_slot_EH, W, gpus_per_node, s, load_cap=plan.copy_load_cap,
                                            background_W=background)[0]

    first_SW = np.stack([np.bincount(choose(s, None).reshape(-1).numpy(), minlength=W) for s in range(W)]).astype(float)
    load_W, gpus = np.zeros(W), 0.0
    for s in range(W):
        others_W = first_SW.sum(0) - first_SW[s]
        rank_TK = choose(s, torch.as_tensor(damping * (others_W - others_W.mean()) + others_W.mean(),
                                            dtype=torch.float32))
        load_W += np.bincount(rank_TK.reshape(-1).numpy(), minlength=W)
        gpus += float((torch.nn.functional.one_hot(rank_TK, W).sum(1) > 0).sum())
    return gpus / len(ids_TK), float(load_W.max() / load_W.mean())


def mean_load_bound(curves: list[list[tuple[float, float]]], mu: float, cap: float) -> float:
    """mean_l min_j (B_l(c_j) + mu c_(j-1)) - mu cap (module doc): curves[l] = [(c_0, B(c_0)), ...,
    (inf, minimum cover)], c_0 the layer's split bound (the least load: the first interval is that point)."""
    total = 0.0
    for curve in curves:
        lows = [curve[0][0]] + [c for c, _ in curve[:-1]]  # each interval's least load
        total += min(b + mu * low for (_, b), low in zip(curve, lows))
    return total / len(curves) - mu * cap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--prompts", default="800:999")
    p.add_argument("--layers", default="all", help="'all' or comma-separated trace layer indices of the plan")
    p.add_argument("--round-robin", action="store_true", help="also the realised choice with tokens dealt round-robin")
    p.add_argument("--global-rounds", type=int, default=0, help="also the global choice with N pricing rounds")
    p.add_argument("--cap", type=float, default=1.10, help="load cap of the global choice and the lower bound")
    p.add_argument("--bound-iters", type=int, default=120)
    p.add_argument("--stream-damping", type=float, default=1.0,
                   help="--stream: scale the signal's deviation from its mean by this (1: undamped)")
    p.add_argument("--copy-load-cap", type=float, default=None,
                   help="replace the plans' copy_load_cap (the dispatch's per-batch cap) by this one")
    p.add_argument("--stream", type=int, default=0, metavar="B",
                   help="also a stream of steps of W x B tokens: loads without and with the lagged global signal")
    p.add_argument("--exchange-pass", type=float, default=None, metavar="D",
                   help="also a second choice with the other ranks' rows of the same step, deviation x D (0..1]")
    p.add_argument("--mean-caps", default="", help="comma-separated caps of the bound on the layers' mean load "
                   "(e.g. 1.02,1.05,1.10,1.15,1.20,1.30); the split bound is added as each layer's first")
    args = p.parse_args()
    plan_file = PlanFile.load(args.plan)
    tokens = RoutingTrace.load(args.trace).select_prompts(*parse_range(args.prompts))
    head = ["GPUs/token", "load", "bound", "batch bound"]
    if args.round_robin:
        head += ["rr load"]
    if args.stream:
        head += ["stream load", "stream step load", "lag-2 stream load", "lag-2 step load"]
    if args.exchange_pass is not None:
        head += ["pass GPUs", "pass load"]
    if args.global_rounds:
        head += ["global load", f"global@{args.cap} GPUs", f"global@{args.cap} load", f"LB GPUs@{args.cap}"]
    print("layer | " + " | ".join(head))
    mean_caps = sorted(float(c) for c in args.mean_caps.split(",")) if args.mean_caps else []
    curves = []  # per layer: [(cap, bound on GPUs per token)], the split bound first, then the minimum cover
    rows = []
    chosen = None if args.layers == "all" else {int(v) for v in args.layers.split(",")}
    if chosen is not None and not chosen <= set(plan_file.layers):
        raise SystemExit(f"--layers {args.layers}: layers {sorted(chosen - set(plan_file.layers))} are not in the plan "
                         f"(it has {sorted(plan_file.layers)})")
    if args.exchange_pass is not None and not 0.0 < args.exchange_pass <= 1.0:
        raise SystemExit(f"--exchange-pass {args.exchange_pass} is invalid: allowed a damping in (0, 1]")
    if args.copy_load_cap is not None and not args.copy_load_cap >= 1.0:
        raise SystemExit(f"--copy-load-cap {args.copy_load_cap} is invalid: allowed a max/mean >= 1.0")
    for layer, plan in sorted(plan_file.layers.items()):
        if chosen is not None and layer not in chosen:
            continue
        if args.copy_load_cap is not None:
            plan = dataclasses.replace(plan, copy_load_cap=args.copy_load_cap)
        ids = tokens.layer(layer)
        W, topo = plan.world_size, plan_file.topology
        source_T = dealt_source_ranks(len(ids), W)
        m = placement_metrics(plan, topo, ids)
        row = [m.gpus_per_token, m.gpu_load_max_over_mean, split_bound(plan, ids),
               float(np.mean([split_bound(plan, ids[source_T == s]) for s in range(W)]))]
        if args.round_robin:
            row.append(placement_metrics(plan, topo, ids, np.arange(len(ids)) % W).gpu_load_max_over_mean)
        if args.stream:
            if topo.nodes != 1:
                raise SystemExit("--stream: single-node plans only (the key here is by ranks)")
            row += list(stream_loads(plan, topo.gpus_per_node, ids, args.stream, None))
            row += list(stream_loads(plan, topo.gpus_per_node, ids, args.stream, 2, args.stream_damping))
        if args.exchange_pass is not None:
            if topo.nodes != 1:
                raise SystemExit("--exchange-pass: single-node plans only (the key here is by ranks)")
            row += list(exchange_pass(plan, topo.gpus_per_node, ids, source_T, args.exchange_pass))
        if (args.global_rounds or mean_caps) and topo.nodes != 1:
            raise SystemExit("--global-rounds / --mean-caps: single-node plans only (the key here is by ranks)")
        if args.global_rounds or mean_caps:
            key_TC, rank_TKH, combo_CK = world_keys(plan, topo.gpus_per_node, ids, source_T)
        if args.global_rounds:
            row.append(global_choice(key_TC, rank_TKH, combo_CK, W, None, args.global_rounds)[1])
            row += list(global_choice(key_TC, rank_TKH, combo_CK, W, args.cap, args.global_rounds))
            row.append(gpus_lower_bound(key_TC, rank_TKH, combo_CK, W, args.cap, args.bound_iters))
        if mean_caps:
            K = rank_TKH.shape[1]
            floor = row[2]  # the split bound: no choice's load is below it
            caps = [floor] + [c for c in mean_caps if c > floor]
            curve = [(c, gpus_lower_bound(key_TC, rank_TKH, combo_CK, W, c, args.bound_iters)) for c in caps]
            min_cover = float(torch.remainder(key_TC, K + 2).min(1).values.double().mean())
            curves.append(curve + [(np.inf, min_cover)])
            print(f"      layer {layer} bound curve: " + ", ".join(f"{c:.3f}: {b:.3f}" for c, b in curve)
                  + f", any: {min_cover:.3f}", flush=True)
        rows.append(row)
        print(f"{layer:5d} | " + " | ".join(f"{v:.3f}" for v in row), flush=True)
    a = np.array(rows)
    print(" mean | " + " | ".join(f"{v:.3f}" for v in a.mean(0)))
    if curves:
        floor = float(np.mean([curve[0][0] for curve in curves]))  # the layers' split bounds
        for cap in mean_caps:
            if cap < floor:
                print(f"the layers' mean load <= {cap}: infeasible (the mean split bound is {floor:.3f})")
                continue
            best = max(mean_load_bound(curves, mu, cap) for mu in np.linspace(0.0, 20.0, 2001))
            print(f"lower bound on mean GPUs per token with the layers' mean load <= {cap}: {best:.3f}")
    print(f"layers above 1.10: realised {(a[:, 1] > 1.10).sum()}, bound {(a[:, 2] > 1.10).sum()} of {len(a)}")


if __name__ == "__main__":
    main()
