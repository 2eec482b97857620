"""Why a replica plan's held-out GPU load stays where it is (docs/benchmarks.md, "Replicas").

Per layer of a plan file, on the given prompts of a trace:
- realised: GPU load max/mean of the dispatch's own copy choice, tokens dealt to ranks in order
  (what `c2r-comm plan` reports);
- round-robin: the same with token t on rank t mod W (batches that look like the whole set);
- bound: the least max/mean any split of each expert's tokens over its copies could reach, even
  fractional, knowing every token and ignoring GPUs per token. By Hall's theorem for fractional
  assignments it is max over GPU sets S of (load of the experts whose copies all lie in S) / |S|,
  computed exactly over the 2^W sets.

    .venv/bin/python examples/replica_load_analysis.py --trace ../shared/traces/deepseek_v2_lite_prefill_dev.npz \
        --plan out/replicas/plan_1x8_R2.json --prompts 800:999
"""
from __future__ import annotations

import argparse

import numpy as np

from c2r_comm.placement.metrics import placement_metrics
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--prompts", default="800:999")
    args = p.parse_args()
    plan_file = PlanFile.load(args.plan)
    tokens = RoutingTrace.load(args.trace).select_prompts(*parse_range(args.prompts))
    rows = []
    print("layer | realised | round-robin | bound")
    for layer, plan in sorted(plan_file.layers.items()):
        ids = tokens.layer(layer)
        W = plan.world_size
        dealt = placement_metrics(plan, plan_file.topology, ids).gpu_load_max_over_mean
        robin = placement_metrics(plan, plan_file.topology, ids, np.arange(len(ids)) % W).gpu_load_max_over_mean
        rows.append((dealt, robin, split_bound(plan, ids)))
        print(f"{layer:5d} | {rows[-1][0]:8.3f} | {rows[-1][1]:11.3f} | {rows[-1][2]:5.3f}")
    a = np.array(rows)
    print(f" mean | {a[:, 0].mean():8.3f} | {a[:, 1].mean():11.3f} | {a[:, 2].mean():5.3f}")
    print(f"layers above 1.10: realised {(a[:, 0] > 1.10).sum()}, round-robin {(a[:, 1] > 1.10).sum()}, "
          f"bound {(a[:, 2] > 1.10).sum()} of {len(a)}")


if __name__ == "__main__":
    main()
