"""PNGs of a placement: the one co-activation heatmap renderer (`c2r-comm profile --heatmap` and the
middle panel of `c2r-comm plan`'s PNG), and the plan PNG with per-GPU token load bars, that heatmap
and E[distinct GPUs per token] per layer. matplotlib is optional (`pip install c2r-comm[plot]`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from c2r_comm.placement.metrics import PlacementMetrics, chosen_copies, dealt_source_ranks, expert_loads, rank_loads
from c2r_comm.routing.collaboration import coactivation_counts
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only); ImportError without matplotlib (check
    matplotlib_available() first to say how to install it)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def draw_coactivation_heatmap(ax: Any, counts_EE: np.ndarray, plan: PlacementPlan, topology: Topology,
                              title: str) -> None:
    """log(1 + co-activations) [E, E] on `ax`, experts ordered by rank, then slot (plan.rank_experts):
    a good plan shows heavy blocks on the diagonal. Red lines separate GPUs, white lines nodes."""
    E = plan.num_experts
    if np.shape(counts_EE) != (E, E):
        raise ValueError(f"co-activation counts must be [{E}, {E}] for the plan's experts, got {np.shape(counts_EE)}")
    per = plan.primaries_per_rank  # replicas are not drawn: each expert once, at its primary rank
    order = [e for experts in plan.rank_experts for e in experts[:per]]
    counts = np.asarray(counts_EE, dtype=np.float64)[np.ix_(order, order)]
    im = ax.imshow(np.log1p(counts), cmap="viridis", interpolation="nearest")
    for b in range(per, E, per):
        node_edge = (b // per) % topology.gpus_per_node == 0
        ax.axhline(b - 0.5, color="w" if node_edge else "r", lw=1.4 if node_edge else 0.6)
        ax.axvline(b - 0.5, color="w" if node_edge else "r", lw=1.4 if node_edge else 0.6)
    ax.set(title=title, xlabel="expert (by rank, slot)", ylabel="expert (by rank, slot)")
    ax.figure.colorbar(im, ax=ax, label="log(1 + tokens selecting both)")


def save_coactivation_png(path: str | Path, counts_EE: np.ndarray, plan: PlacementPlan, topology: Topology,
                          title: str) -> None:
    """The heatmap of draw_coactivation_heatmap alone, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    draw_coactivation_heatmap(ax, counts_EE, plan, topology, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_placement_png(path: str | Path, layer: int, plans: Mapping[str, PlacementPlan], eval_ids_TK: np.ndarray,
                       topology: Topology, per_layer: Mapping[str, Sequence[tuple[int, PlacementMetrics]]],
                       method: str) -> None:
    """plans: method -> plan of `layer`; per_layer: method -> [(layer, eval metrics)] for the line plot."""
    plt = pyplot()
    E = plans[method].num_experts
    load_E = expert_loads(eval_ids_TK, E)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    ax = axes[0]
    width = 0.8 / len(plans)
    for i, (name, plan) in enumerate(plans.items()):
        load_R = rank_loads(load_E, plan.expert_to_rank, plan.world_size) if not plan.replicas else \
            np.bincount(chosen_copies(plan, topology, eval_ids_TK,
                                      dealt_source_ranks(len(eval_ids_TK), plan.world_size)).reshape(-1),
                        minlength=plan.world_size).astype(np.float64)  # the copies the dispatchers choose
        ax.bar(np.arange(plan.world_size) + (i - (len(plans) - 1) / 2) * width, load_R / load_R.mean(), width,
               label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(title=f"layer {layer}: per-GPU token load / mean (eval)", xlabel="GPU (rank)", ylabel="load / mean")
    ax.legend(fontsize=8)

    draw_coactivation_heatmap(axes[1], coactivation_counts(eval_ids_TK, E), plans[method], topology,
                              f"layer {layer}: co-activations (eval), {method} order")

    ax = axes[2]
    for name, rows in per_layer.items():
        ax.plot([l for l, _ in rows], [m.gpus_per_token for _, m in rows], marker="o", ms=3, label=name)
    ax.set(title="E[distinct GPUs per token] (eval)", xlabel="trace layer", ylabel="GPUs per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
