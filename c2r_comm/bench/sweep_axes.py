"""The axes of a sweep YAML, one loader each: the trace source, placements, routings, topologies.

Each loader checks one entry and raises a ConfigError naming the sweep field (dotted, with list
indices, e.g. `routings[2].top_t`), the value and what is allowed (see sweep_spec.py for the YAML).
Paths are relative to the directory the sweep runs in and are returned absolute.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from c2r_comm.config import Config, ConfigError, check_top_t, parse_topology, with_overrides
from c2r_comm.plan import PlanFile
from c2r_comm.routing.factory import load_collaborators
from c2r_comm.routing.trace import RoutingTrace, parse_range
from c2r_comm.topology import Topology

PLACEMENT_METHODS = ("contiguous", "occult_greedy", "hypergraph", "random")
PLANNED_METHODS = ("occult_greedy", "hypergraph", "random")  # `c2r-comm plan` fits these on the trace
ROUTING_KINDS = ("trace", "topk", "c2r", "device_constrained")


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
        return self.method in PLANNED_METHODS


def check_int(value: Any, field: str, lo: int) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
    if not ok:
        raise ConfigError(field, value, f"an integer >= {lo}")
    return int(value)


def check_file(value: Any, field: str, base_dir: Path, what: str) -> str:
    """An existing file, relative to base_dir; returned absolute."""
    if not isinstance(value, str) or not value:
        raise ConfigError(field, value, f"a path to {what}")
    path = (base_dir / value).resolve()
    if not path.is_file():
        raise ConfigError(field, value, f"a path to {what} (no such file: {path})")
    return str(path)


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


def load_trace(data: Mapping, base_dir: Path, layer: int, needs_plans: bool) -> Optional[TraceSource]:
    """The sweep's `trace`, `fit_prompts`, `eval_prompts` (and `layer` checked against the trace)."""
    if data.get("trace") is None:
        for key in ("fit_prompts", "eval_prompts"):
            if key in data:
                raise ConfigError(key, data[key], "only together with `trace` (a routing trace .npz)")
        return None
    path = check_file(data["trace"], "trace", base_dir, "a routing trace .npz")
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


def load_placement(value: Any, i: int, base_dir: Path, trace: Optional[TraceSource]) -> PlacementAxis:
    field = f"placements[{i}]"
    allowed = f"one of {PLACEMENT_METHODS} or {{plan: PATH}} (a plan JSON from `c2r-comm plan`)"
    if isinstance(value, Mapping):
        if set(value) != {"plan"}:
            raise ConfigError(field, value, allowed)
        return PlacementAxis("file", check_file(value["plan"], f"{field}.plan", base_dir,
                                                "a plan JSON (c2r-comm plan)"))
    if value not in PLACEMENT_METHODS:
        raise ConfigError(field, value, allowed)
    if value != "contiguous" and trace is None:
        raise ConfigError(field, value, "contiguous or {plan: PATH} (planning with "
                                        f"{value} needs `trace`, the routing trace it is fit on)")
    return PlacementAxis(value)


def load_routing(value: Any, i: int, base_dir: Path, trace: Optional[TraceSource], base: Config) -> RoutingAxis:
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
            lists = check_file(lists, f"{field}.collaborators", base_dir, "a profiler .npz (c2r-comm profile --out)")
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
        return RoutingAxis(kind, max_groups=check_int(value.get("max_groups"), f"{field}.max_groups", 1), level=level)
    return RoutingAxis("topk")


def load_topology(value: Any, i: int, base: Config) -> Topology:
    """A topology the base config accepts: the bench config's own validation decides (num_experts must
    be a multiple of the world size, ...), its error is reported under `topologies[i]`."""
    field = f"topologies[{i}]"
    try:
        topo = Topology(*parse_topology(value if isinstance(value, str) else repr(value)))
    except ConfigError:
        raise ConfigError(field, value, "NODESxGPUS_PER_NODE with both >= 1, e.g. '1x4' or '2x2'") from None
    try:
        with_overrides(base, {"parallel.nodes": topo.nodes, "parallel.gpus_per_node": topo.gpus_per_node})
    except ConfigError as exc:
        raise ConfigError(field, value, f"a topology the bench config accepts ({exc.field_name} = {exc.value!r}: "
                                        f"allowed {exc.allowed})") from None
    return topo


def check_plan_file(p: PlacementAxis, i: int, topologies: tuple[Topology, ...], base: Config) -> None:
    """A {plan: PATH} placement must hold a plan of the sweep's layer for every topology."""
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
