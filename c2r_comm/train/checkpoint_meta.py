"""What a training-demo checkpoint was made with, readable without torch: DIR/run.json.

Rank 0 writes it beside the rank files; the launcher of `train-demo --resume DIR` reads it before
any rank starts and refuses a run whose model would not take the saved tensors (another hidden
size, expert count, layer count, ...) or whose rank count differs, naming the field, this run's
value and the saved one. Checkpoints written before the file existed carry none; those are checked
by the ranks as they load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from c2r_comm.config import Config, ConfigError

META_FILE = "run.json"
RANKS = "ranks (parallel.nodes x parallel.gpus_per_node)"


def model_shape(config: Config, layers: int, seq_len: int) -> dict[str, int]:
    """The settings that fix the shapes of the saved tensors, by the name a user sets them with."""
    m = config.model
    shared_ffn = m.num_shared_experts * (m.shared_ffn_hidden_size or m.ffn_hidden_size)  # one dense FFN (layer.py)
    return {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size": m.ffn_hidden_size,
            "model.num_experts": m.num_experts,
            "shared experts' FFN width (model.num_shared_experts x shared_ffn_hidden_size)": shared_ffn,
            "--layers": layers, "--seq-len": seq_len, RANKS: config.parallel.world_size}


def write_meta(folder: str | Path, shape: Mapping[str, int], step: int) -> None:
    path = Path(folder) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "shape": dict(shape)}, indent=1) + "\n")
    tmp.replace(path)  # whole or absent, never half-written


def check_resume(folder: str | Path, shape: Mapping[str, int]) -> None:
    """Refuse (ConfigError) a resume whose model or rank count differs from the checkpoint's."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return  # an older checkpoint: the ranks check it as they load
    try:
        saved = json.loads(path.read_text())["shape"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--resume", str(folder), f"a checkpoint folder with a readable {META_FILE} ({exc})") from exc
    for field, value in shape.items():
        if field in saved and saved[field] != value:
            why = "one file per rank" if field == RANKS else "its tensors have that shape"
            raise ConfigError(field, value, f"{saved[field]}, as the checkpoint --resume {folder} was saved with "
                              f"({why})")
