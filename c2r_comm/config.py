"""YAML -> frozen, validated config objects.

Every error is a `ConfigError` naming the dotted field, the offending value and what is allowed,
so a typo in a sweep fails once, up front, with a message a user can act on.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config field holds a value that is not allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"config field '{field_name}' = {value!r} is invalid: allowed {allowed}")


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, allowed)


def top_t_range(num_experts: int, top_k: Optional[int] = None) -> tuple[int, int]:
    """Allowed C2R Top-T as (lo, hi), both inclusive: max(1, top_k-1) <= top_t <= num_experts-1.

    A token's top-1 expert plus its k-1 others come from the top-1's T collaborators, so T >= k-1;
    self is never a collaborator, so T <= E-1. top_k=None means no top-k constraint (the profiler
    derives lists before any model is chosen): 1 <= top_t <= num_experts-1.
    """
    return (1 if top_k is None else max(1, top_k - 1)), num_experts - 1


def check_top_t(top_t: Any, num_experts: int, top_k: Optional[int] = None, field_name: str = "routing.top_t") -> int:
    """The one Top-T range rule (see top_t_range); raises ConfigError naming field, value and range."""
    lo, hi = top_t_range(num_experts, top_k)
    bound = "1" if top_k is None else f"max(1, top_k-1) = {lo}"
    ok = isinstance(top_t, numbers.Integral) and not isinstance(top_t, bool) and lo <= top_t <= hi
    _require(ok, field_name, top_t, f"an integer {bound} <= top_t <= num_experts-1 = {hi}")
    return int(top_t)


DISPATCHERS = ("alltoall", "dedup", "hierarchical")
ROUTERS = ("topk", "c2r", "device_constrained")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: exactness checks (train-demo, references)
DEVICES = ("auto", "cpu", "cuda")
DROP_POLICIES = ("probs", "position")  # capacity mode: keep the largest weights, or the first tokens


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 256
    ffn_hidden_size: int = 512
    num_experts: int = 16
    top_k: int = 4
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int = 0  # 0 means "same as ffn_hidden_size"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        _require(self.top_k <= self.num_experts, "model.top_k", self.top_k,
                 f"1 <= top_k <= num_experts ({self.num_experts})")
        _require(self.num_shared_experts >= 0, "model.num_shared_experts", self.num_shared_experts, ">= 0")
        _require(self.shared_ffn_hidden_size >= 0, "model.shared_ffn_hidden_size",
                 self.shared_ffn_hidden_size, ">= 0")


@dataclass(frozen=True)
class ParallelConfig:
    nodes: int = 1
    gpus_per_node: int = 1

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "parallel.nodes", self.nodes, "an integer >= 1")
        _require(self.gpus_per_node >= 1, "parallel.gpus_per_node", self.gpus_per_node, "an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class RoutingConfig:
    kind: str = "topk"
    renormalize: bool = True
    noise_std: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    # c2r: Top-T collaborator lists come from a profiler .npz (`collaborators`, layer `layer`).
    top_t: Optional[int] = None
    collaborators: Optional[str] = None
    # device_constrained: at most `max_groups` GPUs (level=gpu) or nodes (level=node) per token.
    max_groups: Optional[int] = None
    level: str = "gpu"
    # Capacity mode (routing/capacity.py, Megatron's semantics): None = dropless (the default); a
    # factor f keeps at most ceil(T*k/E*f) of a rank's T tokens per expert, dropping by `drop_policy`;
    # pad_to_capacity gives each local expert exactly capacity x EP-size rows (fixed GEMM shapes).
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in ROUTERS, "routing.kind", self.kind, f"one of {ROUTERS}")
        _require(self.noise_std >= 0, "routing.noise_std", self.noise_std, ">= 0")
        _require(self.aux_loss_weight >= 0, "routing.aux_loss_weight", self.aux_loss_weight, ">= 0")
        _require(self.z_loss_weight >= 0, "routing.z_loss_weight", self.z_loss_weight, ">= 0")
        _require(self.level in ("gpu", "node"), "routing.level", self.level, "'gpu' or 'node'")
        f = self.capacity_factor
        _require(f is None or (isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0),
                 "routing.capacity_factor", f, "null (dropless) or a finite number > 0")
        _require(self.drop_policy in DROP_POLICIES, "routing.drop_policy", self.drop_policy, f"one of {DROP_POLICIES}")
        _require(self.drop_policy == "probs" or f is not None, "routing.drop_policy", self.drop_policy,
                 "'probs' (the default) unless routing.capacity_factor is set")
        _require(isinstance(self.pad_to_capacity, bool), "routing.pad_to_capacity", self.pad_to_capacity,
                 "true or false")
        _require(not self.pad_to_capacity or f is not None, "routing.pad_to_capacity", self.pad_to_capacity,
                 "false unless routing.capacity_factor is set")
        if self.kind == "c2r":
            # Its range depends on the model: Config checks it (check_top_t), as does build_router.
            _require(self.top_t is not None, "routing.top_t", self.top_t, "an integer (required for kind=c2r)")
            _require(self.collaborators is not None, "routing.collaborators", self.collaborators,
                     "a path to a profiler .npz (required for kind=c2r)")
        if self.kind == "device_constrained":
            _require(self.max_groups is not None and self.max_groups >= 1, "routing.max_groups",
                     self.max_groups, "an integer >= 1 (required for kind=device_constrained)")


@dataclass(frozen=True)
class PlacementConfig:
    plan: Optional[str] = None  # plan JSON from `c2r-comm plan`; None = contiguous
    layer: int = 0  # 0-based trace layer index whose plan this MoE layer uses

    def __post_init__(self) -> None:
        _require(self.layer >= 0, "placement.layer", self.layer, "a 0-based layer index >= 0")


MAX_TIMEOUT_S = timedelta.max.total_seconds() // 10  # well inside what timedelta and the process group hold


@dataclass(frozen=True)
class RunConfig:
    tokens_per_rank: int = 512
    dtype: str = "float32"
    seed: int = 0
    warmup_iters: int = 2
    iters: int = 10
    timeout_s: float = 120.0
    device: str = "auto"  # auto: one GPU per local rank when there are enough (NCCL), else CPU (gloo)
    # Cross-rank agreement on the combine input (one tiny all_gather per combine): every rank raises
    # when one rank's experts return the wrong shape. Off: combine checks locally, no extra collective.
    debug_checks: bool = False

    def __post_init__(self) -> None:
        _require(self.tokens_per_rank >= 0, "run.tokens_per_rank", self.tokens_per_rank, "an integer >= 0")
        _require(self.dtype in DTYPES, "run.dtype", self.dtype, f"one of {DTYPES}")
        _require(self.warmup_iters >= 0, "run.warmup_iters", self.warmup_iters, "an integer >= 0")
        _require(self.iters >= 1, "run.iters", self.iters, "an integer >= 1")
        _require(math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S, "run.timeout_s",
                 self.timeout_s, f"a finite number of seconds > 0 (at most {MAX_TIMEOUT_S:.0f})")
        _require(self.device in DEVICES, "run.device", self.device, f"one of {DEVICES}")


OVERLAP_AUTO = "auto"
# How the pipelined layer's backward runs its exchanges (schedule/pipeline.py): "split" starts each
# one and waits for it later (what a GPU runs); "thread" runs each communicating piece on its own
# thread (CPU tensors only); "auto": thread on the CPU, split on a GPU.
BACKWARD_EXCHANGES = ("auto", "split", "thread")


@dataclass(frozen=True)
class ScheduleConfig:
    # Token chunks one MoE layer pipelines (dispatch of chunk c+1 and combine of c-1 in flight while
    # the experts compute chunk c; mirrored in backward). 1: the serial order. "auto": picked on the
    # layer's first forward from one serial step's exchange and expert times (schedule/auto.py).
    overlap_degree: Union[int, str] = 1
    backward_exchanges: str = "auto"  # one of BACKWARD_EXCHANGES (used when overlap_degree > 1)

    def __post_init__(self) -> None:
        ok = self.overlap_degree == OVERLAP_AUTO or (
            isinstance(self.overlap_degree, int) and not isinstance(self.overlap_degree, bool)
            and 1 <= self.overlap_degree <= 64)
        _require(ok, "schedule.overlap_degree", self.overlap_degree, f"an integer 1..64 or '{OVERLAP_AUTO}'")
        _require(self.backward_exchanges in BACKWARD_EXCHANGES, "schedule.backward_exchanges",
                 self.backward_exchanges, f"one of {BACKWARD_EXCHANGES}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dispatcher: str = "dedup"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    run: RunConfig = field(default_factory=RunConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        _require(self.dispatcher in DISPATCHERS, "dispatcher", self.dispatcher, f"one of {DISPATCHERS}")
        world = self.parallel.world_size
        _require(self.model.num_experts % world == 0, "model.num_experts", self.model.num_experts,
                 f"a multiple of the number of ranks nodes*gpus_per_node = {world}")
        if self.routing.kind == "c2r":
            check_top_t(self.routing.top_t, self.model.num_experts, self.model.top_k)
        _require(not self.routing.pad_to_capacity or self.schedule.overlap_degree == 1, "schedule.overlap_degree",
                 self.schedule.overlap_degree, "1 with routing.pad_to_capacity (capacity is per layer batch, not per "
                 "chunk: padded chunks would multiply the expert rows)")
        _require(not (self.schedule.backward_exchanges == "thread" and self.run.device == "cuda"),
                 "schedule.backward_exchanges", self.schedule.backward_exchanges,
                 "'auto' or 'split' with run.device cuda (a backward started from a second thread would wait for "
                 "the autograd engine's device thread forever)")

    def check_world_size(self, world_size: int) -> None:
        """The launched world must be exactly nodes x gpus_per_node."""
        _require(world_size == self.parallel.world_size, "parallel", f"{self.parallel.nodes}x"
                 f"{self.parallel.gpus_per_node}", f"nodes*gpus_per_node == world size ({world_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, hint: Any, field_name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. int or "auto": the dataclass's own check names what is allowed
            return value
        return _check_type(value, inner[0], field_name)
    if hint is bool:
        _require(isinstance(value, bool), field_name, value, "true or false")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), field_name, value, "an integer")
    elif hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), field_name, value, "a number")
        return float(value)
    elif hint is str:
        _require(isinstance(value, str), field_name, value, "a string")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "<top level>"
    _require(isinstance(data, Mapping), where, data, "a mapping of fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        _require(key in names, dotted, value, f"known fields of {where}: {names}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted)
        else:
            kwargs[key] = _check_type(value, hint, dotted)
    return cls(**kwargs)


def config_from_dict(data: Mapping) -> Config:
    return _build(Config, data, "")


def load_config(path: str | Path, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """The YAML file's config with dotted `overrides` (command-line flags; None values skipped) put
    in before it is validated, so a value a flag replaces is never checked (validated once)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("--config", str(path), f"a valid YAML file ({where}{problem})") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", str(path), "a UTF-8 YAML text file") from None
    if overrides and isinstance(data, dict):  # anything else is refused by config_from_dict below
        _put(data, overrides)
    return config_from_dict(data)


def _put(data: dict, overrides: Mapping[str, Any]) -> None:
    """Dotted overrides into a nested dict; a section that is not a mapping is left for the check."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Apply dotted overrides (e.g. {"run.iters": 5}) and validate the result once more."""
    data = config.to_dict()
    _put(data, overrides)
    return config_from_dict(data)


def parse_topology(text: str) -> tuple[int, int]:
    """'2x4' -> (nodes=2, gpus_per_node=4)."""
    parts = text.lower().split("x")
    ok = len(parts) == 2 and all(p.isdigit() and int(p) >= 1 for p in parts)
    _require(ok, "--topology", text, "NODESxGPUS_PER_NODE with both >= 1, e.g. 1x4 or 2x4")
    return int(parts[0]), int(parts[1])
