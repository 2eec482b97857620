"""PlacementPlan: which ranks host each expert, and in which local slot; plan files (JSON).

A plan only moves experts between ranks; it never changes results. Every expert has one primary
rank (`expert_to_rank`); a plan with replicas also gives every rank R replica slots
(`replicas[r]`: the experts whose copies rank r holds), so an expert lives on its primary and on
up to R other ranks. Local slots on a rank are its primaries in ascending global id, then its
replicas in ascending global id; without replicas a plan is fully described by `expert_to_rank`.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported by the tensor methods below when first used: plan files load without it
    import torch

from c2r_comm.topology import Topology


def check_copy_load_cap(cap: Any, field: str) -> Optional[float]:
    """A replica plan's copy_load_cap (replica_choice.py) as a float, or None; ValueError naming
    `field` unless it is a finite max/mean >= 1.0. Planner options and plans both check it here."""
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not (math.isfinite(cap) and cap >= 1.0):
        raise ValueError(f"{field} = {cap!r} is invalid: allowed a finite max/mean >= 1.0 (or None)")
    return float(cap)


@dataclass(frozen=True)
class PlacementPlan:
    expert_to_rank: tuple[int, ...]  # primary rank of each expert
    world_size: int
    # replicas[r]: experts rank r holds a copy of (ascending); () = no replicas. Every rank holds
    # the same number R of them, never its own primaries, and an expert has at most R copies.
    replicas: tuple[tuple[int, ...], ...] = ()
    # With replicas: the per-rank load (rows of one dispatch batch, max/mean) above which the copy
    # choice trades a little cover for balance (placement/replica_choice.py); None: load only
    # breaks ties between equally small covers.
    copy_load_cap: Optional[float] = None

    def __post_init__(self) -> None:
        e2r = tuple(int(r) for r in self.expert_to_rank)
        object.__setattr__(self, "expert_to_rank", e2r)
        replicas = tuple(tuple(sorted(int(e) for e in rep)) for rep in self.replicas)
        object.__setattr__(self, "replicas", replicas if any(replicas) else ())  # all empty: no replicas
        E, W = len(e2r), self.world_size
        if W < 1 or E < 1:
            raise ValueError(f"PlacementPlan needs >= 1 expert and >= 1 rank, got {E} experts, {W} ranks")
        if E % W:
            raise ValueError(f"PlacementPlan: {E} experts cannot be split equally over {W} ranks")
        bad = [r for r in e2r if not 0 <= r < W]
        if bad:
            raise ValueError(f"PlacementPlan: ranks {sorted(set(bad))} are outside 0..{W - 1}")
        counts = np.bincount(np.asarray(e2r), minlength=W)
        if (counts != E // W).any():
            raise ValueError(f"PlacementPlan: every rank must host {E // W} experts, got per-rank counts {counts.tolist()}")
        if self.replicas:
            self._check_replicas()
        if self.copy_load_cap is not None:
            cap = check_copy_load_cap(self.copy_load_cap, "PlacementPlan: copy_load_cap")
            if not self.replicas:
                raise ValueError("PlacementPlan: copy_load_cap needs replicas (without them a choice has one copy)")
            object.__setattr__(self, "copy_load_cap", cap)

    def _check_replicas(self) -> None:
        E, W, rep = self.num_experts, self.world_size, self.replicas
        if len(rep) != W:
            raise ValueError(f"PlacementPlan: replicas must list every rank's replica slots ({W} lists), got {len(rep)}")
        R = len(rep[0])
        if any(len(r) != R for r in rep):
            raise ValueError(f"PlacementPlan: every rank needs the same number of replica slots, got "
                             f"{[len(r) for r in rep]}")
        copies = np.zeros(E, dtype=np.int64)
        for r, experts in enumerate(rep):
            bad = [e for e in experts if not 0 <= e < E]
            if bad:
                raise ValueError(f"PlacementPlan: rank {r}'s replicas name experts {bad} outside 0..{E - 1}")
            if len(set(experts)) != len(experts):
                raise ValueError(f"PlacementPlan: rank {r} holds a replica of one expert twice: {list(experts)}")
            own = [e for e in experts if self.expert_to_rank[e] == r]
            if own:
                raise ValueError(f"PlacementPlan: rank {r} holds replicas of its own primary experts {own}")
            copies[list(experts)] += 1
        if R and copies.max() > R:
            raise ValueError(f"PlacementPlan: expert {int(copies.argmax())} has {int(copies.max())} replicas, allowed "
                             f"at most {R} (the replica slots per rank)")

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "PlacementPlan":
        """Megatron's default: rank r hosts experts [r*E/W, (r+1)*E/W)."""
        if world_size < 1 or num_experts % world_size:
            raise ValueError(f"{num_experts} experts cannot be split equally over {world_size} ranks")
        per = num_experts // world_size
        return cls(tuple(e // per for e in range(num_experts)), world_size)

    @classmethod
    def random(cls, num_experts: int, world_size: int, seed: int) -> "PlacementPlan":
        base = np.asarray(cls.contiguous(num_experts, world_size).expert_to_rank)
        return cls(tuple(np.random.default_rng(seed).permutation(base).tolist()), world_size)

    # ---- derived maps -------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def primaries_per_rank(self) -> int:
        return self.num_experts // self.world_size

    @property
    def replica_slots(self) -> int:
        """R: replica slots per rank (0 without replicas)."""
        return len(self.replicas[0]) if self.replicas else 0

    @property
    def experts_per_rank(self) -> int:
        """Local expert slots per rank: E/W primaries + R replicas."""
        return self.primaries_per_rank + self.replica_slots

    @cached_property
    def rank_experts(self) -> tuple[tuple[int, ...], ...]:
        """rank_experts[r][slot] = global expert id: primaries ascending, then replicas ascending."""
        out: list[list[int]] = [[] for _ in range(self.world_size)]
        for e, r in enumerate(self.expert_to_rank):
            out[r].append(e)
        for r, experts in enumerate(self.replicas):
            out[r].extend(experts)
        return tuple(tuple(x) for x in out)

    @cached_property
    def expert_to_slot(self) -> tuple[int, ...]:
        """Local slot of each expert on its primary rank."""
        slot = [0] * self.num_experts
        for r, experts in enumerate(self.rank_experts):
            for s, e in enumerate(experts[:self.primaries_per_rank]):
                slot[e] = s
        return tuple(slot)

    @cached_property
    def hosts_of_expert(self) -> tuple[tuple[int, ...], ...]:
        """hosts_of_expert[e] = (primary rank, replica ranks ascending)."""
        hosts = [[r] for r in self.expert_to_rank]
        for r, experts in enumerate(self.replicas):
            for e in experts:
                hosts[e].append(r)
        return tuple(tuple(h) for h in hosts)

    @cached_property
    def slot_on_rank(self) -> dict[tuple[int, int], int]:
        """(expert, rank) -> local slot, for every copy."""
        return {(e, r): s for r, experts in enumerate(self.rank_experts) for s, e in enumerate(experts)}

    @property
    def max_hosts(self) -> int:
        """H: the most ranks any expert lives on (1 without replicas)."""
        return max(len(h) for h in self.hosts_of_expert)

    def rank_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch
        return torch.tensor(self.expert_to_rank, dtype=torch.long, device=device)

    def slot_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch
        return torch.tensor(self.expert_to_slot, dtype=torch.long, device=device)

    def host_tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(ranks, slots) int64 [E, H]: every copy of each expert, primary first; an expert with
        fewer than H copies repeats its primary (so any column is a valid copy)."""
        import torch
        H = self.max_hosts
        ranks = [list(h) + [h[0]] * (H - len(h)) for h in self.hosts_of_expert]
        slots = [[self.slot_on_rank[(e, r)] for r in row] for e, row in enumerate(ranks)]
        return (torch.tensor(ranks, dtype=torch.long, device=device),
                torch.tensor(slots, dtype=torch.long, device=device))

    def fingerprint(self) -> int:
        """Cheap, stable 62-bit hash, exchanged across ranks to catch plans that differ."""
        what: list = [self.world_size, self.expert_to_rank]
        if self.replicas:
            what.append(self.replicas)
        if self.copy_load_cap is not None:
            what.append(self.copy_load_cap)
        digest = hashlib.sha256(json.dumps(what).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 2

    def check_matches(self, num_experts: int, world_size: int, what: str = "run") -> None:
        if self.num_experts != num_experts or self.world_size != world_size:
            raise ValueError(
                f"placement plan is for {self.num_experts} experts on {self.world_size} ranks, but the {what} "
                f"has {num_experts} experts on {world_size} ranks")


@dataclass(frozen=True)
class PlanFile:
    """One JSON document of per-layer plans (layers keyed by 0-based trace layer index)."""

    topology: Topology
    num_experts: int
    layers: Mapping[int, PlacementPlan]
    method: str
    metrics: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)

    def plan_for_layer(self, layer: int, topology: Topology, num_experts: int) -> PlacementPlan:
        if (self.topology.nodes, self.topology.gpus_per_node) != (topology.nodes, topology.gpus_per_node):
            raise ValueError(f"plan file is for topology {self.topology} but the run uses {topology}")
        if self.num_experts != num_experts:
            raise ValueError(f"plan file is for {self.num_experts} experts but the run has {num_experts}")
        if layer not in self.layers:
            raise ValueError(f"plan file has no plan for layer {layer}; it has layers {sorted(self.layers)}")
        return self.layers[layer]

    def to_json(self) -> dict:
        return {
            "topology": {"nodes": self.topology.nodes, "gpus_per_node": self.topology.gpus_per_node},
            "num_experts": self.num_experts,
            "layers": {str(l): {"expert_to_rank": list(p.expert_to_rank),
                                **({"replicas": [list(r) for r in p.replicas]} if p.replicas else {}),
                                **({"copy_load_cap": p.copy_load_cap} if p.copy_load_cap is not None else {}),
                                "metrics": dict(self.metrics.get(l, {}))}
                       for l, p in sorted(self.layers.items())},
            "method": self.method,
            "fit": dict(self.fit),
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, doc: Any, source: str = "plan file") -> "PlanFile":
        """Parse a plan document; `source` (e.g. "plan file PATH") starts every error. Nothing is coerced:
        counts and ranks must be JSON integers (no floats, bools or strings)."""
        def bad(where: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"{source}: field '{where}' = {_short(value)} is invalid: allowed {allowed}")

        def integer(where: str, value: Any, lo: int) -> int:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= lo):
                raise bad(where, value, f"an integer >= {lo}")
            return value

        def member(mapping: Any, key: str, where: str) -> Any:
            if key not in mapping:
                raise ValueError(f"{source}: missing field '{where}{key}'")
            return mapping[key]

        if not isinstance(doc, Mapping):
            raise bad("<top level>", doc, "a JSON object with topology, num_experts and layers")
        topo_doc = member(doc, "topology", "")
        if not isinstance(topo_doc, Mapping):
            raise bad("topology", topo_doc, "an object {nodes, gpus_per_node}")
        topo = Topology(integer("topology.nodes", member(topo_doc, "nodes", "topology."), 1),
                        integer("topology.gpus_per_node", member(topo_doc, "gpus_per_node", "topology."), 1))
        num_experts = integer("num_experts", member(doc, "num_experts", ""), 1)
        layers_doc = member(doc, "layers", "")
        if not isinstance(layers_doc, Mapping):
            raise bad("layers", layers_doc, 'an object keyed by 0-based layer index, e.g. {"0": {"expert_to_rank": '
                                            "[...]}}")
        layers, metrics = {}, {}
        for key, entry in layers_doc.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise bad(f"layers.{key}", entry, "keys that are 0-based layer indices (\"0\", \"1\", ...)")
            if not isinstance(entry, Mapping):
                raise bad(f"layers.{key}", entry, "an object {expert_to_rank, metrics}")
            e2r = member(entry, "expert_to_rank", f"layers.{key}.")
            allowed = "a list of integers (expert_to_rank[e] = the rank hosting expert e)"
            if not isinstance(e2r, list):
                raise bad(f"layers.{key}.expert_to_rank", e2r, allowed)
            for e, r in enumerate(e2r):
                if not isinstance(r, int) or isinstance(r, bool):
                    raise bad(f"layers.{key}.expert_to_rank[{e}]", r, allowed)
            replicas = entry.get("replicas", [])
            allowed_rep = "a list with one list of expert ids per rank (the experts whose copies it holds)"
            if not isinstance(replicas, list) or not all(isinstance(r, list) for r in replicas):
                raise bad(f"layers.{key}.replicas", replicas, allowed_rep)
            for r, experts in enumerate(replicas):
                for i, e in enumerate(experts):
                    if not isinstance(e, int) or isinstance(e, bool):
                        raise bad(f"layers.{key}.replicas[{r}][{i}]", e, allowed_rep)
            cap = entry.get("copy_load_cap")
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))):
                raise bad(f"layers.{key}.copy_load_cap", cap, "a number >= 1.0 (per-rank load max/mean) or absent")
            try:
                plan = PlacementPlan(tuple(e2r), topo.world_size, tuple(tuple(r) for r in replicas), cap)
                plan.check_matches(num_experts, topo.world_size, what=f"plan file's header (layer {key})")
            except ValueError as exc:
                raise ValueError(f"{source}: layer {key}: {exc}") from None
            layers[int(key)] = plan
            layer_metrics = entry.get("metrics", {})
            if not isinstance(layer_metrics, Mapping):
                raise bad(f"layers.{key}.metrics", layer_metrics, "an object")
            metrics[int(key)] = dict(layer_metrics)
        fit = doc.get("fit", {})
        if not isinstance(fit, Mapping):
            raise bad("fit", fit, "an object")
        return cls(topo, num_experts, layers, str(doc.get("method", "unknown")), metrics, dict(fit))

    @classmethod
    def load(cls, path: str | Path) -> "PlanFile":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"plan file {path} does not exist")
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"plan file {path} is not a JSON text file (not UTF-8): allowed a plan JSON written "
                             "by `c2r-comm plan`") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan file {path} is not valid JSON: line {exc.lineno}, column {exc.colno}: "
                             f"{exc.msg}") from None
        return cls.from_json(doc, source=f"plan file {path}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_layer_plan(path: Optional[str], layer: int, topology: Topology, num_experts: int) -> PlacementPlan:
    """The plan a run uses: from a plan file when given, else contiguous."""
    if path is None:
        return PlacementPlan.contiguous(num_experts, topology.world_size)
    return PlanFile.load(path).plan_for_layer(layer, topology, num_experts)



def distinct_per_token(group_of_expert: np.ndarray, ids_TK: np.ndarray) -> np.ndarray:
    """Number of distinct groups (ranks or nodes) each token's experts live in, [tokens] int64.

    This is the one count every metric builds on: with per-GPU dedup dispatch a token is sent
    once per distinct rank, with node dedup once per distinct node.
    """
    ids_TK = np.asarray(ids_TK, dtype=np.int64)
    if ids_TK.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    g_TK = np.sort(np.asarray(group_of_expert)[ids_TK], axis=1)
    return 1 + (np.diff(g_TK, axis=1) != 0).sum(axis=1)


def expert_to_node(plan: PlacementPlan, topology: Topology) -> np.ndarray:
    topology.check_world_size(plan.world_size)
    return np.asarray(plan.expert_to_rank) // topology.gpus_per_node
