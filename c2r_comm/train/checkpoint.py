"""Checkpoints of the training demo: one file per rank, experts named by global id, so a run can
continue under another placement (e.g. the plan made from the model's own routing).

Each rank writes DIR/rank<r>.pt: the whole module state (replicated weights are the same on every
rank), the optimizer state, the step, the world size and the whole placement (every rank's global
expert ids per MoE layer, the same in every file), so every rank takes the same decision from its
own file. Under the same placement everything is restored as saved. Under another placement each
rank takes the replicated weights (and their optimizer moments) from its own file, and each of its
experts' weights and optimizer moments, row by row, from the file of the rank that held it: the run
continues as it would have, only on other ranks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from c2r_comm.experts import GroupedExperts
from c2r_comm.plan import PlacementPlan
from c2r_comm.train.model import MoETransformerLM

EXPERT_TENSORS = GroupedExperts.WEIGHTS  # the stacked expert weights, slot-major
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; "step" is a scalar


def placement_of(model: MoETransformerLM) -> list[list[tuple[int, ...]]]:
    """[rank][layer] -> global expert ids of that rank's local slots, for every rank (from the plans)."""
    world = model.moes[0].dispatcher.world_size
    return [[tuple(moe.dispatcher.plan.rank_experts[r]) for moe in model.moes] for r in range(world)]


def saved_plans(folder: str | Path, rank: int) -> list[PlacementPlan]:
    """The placement a checkpoint was saved under, one plan per MoE layer (every rank's file holds
    the whole placement; slots ascend by expert id within a rank, as PlacementPlan orders them)."""
    saved = torch.load(Path(folder) / f"rank{rank}.pt", map_location="cpu", weights_only=False)["placement"]
    world = len(saved)
    plans = []
    for layer in range(len(saved[0])):
        expert_to_rank = {e: r for r in range(world) for e in saved[r][layer]}
        plans.append(PlacementPlan(tuple(expert_to_rank[e] for e in range(len(expert_to_rank))), world))
    return plans


def save(model: MoETransformerLM, optimizer: torch.optim.Optimizer, step: int, folder: str | Path, rank: int,
         extra: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "placement": placement_of(model), **extra}, Path(folder) / f"rank{rank}.pt")


def load(model: MoETransformerLM, optimizer: torch.optim.Optimizer, folder: str | Path, rank: int,
         device: torch.device) -> tuple[int, bool]:
    """Restore from `folder`; returns (step, whether the placement was the same)."""
    folder = Path(folder)
    now = placement_of(model)
    paths = [folder / f"rank{r}.pt" for r in range(len(now))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"--resume {folder}: missing {missing} (a checkpoint of a run with {len(now)} ranks)")
    own = torch.load(paths[rank], map_location=device, weights_only=False)
    then = [[tuple(ids) for ids in layers] for layers in own["placement"]]
    if len(then) != len(now):
        raise ValueError(f"--resume {folder}: saved by {len(then)} ranks, this run has {len(now)}")
    if then == now:  # the placement is in every file: every rank decides alike
        model.load_state_dict(own["model"])
        optimizer.load_state_dict(own["optimizer"])
        return own["step"], True
    saved = [own if r == rank else torch.load(p, map_location=device, weights_only=False) for r, p in enumerate(paths)]
    if any(s["placement"] != own["placement"] or s["step"] != own["step"] for s in saved):
        raise ValueError(f"--resume {folder}: its rank files come from different runs")
    holder = {(layer, e): (r, slot)  # (layer, global expert id) -> (rank file, slot)
              for r, layers in enumerate(then) for layer, ids in enumerate(layers) for slot, e in enumerate(ids)}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}  # optimizer state key
    state, opt = dict(own["model"]), own["optimizer"]
    opt_state = {k: dict(v) for k, v in opt["state"].items()}
    for layer, ids in enumerate(now[rank]):
        state[f"moes.{layer}.experts._extra_state"] = {"global_ids": list(ids)}  # the rows below are these
        for name in EXPERT_TENSORS:
            key = f"moes.{layer}.experts.{name}"
            where = []
            for e in ids:
                if (layer, e) not in holder:
                    raise ValueError(f"--resume {folder}: no rank file holds expert {e} of MoE layer {layer}")
                where.append(holder[(layer, e)])
            state[key] = torch.stack([saved[r]["model"][key][slot] for r, slot in where])
            i = index[key]
            if i in opt_state:
                for moment in MOMENTS:
                    opt_state[i][moment] = torch.stack([saved[r]["optimizer"]["state"][i][moment][slot]
                                                        for r, slot in where])
    model.load_state_dict(state)
    optimizer.load_state_dict({"state": opt_state, "param_groups": opt["param_groups"]})
    return own["step"], False
