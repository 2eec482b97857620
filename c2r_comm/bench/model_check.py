"""The cost model against a measured benchmark run: bytes must agree exactly, times within a tolerance.

For every record of a `c2r-comm bench --phases --json` file (typically run under `c2r-comm
emulate`), the world is laid out again in one process from the same trace tokens, topology,
placement, hidden size and dtypes (`world_layout.lay_out_world`, the dispatchers' own layouts), and:

- bytes: the model's dispatch and combine CommStats must equal the benchmark's, field by field;
- time: the model's fwd+bwd exchange time (dispatch + combine, forward and backward, serial) is
  compared with the measured exchange phases (forward send + combine, backward combine + dispatch,
  each timed alone after a barrier: `bench --phases`), the link rate taken from the record's
  emulation (`--inter-node-gbit` of `c2r-comm emulate`) unless given.

The measured phases also hold the packing, unpacking and loopback copies the model only covers
with its per-stage overhead, so on a CPU-bound run the model under-predicts; the report says so.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from c2r_comm.bench.cost_model import predict
from c2r_comm.bench.hardware import HardwareProfile
from c2r_comm.bench.world_layout import lay_out_world
from c2r_comm.config import ConfigError, config_from_dict
from c2r_comm.dispatch import DISPATCHERS
from c2r_comm.layer import DTYPES
from c2r_comm.plan import load_layer_plan
from c2r_comm.routing.capacity import CapacitySpec, apply_capacity
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

EXCHANGE_PHASES = (("forward", "send"), ("forward", "combine"), ("backward", "combine"), ("backward", "dispatch"))


@dataclass(frozen=True)
class ModelCheck:
    dispatcher: str
    placement: str
    topology: str
    inter_node_gbit: Optional[float]
    bytes_equal: bool
    measured_mb: float  # off-rank, dispatch + combine, forward, all ranks: the benchmark's accounting
    model_mb: float
    measured_exchange_ms: float  # sum of the exchange phases' medians
    predicted_exchange_ms: float
    bottleneck: str

    @property
    def ratio(self) -> float:
        """predicted / measured exchange time."""
        return self.predicted_exchange_ms / self.measured_exchange_ms if self.measured_exchange_ms else float("nan")

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ratio=self.ratio)


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--bench-json", str(path), "an existing `c2r-comm bench --json` file")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("--bench-json", str(path), f"valid JSON ({exc})") from None
    if not isinstance(records, list) or not records:
        raise ConfigError("--bench-json", str(path), "a non-empty list of bench records")
    ours = [r for r in records if isinstance(r, dict) and r.get("dispatcher") in DISPATCHERS]  # not peers
    if not ours or any(r.get("phases") is None or r.get("layer") is None for r in ours):
        raise ConfigError("--bench-json", str(path), "records of `c2r-comm bench --trace ... --phases --json`")
    return ours


def check_record(record: dict, trace: RoutingTrace, profile: HardwareProfile) -> ModelCheck:
    """Lay the record's world out again and compare (see the module docstring)."""
    config = config_from_dict(record["config"])
    topo = Topology(config.parallel.nodes, config.parallel.gpus_per_node)
    layer, T = int(record["layer"]), config.run.tokens_per_rank
    placement = load_layer_plan(config.placement.plan, layer, topo, config.model.num_experts)
    capacity = CapacitySpec.of(config.routing)

    def ids_of_rank(r: int) -> torch.Tensor:  # what the bench's layer dispatched: after capacity mode's limit
        idx = torch.from_numpy(trace.rank_block(layer, r, T))
        if capacity is None:
            return idx
        K = idx.shape[1]  # bench --trace weights every choice 1/k
        return apply_capacity(idx, torch.full(idx.shape, 1.0 / K), config.model.num_experts, capacity).topk_idx_TK

    # bench --trace sends float32 routing weights (traces record no gate weights: 1/k each).
    world = lay_out_world(record["dispatcher"], topo, placement, config.model.hidden_size, DTYPES[config.run.dtype],
                          ids_of_rank, weight_dtype=torch.float32)
    d_model, c_model = world.world_stats()
    m = record["measurement"]
    bytes_equal = (asdict(d_model), asdict(c_model)) == (m["dispatch"], m["combine"])
    emulation = record.get("emulation") or {}
    rate = emulation.get("inter_node_gbit")
    if rate is None:
        raise ConfigError("--inter-node-gbit", None, f"a link rate: the {record['dispatcher']} record ran on an "
                          "unshaped link, so the model needs the rate to assume")
    timed = predict(world, profile.with_rates(inter_node_gbit=rate, intra_node_gbit=emulation.get("intra_node_gbit")))
    measured = sum(record["phases"][d][p]["median_ms"] for d, p in EXCHANGE_PHASES)
    off = lambda s: s["bytes_same_node"] + s["bytes_cross_node"]  # noqa: E731
    slowest = timed.slowest_stage
    return ModelCheck(record["dispatcher"], record["placement"], str(topo), rate, bytes_equal,
                      (off(m["dispatch"]) + off(m["combine"])) / 1e6,
                      (d_model.bytes_off_rank + c_model.bytes_off_rank) / 1e6, measured, timed.fwd_bwd_s * 1e3,
                      f"{slowest.bottleneck.link_class} {slowest.stage} {slowest.direction}")


def format_checks(checks: list[ModelCheck], tolerance: float) -> str:
    rows = ["| topology | Gbit/s | dispatcher | placement | MB bench (accounted) | MB model | bytes equal | exchange ms measured "
            "| exchange ms model | model / measured | within tolerance | model's bottleneck |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        rows.append(f"| {c.topology} | {c.inter_node_gbit} | {c.dispatcher} "
                    f"| {c.placement} | {c.measured_mb:.2f} | {c.model_mb:.2f} | {'yes' if c.bytes_equal else 'NO'} "
                    f"| {c.measured_exchange_ms:.1f} | {c.predicted_exchange_ms:.1f} | {c.ratio:.2f} "
                    f"| {'yes' if abs(c.ratio - 1) <= tolerance else 'no'} | {c.bottleneck} |")
    return "\n".join(rows)
