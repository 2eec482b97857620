"""Megatron-core adapter: c2r-comm's dedup / hierarchical exchange as a megatron-core token dispatcher.

Select it in a Megatron model by swapping the MoE layer's module in the layer spec
(`use_c2r_dispatcher(spec, C2RMegatronOptions(...))`, or `moe_spec.module = C2RMoELayer` with
`moe_spec.params["c2r"] = options`): megatron-core 0.16.1 builds its dispatcher inside
`MoELayer.__init__` from `config.moe_token_dispatcher_type` and its spec has no dispatcher hook, so
`C2RMoELayer` lets `MoELayer` build everything, then replaces `self.token_dispatcher`.

Phase mapping (megatron-core's `MoELayer.forward` calls them in this order):

    dispatch_preprocess(tokens, routing_map, probs)  [T, E] map/probs -> top-k ids and weights; layout (pure)
    token_dispatch(x_TD, weight_TK)                  count exchange (the one host sync), send, wait;
                                                     returns the expert rows x_PD and their weights weight_P
    dispatch_postprocess(x_PD, weight_P)             -> (x_PD, tokens_per_expert on the CPU, weight_P)
    experts(x_PD, tokens_per_expert, weight_P)       Megatron's experts; they scale each row by its weight
    combine_preprocess(expert_out_PD)                nothing to do (rows are already grouped as sent)
    token_combine(expert_out_PD)                     combine_start(weighted=True), wait -> [T, H]
    combine_postprocess(out_TD)                      back to the input's shape (+ overlapped shared expert)

Routing weights are applied where Megatron's own alltoall dispatcher has them applied: Megatron's
experts multiply each row's activation (and the second linear layer's bias) by its `permuted_probs`,
and combine only sums. The adapter hands the experts
`ExpertBatch.weight_P` (each expert row's weight, differentiable back to `probs`) and combines with
`weighted=True`, so outputs and gradients equal Megatron's own dispatcher's.

Every phase returns real tensors linked for autograd (so Megatron schedules that cut the layer at
the phases, e.g. its expert-parallel overlap, see correct gradients). Overlap that the phase split
allows: with `moe_shared_expert_overlap` the shared expert's first linear layer runs while the
dispatch exchange is in flight and its second while the combine exchange is. c2r-comm's chunk
pipeline (schedule/) cannot run here: Megatron calls its experts once on all rows between
`dispatch_postprocess` and `combine_preprocess`.

Capacity mode (`moe_expert_capacity_factor`, either `moe_token_drop_policy`): Megatron's router
drops the choices over capacity; a routing-map row with fewer than `moe_router_topk` experts
becomes dropped choices (DROPPED_CHOICE) that travel nowhere. `moe_pad_expert_input_to_capacity`
is refused (its routing map gives tokens more than top-k experts); c2r-comm's own layer pads after
the exchange instead (routing.pad_to_capacity).

Per-call state (the ExchangePlan, then the frozen DispatchHandle) lives in frozen `_InFlight`
records, one per micro-batch, queued first-in first-out between the phases; nothing per call is
kept in attributes. Several micro-batches may be in flight: dispatch A, dispatch B, combine A,
combine B (each phase takes the oldest micro-batch waiting for it). A phase called with no
micro-batch waiting for it raises RuntimeError; an exception in any phase drops every micro-batch
in flight (`reset()`), as their exchanges can no longer line up.

In a full TransformerLayer: megatron-core 0.16.1's TransformerLayer recognises its MoE module by
exact class (MoELayer), so it does not hand C2RMoELayer its `pg_collection` (it logs "Unknown MLP
type"); C2RMoELayer then uses Megatron's default process groups (parallel_state), which is what a
model initialised with `initialize_model_parallel` uses anyway. A model with a custom
pg_collection must build the MoE module itself with it.

Placement: Megatron's local expert module i on EP rank r is its global expert r*L + i (that is how
its checkpoints name it); the router's column e is sent to rank `plan.expert_to_rank[e]`, local slot
`plan.expert_to_slot[e]`. With the default (contiguous) plan both agree. With another plan the
module at (r, i) serves router column `expert_at_megatron_position(plan)[r*L + i]`: train with the
same plan throughout, or permute the expert weights of a contiguous checkpoint with that map.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec

from c2r_comm.dispatch import DROPPED_CHOICE, DispatchHandle, Dispatcher, ExchangePlan, InputError, build_dispatcher
from c2r_comm.groups import ProcessGroups, build_process_groups
from c2r_comm.integrations.megatron_options import C2RMegatronOptions, check_megatron_config, unsupported_option
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

def topk_from_routing_map(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, topk: int,
                          dropping: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's [T, E] routing map and probs -> (expert ids [T, K] ascending, their probs [T, K]).

    dropping (moe_expert_capacity_factor set: Megatron's router dropped choices over capacity): a row
    with fewer than `topk` experts fills its last places with DROPPED_CHOICE (weight 0). No host
    sync: a row with more experts (or, without dropping, fewer) gets id E (out of range), which makes
    every rank raise InputError at the count exchange."""
    E = routing_map_TE.shape[1]
    ids = torch.arange(E, device=routing_map_TE.device)
    key_TE = torch.where(routing_map_TE, ids, ids + E)  # chosen experts sort first, by id
    idx_TK = key_TE.topk(topk, dim=1, largest=False, sorted=True).values
    per_row_T = routing_map_TE.sum(dim=1)
    ok_T = per_row_T <= topk if dropping else per_row_T == topk
    idx_TK = torch.where(ok_T.unsqueeze(1), idx_TK, E)
    weight_TK = probs_TE.gather(1, idx_TK.clamp(max=E - 1))
    if dropping:
        chosen_TK = idx_TK < E
        idx_TK = torch.where(chosen_TK | ~ok_T.unsqueeze(1), idx_TK, DROPPED_CHOICE)
        weight_TK = weight_TK * chosen_TK.to(weight_TK.dtype)
    return idx_TK, weight_TK


def expert_at_megatron_position(plan: PlacementPlan) -> tuple[int, ...]:
    """For Megatron's expert position q = r*L + i (EP rank r's local module i, the global index its
    checkpoints give that module), the router column (our global expert id) the module serves."""
    return tuple(e for experts in plan.rank_experts for e in experts)


def megatron_process_groups(nodes: int = 1, timeout_s: float = 120.0, ep_group: Optional[Any] = None) -> ProcessGroups:
    """c2r-comm's process groups over Megatron's expert-parallel group (default: parallel_state's).

    Collective over the whole world: call it once on every rank after
    `parallel_state.initialize_model_parallel`, and pass it as `C2RMegatronOptions(groups=...)`."""
    ep = ep_group if ep_group is not None else parallel_state.get_expert_model_parallel_group()
    size = dist.get_world_size(ep)
    if nodes < 1 or size % nodes:
        raise ValueError(f"nodes={nodes!r} is invalid for an expert-parallel group of {size} ranks: allowed a "
                         "divisor of it")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, tuple(dist.get_process_group_ranks(ep)))
    return build_process_groups(Topology(nodes, size // nodes), timeout_s, ep_group=ep,
                                all_ep_ranks=sorted(set(everyone)))


@dataclass(frozen=True)
class _InFlight:
    """One micro-batch between phases."""

    hidden_shape: torch.Size
    plan: Optional[ExchangePlan] = None  # after dispatch_preprocess
    handle: Optional[DispatchHandle] = None  # after token_dispatch


_STAGES = ("laid_out", "dispatched", "at_experts", "combined")


def _phase(fn: Callable) -> Callable:
    """A phase that fails leaves no micro-batch in flight (their exchanges could not line up)."""
    @functools.wraps(fn)
    def run(self: "C2RTokenDispatcher", *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.reset()
            raise
    return run


class C2RTokenDispatcher(MoETokenDispatcher):
    """megatron-core MoETokenDispatcher running c2r-comm's dedup or hierarchical exchange."""

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config, pg_collection=None,
                 options: Optional[C2RMegatronOptions] = None, label: Optional[str] = None) -> None:
        check_megatron_config(config)
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        options = options if options is not None else C2RMegatronOptions()
        if self.tp_size != 1:
            raise unsupported_option("expert_tensor_parallel_size", self.tp_size, "1 (the expert tensor-parallel "
                                     "group must have one rank)")
        E, ep = config.num_moe_experts, self.ep_size
        plan = options.plan if options.plan is not None else PlacementPlan.contiguous(E, ep)
        if plan.replicas:
            raise ValueError("c2r option plan has replicas: not supported by the Megatron adapter (Megatron's "
                             "experts hold one copy each): allowed a plan without replicas")
        if plan.num_experts != E or plan.world_size != ep or plan.experts_per_rank != num_local_experts:
            raise ValueError(f"c2r option plan is for {plan.num_experts} experts on {plan.world_size} ranks: allowed "
                             f"a plan for num_moe_experts={E} on the expert-parallel group's {ep} ranks")
        self.num_local_experts, self.local_expert_indices = num_local_experts, local_expert_indices
        self.topk = config.moe_router_topk
        self.options = options
        groups = options.groups if options.groups is not None else self._own_groups(options)
        if tuple(dist.get_process_group_ranks(groups.ep)) != tuple(dist.get_process_group_ranks(self.ep_group)):
            raise ValueError(f"c2r option groups spans ranks {dist.get_process_group_ranks(groups.ep)}: allowed "
                             f"groups over this layer's expert-parallel group "
                             f"{dist.get_process_group_ranks(self.ep_group)}")
        hidden = config.moe_latent_size or config.hidden_size
        self.c2r: Dispatcher = build_dispatcher(options.dispatcher, plan, groups, hidden, options.debug_checks, label)
        self._queues: dict[str, deque[_InFlight]] = {s: deque() for s in _STAGES}

    def _own_groups(self, options: C2RMegatronOptions) -> ProcessGroups:
        nodes = options.nodes or 1
        if self.ep_size % nodes:
            raise ValueError(f"c2r option nodes={nodes} does not divide the expert-parallel group's {self.ep_size} "
                             "ranks: allowed a divisor of it")
        if self.ep_size != dist.get_world_size():
            raise ValueError(f"c2r option groups=None needs the expert-parallel group ({self.ep_size} ranks) to be the "
                             f"whole world ({dist.get_world_size()} ranks): allowed groups=megatron_process_groups(...)"
                             ", built once on every rank after initialize_model_parallel")
        return build_process_groups(Topology(nodes, self.ep_size // nodes), options.timeout_s, ep_group=self.ep_group)

    # ---- the FIFO of micro-batches in flight ----------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Micro-batches dispatched (or being dispatched) and not yet combined."""
        return sum(len(q) for q in self._queues.values())

    def reset(self) -> None:
        """Forget every micro-batch in flight (after an error, or an abandoned forward)."""
        for q in self._queues.values():
            q.clear()

    def _take(self, stage: str, phase: str) -> _InFlight:
        queue = self._queues[stage]
        if not queue:
            waiting = {s: len(q) for s, q in self._queues.items() if q}
            raise RuntimeError(f"{phase} called with no micro-batch waiting for it (in flight: {waiting or 'none'}): "
                               "each micro-batch must pass dispatch_preprocess, token_dispatch, dispatch_postprocess, "
                               "combine_preprocess, token_combine, combine_postprocess in this order; several "
                               "micro-batches are served first in, first out (dispatch A, dispatch B, combine A, "
                               "combine B)")
        return queue.popleft()

    # ---- dispatch -----------------------------------------------------------------------------
    @_phase
    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """[..., H] tokens, [T, E] routing map and probs -> (x_TD, weight_TK); lays out the exchange."""
        if self.shared_experts is not None and self.in_flight:
            raise RuntimeError(f"megatron option moe_shared_expert_overlap=True allows one micro-batch in flight (the "
                               f"shared expert caches its activations), {self.in_flight} already are: allowed "
                               "moe_shared_expert_overlap=False for several")
        hidden_shape = tokens.shape
        x_TD = tokens.reshape(-1, hidden_shape[-1])
        idx_TK, weight_TK = topk_from_routing_map(routing_map, probs, self.topk,
                                                  dropping=self.config.moe_expert_capacity_factor is not None)
        plan = self.c2r.layout(x_TD, idx_TK, weight_TK)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(tokens)
        self._queues["laid_out"].append(_InFlight(hidden_shape, plan=plan))
        return x_TD, weight_TK

    @_phase
    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """The count exchange, then the data exchange: -> (x_PD grouped by local expert, weight_P)."""
        call = self._take("laid_out", "token_dispatch")
        try:
            route = self.c2r.exchange_counts(call.plan)
        except InputError as exc:  # raised on every rank alike
            rule = "more than" if self.config.moe_expert_capacity_factor is not None else "without exactly"
            raise InputError(f"{exc}\n  (a routing_map row {rule} moe_router_topk={self.topk} experts shows "
                             f"as expert id {self.config.num_moe_experts})") from exc
        pending = self.c2r.send(hidden_states, probs, route)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act()  # while the tokens travel
        batch, handle = pending.wait()
        self._queues["dispatched"].append(dataclasses.replace(call, plan=None, handle=handle))
        return batch.x_PD, batch.weight_P

    @_phase
    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """-> (x_PD, tokens_per_expert as a CPU int64 tensor, weight_P) for Megatron's experts."""
        call = self._take("dispatched", "dispatch_postprocess")
        if hidden_states.shape[0] != call.handle.num_rows:
            raise RuntimeError(f"dispatch_postprocess got {hidden_states.shape[0]} rows, the oldest micro-batch "
                               f"waiting for it dispatched {call.handle.num_rows}: pass token_dispatch's output, "
                               "micro-batches in FIFO order")
        self._queues["at_experts"].append(call)
        return hidden_states, torch.tensor(call.handle.tokens_per_expert, dtype=torch.long), probs

    # ---- combine ------------------------------------------------------------------------------
    @_phase
    def combine_preprocess(self, hidden_states: torch.Tensor):
        """Expert outputs are already in the order they were dispatched: nothing to do."""
        if not self._queues["at_experts"]:
            self._take("at_experts", "combine_preprocess")  # raises: nothing was dispatched
        return hidden_states

    @_phase
    def token_combine(self, hidden_states: torch.Tensor):
        """Weighted expert outputs [P, H] -> each source token's sum [T, H]."""
        call = self._take("at_experts", "token_combine")
        pending = self.c2r.combine_start(hidden_states, call.handle, weighted=True)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward()  # while the partial sums travel
        out_TD = pending.wait()
        self._queues["combined"].append(call)
        return out_TD

    @_phase
    def combine_postprocess(self, hidden_states: torch.Tensor):
        """[T, H] -> the input's shape, plus the overlapped shared expert's output."""
        call = self._take("combined", "combine_postprocess")
        out = hidden_states.view(call.hidden_shape)
        if self.shared_experts is not None:
            self.shared_experts.post_forward_comm()
            out = out + self.shared_experts.get_output()
        return out


class C2RMoELayer(MoELayer):
    """megatron-core MoELayer whose token dispatcher is C2RTokenDispatcher (options: `c2r`)."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 c2r: Optional[C2RMegatronOptions] = None):
        check_megatron_config(config)  # before MoELayer builds its own dispatcher from the same config
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        label = None if layer_number is None else f"megatron MoE layer {layer_number}"
        self.token_dispatcher = C2RTokenDispatcher(self.num_local_experts, self.local_expert_indices, config,
                                                   pg_collection=pg_collection, options=c2r, label=label)
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron's TransformerLayer numbers its MoE layer after building it: failure reports name it."""
        super().set_layer_number(layer_number)
        self.token_dispatcher.c2r.label = f"megatron MoE layer {layer_number}"

    def forward(self, *args, **kwargs):
        """MoELayer.forward; if anything in it raises (the experts, the router, a phase), the
        micro-batches in flight are dropped, so the next call cannot pair rows with a stale handle."""
        try:
            return super().forward(*args, **kwargs)
        except BaseException:
            self.token_dispatcher.reset()
            raise


def use_c2r_dispatcher(spec: ModuleSpec, options: Optional[C2RMegatronOptions] = None) -> ModuleSpec:
    """A copy of a transformer-layer spec (e.g. `get_gpt_layer_local_spec(num_experts=...)`) or of its
    MoE spec whose MoE layer is C2RMoELayer with these options; the given spec is left unchanged."""
    layer_spec = spec if getattr(spec.submodules, "mlp", None) is not None else None
    moe_spec = spec.submodules.mlp if layer_spec is not None else spec
    module = moe_spec.module if isinstance(moe_spec, ModuleSpec) else None
    if not (isinstance(module, type) and issubclass(module, MoELayer)):
        raise ValueError(f"use_c2r_dispatcher needs a transformer-layer spec with an MoE mlp or an MoE spec, got "
                         f"module {module!r}: allowed a spec built with num_experts set")
    new_moe = dataclasses.replace(moe_spec, module=C2RMoELayer,
                                  params={**moe_spec.params, "c2r": options or C2RMegatronOptions()})
    if layer_spec is None:
        return new_moe
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=new_moe))
