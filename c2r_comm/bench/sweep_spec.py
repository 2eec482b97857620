"""Sweep YAML -> a frozen, validated SweepSpec, and its expansion into bench launches.

A sweep is the grid dispatchers x placements x routings x topologies x inter-node rates (x overlap
degrees). Cells that share (topology, routing, placement, rate) run all their dispatchers in one
`c2r-comm bench` launch. Every error is a ConfigError naming the sweep field (dotted, with list
indices, e.g. `routings[2].top_t`), the value and what is allowed, raised while loading, before
anything runs. Relative paths in the YAML are relative to the directory the sweep runs in (as every
other c2r-comm path flag); they are stored absolute. Each axis entry is loaded by sweep_axes.py;
this module checks the whole (fields, base config, cross-axis rules) and expands the grid.

    name: rate_sweep_2x2
    base:                       # the bench config every cell starts from
      config: configs/x.yaml    # optional bench config YAML
      model: {hidden_size: 2048, ffn_hidden_size: 256}   # then inline fields, as in a bench config
      run: {tokens_per_rank: 2048, dtype: float32}
    trace: ../shared/traces/deepseek_v2_lite_prefill_dev.npz   # replayed, fit on, profiled
    layer: 12                   # 0-based layer: of the trace, the plans and the collaborator lists
    fit_prompts: "0:800"        # plans and c2r collaborator lists are fit on these prompts
    eval_prompts: "800:999"     # trace replay deals tokens from these (plans are scored on them)
    dispatchers: [alltoall, dedup, hierarchical]
    placements: [contiguous, hypergraph, {plan: plans/mine.json}]
    routings: [trace, topk, {kind: c2r, top_t: 8}, {kind: device_constrained, max_groups: 2}]
    topologies: [2x2]
    emulate: true               # run cells under `c2r-comm emulate` (network namespaces)
    rates: [0.1, 0.2, 0.5, 1.0, null]   # inter-node Gbit/s; null = unshaped namespaces
    intra_node_gbit: null
    overlap_degrees: [1, 2]     # schedule.overlap_degree of the layer (1 = serial; each its own launch)
    iters: 10
    warmup_iters: 2
    launch_timeout_s: 3600

With a trace, the model's num_experts and top_k come from the trace (as with `bench --trace`).
"""
from __future__ import annotations

import itertools
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from c2r_comm.bench.sweep_axes import (PLANNED_METHODS, PlacementAxis, RoutingAxis, TraceSource, check_file,
                                       check_int, check_plan_file, load_placement, load_routing, load_topology,
                                       load_trace)
from c2r_comm.config import DISPATCHERS, Config, ConfigError, config_from_dict, load_config, with_overrides
from c2r_comm.topology import Topology

FIELDS = ("name", "base", "trace", "layer", "fit_prompts", "eval_prompts", "dispatchers", "placements", "routings",
          "topologies", "emulate", "rates", "intra_node_gbit", "overlap_degrees", "iters", "warmup_iters",
          "launch_timeout_s")
BASE_SECTIONS = ("model", "run", "routing")
AXIS_OWNED = {"parallel": "topologies", "dispatcher": "dispatchers", "placement": "placements",
              "run.iters": "iters", "run.warmup_iters": "warmup_iters", "routing.kind": "routings",
              "routing.top_t": "routings", "routing.collaborators": "routings", "routing.max_groups": "routings",
              "routing.level": "routings"}


@dataclass(frozen=True)
class Launch:
    """One bench launch: every dispatcher of one (topology, routing, placement, rate) cell group."""

    index: int
    topology: Topology
    routing: RoutingAxis
    placement: PlacementAxis
    rate_gbit: Optional[float]  # inter-node rate; None: unshaped (or no emulation at all)
    dispatchers: tuple[str, ...]
    overlap_degree: int

    @property
    def name(self) -> str:
        rate = "" if self.rate_gbit is None else f"-{self.rate_gbit:g}gbit"
        chunks = "" if self.overlap_degree == 1 else f"-C{self.overlap_degree}"
        text = f"{self.index:03d}-{self.topology}-{self.routing.label}-{self.placement.label}{rate}{chunks}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace("<=", "le"))


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Config  # the bench config every cell starts from (iters/warmup applied; axes override the rest)
    trace: Optional[TraceSource]
    dispatchers: tuple[str, ...]
    placements: tuple[PlacementAxis, ...]
    routings: tuple[RoutingAxis, ...]
    topologies: tuple[Topology, ...]
    emulate: bool
    rates_gbit: tuple[Optional[float], ...]
    intra_node_gbit: Optional[float]
    overlap_degrees: tuple[int, ...]
    launch_timeout_s: float

    def launches(self) -> tuple[Launch, ...]:
        grid = itertools.product(self.topologies, self.routings, self.placements, self.rates_gbit,
                                 self.overlap_degrees)
        return tuple(Launch(i, topo, routing, placement, rate, self.dispatchers, degree)
                     for i, (topo, routing, placement, rate, degree) in enumerate(grid))

    @property
    def num_cells(self) -> int:
        return len(self.launches()) * len(self.dispatchers)

    def launch_config(self, launch: Launch, plan_path: Optional[str], collaborators_path: Optional[str]) -> Config:
        """The bench config of one launch (the dispatcher is chosen per record by bench itself).
        plan_path: the plan file of a planned placement; collaborators_path: c2r lists when profiled."""
        r = launch.routing
        over: dict[str, Any] = {"parallel.nodes": launch.topology.nodes,
                                "parallel.gpus_per_node": launch.topology.gpus_per_node,
                                "routing.kind": "topk" if r.kind == "trace" else r.kind, "placement.plan": plan_path,
                                "schedule.overlap_degree": launch.overlap_degree}
        if r.kind == "c2r":
            over.update({"routing.top_t": r.top_t, "routing.collaborators": r.collaborators or collaborators_path})
        if r.kind == "device_constrained":
            over.update({"routing.max_groups": r.max_groups, "routing.level": r.level})
        try:
            return with_overrides(self.base, over)
        except ConfigError as exc:
            raise ConfigError(f"launch {launch.name}: {exc.field_name}", exc.value, exc.allowed) from None


# ---- loading -----------------------------------------------------------------------------------

def _rate(value: Any, field: str) -> Optional[float]:
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf
    if not ok:
        raise ConfigError(field, value, "a link rate in Gbit/s > 0, or null for unshaped")
    return float(value)


def _list(data: Mapping, key: str, default: Optional[list] = None) -> list:
    value = data.get(key, default)
    if not isinstance(value, list) or not value:
        raise ConfigError(key, value, "a non-empty list")
    seen = [yaml.safe_dump(v) for v in value]
    for i, v in enumerate(seen):
        if v in seen[:i]:
            raise ConfigError(f"{key}[{i}]", value[i], f"each entry at most once ({key} repeats it)")
    return value


def _base_config(data: Any, base_dir: Path, layer: int) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("base", data, f"a mapping: optional `config: PATH`, then sections {BASE_SECTIONS}")
    merged = Config().to_dict()
    if "config" in data:
        merged = load_config(check_file(data["config"], "base.config", base_dir, "a bench config YAML")).to_dict()
    for section, fields in data.items():
        if section == "config":
            continue
        if section in AXIS_OWNED:
            raise ConfigError(f"base.{section}", fields, f"no `{section}` here: the sweep's `{AXIS_OWNED[section]}` "
                                                          f"sets it per cell; allowed sections {BASE_SECTIONS}")
        if section not in BASE_SECTIONS:
            raise ConfigError(f"base.{section}", fields, f"`config` and the sections {BASE_SECTIONS}")
        if not isinstance(fields, Mapping):
            raise ConfigError(f"base.{section}", fields, "a mapping of fields")
        for key, value in fields.items():
            dotted = f"{section}.{key}"
            if dotted in AXIS_OWNED:
                raise ConfigError(f"base.{dotted}", value, f"not set here: the sweep's `{AXIS_OWNED[dotted]}` "
                                                           "sets it")
            merged.setdefault(section, {})[key] = value
    merged["parallel"] = {"nodes": 1, "gpus_per_node": 1}  # the topologies axis decides
    merged["placement"] = {"plan": None, "layer": layer}  # the placements axis decides the plan
    merged["routing"]["kind"] = "topk"  # the routings axis decides
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"base.{exc.field_name}", exc.value, exc.allowed) from None


def spec_from_dict(data: Any, base_dir: Path) -> SweepSpec:
    if not isinstance(data, Mapping):
        raise ConfigError("<top level>", data, f"a mapping with fields {FIELDS}")
    for key in data:
        if key not in FIELDS:
            raise ConfigError(str(key), data[key], f"known sweep fields: {FIELDS}")
    name = data.get("name", "sweep")
    if not isinstance(name, str) or not name:
        raise ConfigError("name", name, "a non-empty string")
    needs_plans = any(p in PLANNED_METHODS for p in data.get("placements") or [])
    layer = check_int(data.get("layer", 0), "layer", 0)
    trace = load_trace(data, base_dir, layer, needs_plans)
    base = _base_config(data.get("base"), base_dir, layer)
    over = {"run.iters": check_int(data.get("iters", 10), "iters", 1),
            "run.warmup_iters": check_int(data.get("warmup_iters", 2), "warmup_iters", 0)}
    if trace is not None:
        over.update({"model.num_experts": trace.num_experts, "model.top_k": trace.top_k})
    base = with_overrides(base, over)
    dispatchers = _list(data, "dispatchers", list(DISPATCHERS))
    for i, d in enumerate(dispatchers):
        if d not in DISPATCHERS:
            raise ConfigError(f"dispatchers[{i}]", d, f"one of {DISPATCHERS}")
    topologies = tuple(load_topology(t, i, base) for i, t in enumerate(_list(data, "topologies")))
    routings = tuple(load_routing(r, i, base_dir, trace, base)
                     for i, r in enumerate(_list(data, "routings", ["trace" if trace is not None else "topk"])))
    if any(r.kind == "trace" for r in routings):
        for i, topo in enumerate(topologies):
            most = trace.eval_tokens // topo.world_size
            if base.run.tokens_per_rank > most:
                raise ConfigError("base.run.tokens_per_rank", base.run.tokens_per_rank,
                                  f"at most {most}: eval_prompts hold {trace.eval_tokens} tokens of the trace for "
                                  f"the {topo.world_size} ranks of topologies[{i}] = {topo}")
    placements = tuple(load_placement(p, i, base_dir, trace)
                       for i, p in enumerate(_list(data, "placements", ["contiguous"])))
    for i, p in enumerate(placements):
        if p.method == "file":
            check_plan_file(p, i, topologies, base)
    emulate = data.get("emulate", False)
    if not isinstance(emulate, bool):
        raise ConfigError("emulate", emulate, "true or false")
    if not emulate:
        for key in ("rates", "intra_node_gbit"):
            if data.get(key) is not None:
                raise ConfigError(key, data[key], "only with `emulate: true` (link rates need emulated nodes)")
    rates = tuple(_rate(r, f"rates[{i}]") for i, r in enumerate(_list(data, "rates", [None])))
    intra = _rate(data.get("intra_node_gbit"), "intra_node_gbit")
    degrees = _list(data, "overlap_degrees", [1])
    for i, d in enumerate(degrees):
        if not (isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 64):
            raise ConfigError(f"overlap_degrees[{i}]", d, "token chunks the layer pipelines: an integer 1..64 "
                                                          "(schedule.overlap_degree; 1 = serial)")
    timeout = data.get("launch_timeout_s", 3600)
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not timeout > 0:
        raise ConfigError("launch_timeout_s", timeout, "seconds > 0")
    spec = SweepSpec(name, base, trace, tuple(dispatchers), placements, routings, topologies, emulate, rates, intra,
                     tuple(int(d) for d in degrees), float(timeout))
    for launch in spec.launches():  # every launch's bench config is valid before anything runs
        spec.launch_config(launch, "<plan>" if launch.placement.needs_planning else launch.placement.plan_file,
                           "<collaborators>")
    return spec


def load_sweep_spec(path: str | Path, base_dir: Optional[Path] = None) -> SweepSpec:
    """Read and validate a sweep YAML; relative paths in it resolve against base_dir (default: cwd)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--spec", str(path), "an existing sweep YAML file")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError("--spec", str(path), f"valid YAML ({exc})") from None
    return spec_from_dict(data if data is not None else {}, Path.cwd() if base_dir is None else Path(base_dir))
