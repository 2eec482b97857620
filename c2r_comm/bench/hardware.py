"""Hardware profiles for the cost model: link bandwidth, sharing and latency per link class (YAML).

A profile is one YAML mapping of the HardwareProfile fields below. `--hardware` takes a profile
name (the file stem of one of c2r_comm/bench/hardware_profiles/*.yaml) or a path to a YAML file;
`--inter-node-gbit` / `--intra-node-gbit` override a rate (the emulation sweeps its link rate).

Link classes: "same_node" (GPU to GPU inside a node: NVLink, PCIe, or loopback copies in the
emulation) and "cross_node" (NIC / network). `*_link` says who owns the bandwidth `*_gbit`:
  per_gpu:  every GPU has its own port of that rate, each direction (NVSwitch ports; a
            rail-optimised cluster with one 400 Gb/s NIC per GPU);
  per_node: the node's GPUs share one link of that rate, each direction (one NIC per node; the
            netns emulation: one veth per node shaped with tc tbf on both ends).
Rates are nominal line rates in Gbit/s (1e9 bit/s); `*_efficiency` (0 < e <= 1) is the fraction a
collective achieves, so the model uses gbit * efficiency. Latency is per message (a non-empty
sender -> receiver transfer of one stage); `stage_overhead_us` is a fixed cost per exchange stage
(collective launch, synchronisation).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from c2r_comm.config import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent / "hardware_profiles"
LINK_SHARING = ("per_gpu", "per_node")


def _field(source: str, name: str) -> str:
    return f"{source}: {name}"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    intra_node_gbit: float  # per GPU port (per_gpu) or per node (per_node), each direction
    inter_node_gbit: float  # per NIC: one per GPU (per_gpu) or one per node (per_node), each direction
    intra_node_link: str = "per_gpu"
    inter_node_link: str = "per_gpu"
    intra_node_latency_us: float = 0.0  # per message
    inter_node_latency_us: float = 0.0
    intra_node_efficiency: float = 1.0
    inter_node_efficiency: float = 1.0
    stage_overhead_us: float = 0.0  # per exchange stage that moves any row off its rank
    source: str = "<inline>"  # the file it came from (error messages)

    def __post_init__(self) -> None:
        src = self.source
        for name in ("name", "description"):
            v = getattr(self, name)
            if not isinstance(v, str) or (name == "name" and not v.strip()):
                raise ConfigError(_field(src, name), v, "a non-empty string" if name == "name" else "a string")
        for name in ("intra_node_gbit", "inter_node_gbit"):
            _check_number(src, name, getattr(self, name), "a rate in Gbit/s > 0", lambda x: x > 0)
        for name in ("intra_node_latency_us", "inter_node_latency_us", "stage_overhead_us"):
            _check_number(src, name, getattr(self, name), "microseconds >= 0", lambda x: x >= 0)
        for name in ("intra_node_efficiency", "inter_node_efficiency"):
            _check_number(src, name, getattr(self, name), "a fraction 0 < efficiency <= 1", lambda x: 0 < x <= 1)
        for name in ("intra_node_link", "inter_node_link"):
            if getattr(self, name) not in LINK_SHARING:
                raise ConfigError(_field(src, name), getattr(self, name), f"one of {LINK_SHARING}")

    def bytes_per_second(self, link_class: str) -> float:
        """Achieved bandwidth of one link of `link_class` ("same_node" | "cross_node"), each direction."""
        if link_class == "same_node":
            return self.intra_node_gbit * self.intra_node_efficiency * 1e9 / 8
        if link_class == "cross_node":
            return self.inter_node_gbit * self.inter_node_efficiency * 1e9 / 8
        raise ValueError(f"link class {link_class!r} is unknown: allowed 'same_node', 'cross_node'")

    def latency_s(self, link_class: str) -> float:
        return (self.intra_node_latency_us if link_class == "same_node" else self.inter_node_latency_us) * 1e-6

    def sharing(self, link_class: str) -> str:
        return self.intra_node_link if link_class == "same_node" else self.inter_node_link

    def with_rates(self, inter_node_gbit: Optional[float] = None,
                   intra_node_gbit: Optional[float] = None) -> "HardwareProfile":
        """This profile with the given rates replaced (None: keep); rates must be > 0."""
        for flag, v in (("--inter-node-gbit", inter_node_gbit), ("--intra-node-gbit", intra_node_gbit)):
            if v is not None:
                _check_number("command line", flag, v, "a rate in Gbit/s > 0", lambda x: x > 0, plain=True)
        changes = {k: v for k, v in (("inter_node_gbit", inter_node_gbit), ("intra_node_gbit", intra_node_gbit))
                   if v is not None}
        return replace(self, **changes) if changes else self

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_number(source: str, name: str, value: Any, allowed: str, ok, plain: bool = False) -> None:
    good = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and ok(value)
    if not good:
        raise ConfigError(name if plain else _field(source, name), value, allowed)


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_from_mapping(doc: Any, source: str) -> HardwareProfile:
    """A HardwareProfile from a parsed YAML document; unknown or missing fields raise ConfigError."""
    if not isinstance(doc, Mapping):
        raise ConfigError(_field(source, "<document>"), type(doc).__name__, "a YAML mapping of profile fields")
    names = [f.name for f in fields(HardwareProfile) if f.name != "source"]
    unknown = sorted(set(doc) - set(names))
    if unknown:
        raise ConfigError(_field(source, str(unknown[0])), doc[unknown[0]], f"a field of {names}")
    required = [f.name for f in fields(HardwareProfile) if f.default is MISSING]
    missing = [n for n in required if n not in doc]
    if missing:
        raise ConfigError(_field(source, missing[0]), None, f"a value (required fields: {required})")
    return HardwareProfile(**dict(doc), source=source)


def load_profile(name_or_path: str) -> HardwareProfile:
    """A profile by name (c2r_comm/bench/hardware_profiles/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError("--hardware", name_or_path, f"an existing YAML file or a profile name of {known_profiles()}")
    else:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError("--hardware", name_or_path, f"a profile name of {known_profiles()} or a path to a YAML file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(_field(str(path), "<document>"), "unparsable YAML", f"valid YAML ({exc})") from None
    return profile_from_mapping(doc, str(path))
