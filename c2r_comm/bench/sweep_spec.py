"""Sweep YAML -> a frozen, validated SweepSpec, and its expansion into bench launches.

A sweep is the grid dispatchers x placements x routings x topologies x inter-node rates (x overlap
degrees). Cells that share (topology, routing, placement, rate) run all their dispatchers in one
`c2r-comm bench` launch. Every error is a ConfigError naming the sweep field (dotted, with list
indices, e.g. `routings[2].top_t`), the value and what is allowed, raised while loading, before
anything runs. Relative paths in the YAML are relative to the directory the sweep runs in (as every
other c2r-comm path flag); they are stored absolute.

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
    overlap_degrees: [1]
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

from c2r_comm.config import (DISPATCHERS, Config, ConfigError, check_top_t, config_from_dict, load_config,
                             parse_topology, with_overrides)
from c2r_comm.plan import PlanFile
from c2r_comm.routing.factory import load_collaborators
from c2r_comm.routing.trace import RoutingTrace, parse_range
from c2r_comm.topology import Topology

PLACEMENT_METHODS = ("contiguous", "occult_greedy", "hypergraph", "random")
ROUTING_KINDS = ("trace", "topk", "c2r", "device_constrained")
OVERLAP_DEGREES = (1,)  # the overlap scheduler (c2r_comm/schedule/overlap.py) does not exist yet
FIELDS = ("name", "base", "trace", "layer", "fit_prompts", "eval_prompts", "dispatchers", "placements", "routings",
          "topologies", "emulate", "rates", "intra_node_gbit", "overlap_degrees", "iters", "warmup_iters",
          "launch_timeout_s")
BASE_SECTIONS = ("model", "run", "routing")
AXIS_OWNED = {"parallel": "topologies", "dispatcher": "dispatchers", "placement": "placements",
              "run.iters": "iters", "run.warmup_iters": "warmup_iters", "routing.kind": "routings",
              "routing.top_t": "routings", "routing.collaborators": "routings", "routing.max_groups": "routings",
              "routing.level": "routings"}


@dataclass(frozen=True)
class TraceSource:
    path: str  # absolute
    layer: int
    fit_prompts: Optional[str]  # "A:B"; None: the planner's default (first 80% of the prompts)
    eval_prompts: Optional[str]  # "C:D"; None: all prompts for replay, the rest after fit for plans
    num_experts: int
    top_k: int
    eval_tokens: int  # tokens in eval_prompts (replay deals tokens_per_rank of them to each rank)


@dataclass(frozen=True)
class RoutingAxis:
    kind: str  # one of ROUTING_KINDS; "trace" replays the sweep's trace
    top_t: Optional[int] = None  # c2r
    collaborators: Optional[str] = None  # c2r: a profiler .npz; None = `c2r-comm profile` of the trace
    max_groups: Optional[int] = None  # device_constrained
    level: str = "gpu"  # device_constrained: gpu | node

    @property
    def label(self) -> str:
        if self.kind == "c2r":
            return f"c2r T={self.top_t}"
        if self.kind == "device_constrained":
            return f"device_constrained {self.level}<={self.max_groups}"
        return self.kind


@dataclass(frozen=True)
class PlacementAxis:
    method: str  # one of PLACEMENT_METHODS, or "file"
    plan_file: Optional[str] = None  # method "file": an existing plan JSON (absolute path)

    @property
    def label(self) -> str:
        return f"plan {Path(self.plan_file).name}" if self.method == "file" else self.method

    @property
    def needs_planning(self) -> bool:
        return self.method in ("occult_greedy", "hypergraph", "random")


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
        text = f"{self.index:03d}-{self.topology}-{self.routing.label}-{self.placement.label}{rate}"
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
                                "routing.kind": "topk" if r.kind == "trace" else r.kind, "placement.plan": plan_path}
        if r.kind == "c2r":
            over.update({"routing.top_t": r.top_t, "routing.collaborators": r.collaborators or collaborators_path})
        if r.kind == "device_constrained":
            over.update({"routing.max_groups": r.max_groups, "routing.level": r.level})
        try:
            return with_overrides(self.base, over)
        except ConfigError as exc:
            raise ConfigError(f"launch {launch.name}: {exc.field_name}", exc.value, exc.allowed) from None


# ---- loading -----------------------------------------------------------------------------------

def _int(value: Any, field: str, lo: int) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
    if not ok:
        raise ConfigError(field, value, f"an integer >= {lo}")
    return int(value)


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


def _path(value: Any, field: str, base_dir: Path, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(field, value, f"a path to {what}")
    path = (base_dir / value).resolve()
    if not path.is_file():
        raise ConfigError(field, value, f"a path to {what} (no such file: {path})")
    return str(path)


def _base_config(data: Any, base_dir: Path, layer: int) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("base", data, f"a mapping: optional `config: PATH`, then sections {BASE_SECTIONS}")
    merged = Config().to_dict()
    if "config" in data:
        merged = load_config(_path(data["config"], "base.config", base_dir, "a bench config YAML")).to_dict()
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


def _prompt_range(data: Mapping, key: str) -> Optional[str]:
    text = data.get(key)
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError
        parse_range(text)
    except ValueError:
        raise ConfigError(key, text, "a prompt range 'A:B' (0-based, slice style, either end may be empty)") from None
    return text


def _trace(data: Mapping, base_dir: Path, layer: int, needs_plans: bool) -> Optional[TraceSource]:
    if data.get("trace") is None:
        for key in ("fit_prompts", "eval_prompts"):
            if key in data:
                raise ConfigError(key, data[key], "only together with `trace` (a routing trace .npz)")
        return None
    path = _path(data["trace"], "trace", base_dir, "a routing trace .npz")
    try:
        trace = RoutingTrace.load(path)
    except ValueError as exc:
        raise ConfigError("trace", data["trace"], f"a readable routing trace .npz ({exc})") from None
    if layer >= trace.num_layers:
        raise ConfigError("layer", layer, f"a 0-based layer index 0..{trace.num_layers - 1} of the trace")
    fit, ev = _prompt_range(data, "fit_prompts"), _prompt_range(data, "eval_prompts")
    for key, text in (("fit_prompts", fit), ("eval_prompts", ev)):
        if text is not None and not range(trace.num_prompts)[slice(*parse_range(text))]:
            raise ConfigError(key, text, f"a range selecting some of the trace's {trace.num_prompts} prompts")
    if needs_plans and fit is not None and ev is None and \
            range(trace.num_prompts)[slice(*parse_range(fit))].stop >= trace.num_prompts:
        raise ConfigError("fit_prompts", fit, "a range leaving prompts to score plans on, or also give eval_prompts")
    eval_tokens = trace.select_prompts(*parse_range(ev)).num_tokens
    return TraceSource(path, layer, fit, ev, trace.num_experts, trace.top_k, eval_tokens)


def _placement(value: Any, i: int, base_dir: Path, trace: Optional[TraceSource]) -> PlacementAxis:
    field = f"placements[{i}]"
    allowed = f"one of {PLACEMENT_METHODS} or {{plan: PATH}} (a plan JSON from `c2r-comm plan`)"
    if isinstance(value, Mapping):
        if set(value) != {"plan"}:
            raise ConfigError(field, value, allowed)
        return PlacementAxis("file", _path(value["plan"], f"{field}.plan", base_dir, "a plan JSON (c2r-comm plan)"))
    if value not in PLACEMENT_METHODS:
        raise ConfigError(field, value, allowed)
    if value != "contiguous" and trace is None:
        raise ConfigError(field, value, "contiguous or {plan: PATH} (planning with "
                                        f"{value} needs `trace`, the routing trace it is fit on)")
    return PlacementAxis(value)


def _routing(value: Any, i: int, base_dir: Path, trace: Optional[TraceSource], base: Config) -> RoutingAxis:
    field = f"routings[{i}]"
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or value.get("kind") not in ROUTING_KINDS:
        raise ConfigError(field, value, f"one of {ROUTING_KINDS} or a mapping with `kind` (and for c2r `top_t`, "
                                        "optional `collaborators`; for device_constrained `max_groups`, `level`)")
    kind = value["kind"]
    known = {"trace": {"kind"}, "topk": {"kind"}, "c2r": {"kind", "top_t", "collaborators"},
             "device_constrained": {"kind", "max_groups", "level"}}[kind]
    for key in value:
        if key not in known:
            raise ConfigError(f"{field}.{key}", value[key], f"fields of a {kind} routing: {sorted(known)}")
    if kind == "trace":
        if trace is None:
            raise ConfigError(field, "trace", "a router routing, or set `trace` (the routing trace to replay)")
        return RoutingAxis("trace")
    if kind == "c2r":
        m = base.model
        top_t = check_top_t(value.get("top_t"), m.num_experts, m.top_k, field_name=f"{field}.top_t")
        lists = value.get("collaborators")
        if lists is None and trace is None:
            raise ConfigError(f"{field}.collaborators", None, "a profiler .npz (c2r-comm profile --out), or set "
                                                              "`trace` to profile it from")
        if lists is not None:
            lists = _path(lists, f"{field}.collaborators", base_dir, "a profiler .npz (c2r-comm profile --out)")
            try:
                load_collaborators(lists, base.placement.layer, m.num_experts, top_t)
            except ValueError as exc:
                raise ConfigError(f"{field}.collaborators", value["collaborators"],
                                  f"collaborator lists for layer {base.placement.layer} ({exc})") from None
        return RoutingAxis("c2r", top_t=top_t, collaborators=lists)
    if kind == "device_constrained":
        level = value.get("level", "gpu")
        if level not in ("gpu", "node"):
            raise ConfigError(f"{field}.level", level, "'gpu' or 'node'")
        return RoutingAxis(kind, max_groups=_int(value.get("max_groups"), f"{field}.max_groups", 1), level=level)
    return RoutingAxis("topk")


def _topology(value: Any, i: int, num_experts: int) -> Topology:
    field = f"topologies[{i}]"
    try:
        topo = Topology(*parse_topology(value if isinstance(value, str) else repr(value)))
    except ConfigError:
        raise ConfigError(field, value, "NODESxGPUS_PER_NODE with both >= 1, e.g. '1x4' or '2x2'") from None
    if num_experts % topo.world_size:
        raise ConfigError(field, value, f"a topology whose nodes*gpus_per_node divides model.num_experts = {num_experts}")
    return topo


def _check_plan_file(p: PlacementAxis, i: int, topologies: tuple[Topology, ...], base: Config) -> None:
    try:
        plan = PlanFile.load(p.plan_file)
    except ValueError as exc:
        raise ConfigError(f"placements[{i}].plan", p.plan_file, f"a readable plan JSON ({exc})") from None
    layer = base.placement.layer
    for topo in topologies:
        try:
            plan.plan_for_layer(layer, topo, base.model.num_experts)
        except ValueError as exc:
            raise ConfigError(f"placements[{i}].plan", p.plan_file,
                              f"a plan for every topology of the sweep, layer {layer} ({exc})") from None


def spec_from_dict(data: Any, base_dir: Path) -> SweepSpec:
    if not isinstance(data, Mapping):
        raise ConfigError("<top level>", data, f"a mapping with fields {FIELDS}")
    for key in data:
        if key not in FIELDS:
            raise ConfigError(str(key), data[key], f"known sweep fields: {FIELDS}")
    name = data.get("name", "sweep")
    if not isinstance(name, str) or not name:
        raise ConfigError("name", name, "a non-empty string")
    needs_plans = any(p in ("occult_greedy", "hypergraph", "random") for p in data.get("placements") or [])
    layer = _int(data.get("layer", 0), "layer", 0)
    trace = _trace(data, base_dir, layer, needs_plans)
    base = _base_config(data.get("base"), base_dir, layer)
    over = {"run.iters": _int(data.get("iters", 10), "iters", 1),
            "run.warmup_iters": _int(data.get("warmup_iters", 2), "warmup_iters", 0)}
    if trace is not None:
        over.update({"model.num_experts": trace.num_experts, "model.top_k": trace.top_k})
    base = with_overrides(base, over)
    dispatchers = _list(data, "dispatchers", list(DISPATCHERS))
    for i, d in enumerate(dispatchers):
        if d not in DISPATCHERS:
            raise ConfigError(f"dispatchers[{i}]", d, f"one of {DISPATCHERS}")
    topologies = tuple(_topology(t, i, base.model.num_experts) for i, t in enumerate(_list(data, "topologies")))
    routings = tuple(_routing(r, i, base_dir, trace, base)
                     for i, r in enumerate(_list(data, "routings", ["trace" if trace is not None else "topk"])))
    if any(r.kind == "trace" for r in routings):
        for i, topo in enumerate(topologies):
            most = trace.eval_tokens // topo.world_size
            if base.run.tokens_per_rank > most:
                raise ConfigError("base.run.tokens_per_rank", base.run.tokens_per_rank,
                                  f"at most {most}: eval_prompts hold {trace.eval_tokens} tokens of the trace for "
                                  f"the {topo.world_size} ranks of topologies[{i}] = {topo}")
    placements = tuple(_placement(p, i, base_dir, trace) for i, p in enumerate(_list(data, "placements",
                                                                                       ["contiguous"])))
    for i, p in enumerate(placements):
        if p.method == "file":
            _check_plan_file(p, i, topologies, base)
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
        if d not in OVERLAP_DEGREES:
            raise ConfigError(f"overlap_degrees[{i}]", d, f"only {list(OVERLAP_DEGREES)}: the overlap scheduler "
                                                          "(c2r_comm/schedule/overlap.py) does not exist yet")
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
