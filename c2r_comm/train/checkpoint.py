"""Checkpoints of the training demo: one file per rank, experts named by global id, so a run can
continue under another placement (e.g. the plan made from the model's own routing).

Each rank writes DIR/rank<r>.pt: the whole module state (replicated weights are the same on every
rank), the optimizer state, the step, and the global expert ids of every MoE layer's local slots.
Resuming under the same placement restores everything. Under another placement each rank takes the
replicated weights from its own file and each of its experts from the file of the rank that held
it; the optimizer state then starts afresh (its per-slot moments belong to the old placement), and
the resume says so.
"""
from __future__ import annotations

from pathlib import Path

import torch

from c2r_comm.train.model import MoETransformerLM

EXPERT_TENSORS = ("w_gate_LDF", "w_up_LDF", "w_down_LFD")


def expert_ids(model: MoETransformerLM) -> list[tuple[int, ...]]:
    return [moe.experts.global_ids for moe in model.moes]


def save(model: MoETransformerLM, optimizer: torch.optim.Optimizer, step: int, folder: str | Path, rank: int,
         extra: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "expert_ids": expert_ids(model), **extra}, Path(folder) / f"rank{rank}.pt")


def load(model: MoETransformerLM, optimizer: torch.optim.Optimizer, folder: str | Path, rank: int,
         device: torch.device) -> tuple[int, bool]:
    """Restore from `folder`; returns (step, whether the optimizer state was restored)."""
    folder = Path(folder)
    own_path = folder / f"rank{rank}.pt"
    if not own_path.is_file():
        raise ValueError(f"--resume {folder}: no {own_path.name} (a checkpoint of a run with as many ranks)")
    own = torch.load(own_path, map_location=device, weights_only=False)
    if own["expert_ids"] == expert_ids(model):
        model.load_state_dict(own["model"])
        optimizer.load_state_dict(own["optimizer"])
        return own["step"], True
    state = dict(own["model"])
    where = {}  # (layer, global expert id) -> (rank file, slot)
    for path in sorted(folder.glob("rank*.pt")):
        ids = torch.load(path, map_location="cpu", weights_only=False)["expert_ids"]
        for layer, layer_ids in enumerate(ids):
            for slot, e in enumerate(layer_ids):
                where[(layer, e)] = (path, slot)
    files: dict[Path, dict] = {}
    for layer, layer_ids in enumerate(expert_ids(model)):
        for name in EXPERT_TENSORS:
            key = f"moes.{layer}.experts.{name}"
            rows = []
            for e in layer_ids:
                if (layer, e) not in where:
                    raise ValueError(f"--resume {folder}: no rank file holds expert {e} of MoE layer {layer}")
                path, slot = where[(layer, e)]
                if path not in files:
                    files[path] = torch.load(path, map_location=device, weights_only=False)["model"]
                rows.append(files[path][key][slot])
            state[key] = torch.stack(rows)
    model.load_state_dict(state)
    return own["step"], False
