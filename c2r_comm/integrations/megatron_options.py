"""The Megatron-core adapter's options and the TransformerConfig checks, refused before any rank
builds a dispatcher (ValueError naming the option, its value and what is allowed). Importable without
megatron-core: the checks read the config's attributes only."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from c2r_comm.groups import ProcessGroups
from c2r_comm.plan import PlacementPlan

DISPATCHERS = ("dedup", "hierarchical")  # weight at the experts, as Megatron's experts do
MEGATRON_DISPATCHER_TYPES = ("alltoall", "allgather")  # MoELayer.__init__ builds one of these first
_GRAPH_SCOPES_WITHOUT_MOE = {"attn", "mlp", "mamba"}


@dataclass(frozen=True)
class C2RMegatronOptions:
    """dispatcher: "dedup" (one copy per destination rank) or "hierarchical" (one per node).
    nodes: nodes the EP group spans (EP rank r on node r // (EP size / nodes)); None: 1, or the
    topology of `groups`. plan: global expert -> rank / local slot (None: contiguous, Megatron's own).
    groups: process groups from `megatron_process_groups` (build them once for all layers); None:
    each layer builds its own, which needs the EP group to be the whole world.
    timeout_s: timeout of the groups a layer builds. debug_checks: every rank agrees on combine input."""

    dispatcher: str = "dedup"
    nodes: Optional[int] = None
    plan: Optional[PlacementPlan] = None
    groups: Optional[ProcessGroups] = None
    timeout_s: float = 120.0
    debug_checks: bool = False

    def __post_init__(self) -> None:
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"c2r option dispatcher={self.dispatcher!r} is not supported: allowed {DISPATCHERS} "
                             "(megatron-core's own 'alltoall' dispatcher is the baseline)")
        if self.nodes is not None and (not isinstance(self.nodes, int) or isinstance(self.nodes, bool)
                                       or self.nodes < 1):
            raise ValueError(f"c2r option nodes={self.nodes!r} is invalid: allowed None or an integer >= 1")
        if self.plan is not None and not isinstance(self.plan, PlacementPlan):
            raise ValueError(f"c2r option plan={type(self.plan).__name__} is invalid: allowed None or a PlacementPlan")
        if self.groups is not None and not isinstance(self.groups, ProcessGroups):
            raise ValueError(f"c2r option groups={type(self.groups).__name__} is invalid: allowed None or the "
                             "ProcessGroups of megatron_process_groups()")
        if self.groups is not None and self.nodes is not None and self.nodes != self.groups.topology.nodes:
            raise ValueError(f"c2r option nodes={self.nodes} disagrees with groups' topology {self.groups.topology}: "
                             "allowed None or the groups' node count")
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"c2r option timeout_s={self.timeout_s!r} is invalid: allowed a finite number > 0")


def unsupported_option(option: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"megatron option {option}={value!r} is not supported by the c2r token dispatcher: "
                      f"allowed {allowed}")


def check_megatron_config(config) -> None:
    """Refuse TransformerConfig options the adapter does not implement (ValueError naming the option)."""
    etp = config.expert_tensor_parallel_size
    if etp not in (None, 1):
        raise unsupported_option("expert_tensor_parallel_size", etp, "1 (experts are not tensor-parallel)")
    if config.moe_token_dispatcher_type not in MEGATRON_DISPATCHER_TYPES:
        raise unsupported_option("moe_token_dispatcher_type", config.moe_token_dispatcher_type,
                                 f"{MEGATRON_DISPATCHER_TYPES} (MoELayer builds that dispatcher, then C2RMoELayer "
                                 "replaces it; 'alltoall' is needed for moe_shared_expert_overlap)")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        raise unsupported_option("overlap_moe_expert_parallel_comm", True, "False (not verified with the c2r "
                                 "dispatcher: its phases would run on Megatron's communication stream)")
    if config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or ()):
        raise unsupported_option("recompute_modules", list(config.recompute_modules), "a list without 'moe' "
                                 "(recomputing the MoE layer would re-run its exchanges inside backward; not verified)")
    for option, allowed in (("moe_pad_expert_input_to_capacity", "False (capacity mode drops without padding here: "
                             "a padded routing map gives tokens more than moe_router_topk experts)"),
                            ("moe_router_padding_for_quantization", "False"),
                            ("moe_token_dropping", "False")):
        value = getattr(config, option, None)
        if value is not None and value is not False:
            raise unsupported_option(option, value, allowed)
    if config.cuda_graph_impl != "none":
        scopes = config.cuda_graph_scope
        scopes = scopes if isinstance(scopes, (list, tuple)) else [scopes]
        names = {getattr(s, "name", s) for s in scopes}
        if not names or not names <= _GRAPH_SCOPES_WITHOUT_MOE:
            raise unsupported_option("cuda_graph_scope", sorted(map(str, names)),
                                     f"scopes within {sorted(_GRAPH_SCOPES_WITHOUT_MOE)} when cuda_graph_impl is set "
                                     "(the count exchange syncs with the host)")
