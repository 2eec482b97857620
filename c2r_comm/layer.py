"""MoELayer = router + dispatcher + local experts (+ optional shared expert).

One token's path: router picks k experts -> dispatcher sends it once per destination (rank or node)
-> local experts compute -> combine sums locally and returns one partial per destination -> the
source adds the partials. See docs/architecture.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn

from c2r_comm.config import BACKWARD_EXCHANGES, OVERLAP_AUTO, Config
from c2r_comm.dispatch import DispatchHandle, Dispatcher, build_dispatcher
from c2r_comm.experts import GroupedExperts, SharedExpert
from c2r_comm.migrate import migrate_experts
from c2r_comm.padded_experts import PaddedExperts
from c2r_comm.plan import PlacementPlan, load_layer_plan
from c2r_comm.replica_grads import ReplicaGradSync
from c2r_comm.routing.capacity import CapacityDrop, CapacitySpec, apply_capacity
from c2r_comm.routing.factory import build_router
from c2r_comm.routing.router import DeviceConstrainedRouter, RouterOutput, TopKRouter
from c2r_comm.groups import ProcessGroups
from c2r_comm.schedule import ChunkPipeline, agree_overlap_degree, serial_forward, timed_serial_forward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class MoEOutput:
    out_TD: torch.Tensor
    aux_loss: torch.Tensor  # router's weighted auxiliary losses (zero for trace-driven routing)
    handles: tuple[DispatchHandle, ...]  # one per token chunk (one when the layer runs serially)
    routing: Optional[RouterOutput] = None
    capacity_drop: Optional[CapacityDrop] = None  # capacity mode: what the limit kept and dropped


class MoELayer(nn.Module):
    """overlap_degree: token chunks to pipeline (schedule/pipeline.py); 1 runs dispatch -> experts ->
    combine serially; "auto" decides on the first forward (schedule/auto.py) and prints the choice."""

    def __init__(self, router: TopKRouter, dispatcher: Dispatcher, experts: GroupedExperts,
                 shared_expert: Optional[SharedExpert] = None, overlap_degree: Union[int, str] = 1,
                 capacity: Optional[CapacitySpec] = None, backward_exchanges: str = "auto"):
        """capacity: capacity mode (routing/capacity.py); None routes dropless. backward_exchanges:
        how the pipelined backward runs its exchanges (config.BACKWARD_EXCHANGES)."""
        super().__init__()
        if backward_exchanges not in BACKWARD_EXCHANGES:
            raise ValueError(f"backward_exchanges {backward_exchanges!r}: allowed one of {BACKWARD_EXCHANGES}")
        self.exchange_thread = {"auto": None, "split": False, "thread": True}[backward_exchanges]
        if capacity is not None and capacity.pad_to_capacity:
            if overlap_degree != 1:
                raise ValueError(f"overlap_degree {overlap_degree!r} with pad_to_capacity: allowed 1 (capacity is per "
                                 "layer batch, not per chunk)")
            if not dispatcher.equal_tokens:
                raise ValueError("pad_to_capacity needs a dispatcher built with equal_tokens=True (padded sizes come "
                                 "from each rank's token count, which every rank must then share)")
        self.capacity = capacity
        # With replicas: sums each replicated expert's gradients over its copies (call after backward)
        self.replica_grad_sync = ReplicaGradSync(dispatcher.plan, dispatcher.rank, dispatcher.groups.ep,
                                                 dispatcher.topology, dispatcher.groups.ep_reverse
                                                 ) if dispatcher.plan.replicas else None
        if experts.num_local_experts != dispatcher.num_local_experts:
            raise ValueError(f"experts hold {experts.num_local_experts} local experts, the dispatcher's plan "
                             f"puts {dispatcher.num_local_experts} on each rank")
        if not (overlap_degree == OVERLAP_AUTO or (isinstance(overlap_degree, int) and overlap_degree >= 1)):
            raise ValueError(f"overlap_degree {overlap_degree!r}: allowed an integer >= 1 or '{OVERLAP_AUTO}'")
        self.router, self.dispatcher, self.experts, self.shared_expert = router, dispatcher, experts, shared_expert
        # None until "auto" has measured its first forward
        self.overlap_degree: Optional[int] = None if overlap_degree == OVERLAP_AUTO else overlap_degree

    def forward_routed(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> MoEOutput:
        """The layer with routing given (from a router or a recorded trace); capacity mode drops
        choices first (dropped ids may also come in as DROPPED_CHOICE)."""
        topk_idx_TK, topk_weight_TK, drop = self.limit_routing(topk_idx_TK, topk_weight_TK)
        out = self._forward_routed(x_TD, topk_idx_TK, topk_weight_TK, self.experts_for(drop))
        return out if drop is None else replace(out, capacity_drop=drop)

    def limit_routing(self, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, Optional[CapacityDrop]]:
        """Capacity mode's limit on this rank's routing (unchanged, None when dropless)."""
        if self.capacity is None:
            return topk_idx_TK, topk_weight_TK, None
        drop = apply_capacity(topk_idx_TK, topk_weight_TK, self.dispatcher.plan.num_experts, self.capacity)
        return drop.topk_idx_TK, drop.topk_weight_TK, drop

    def experts_for(self, drop: Optional[CapacityDrop]):
        """The local experts, padded to capacity x EP size rows each when pad_to_capacity is set."""
        if drop is None or not self.capacity.pad_to_capacity:
            return self.experts
        return PaddedExperts(self.experts, drop.capacity * self.dispatcher.world_size, self.dispatcher.rank)

    def _forward_routed(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                        experts) -> MoEOutput:
        zero = x_TD.new_zeros((), dtype=torch.float32)
        if self.overlap_degree is None:  # auto: this forward runs serially and is timed
            timing = timed_serial_forward(self.dispatcher, self.experts, self.shared_expert, x_TD, topk_idx_TK,
                                          topk_weight_TK)
            choice = agree_overlap_degree(timing, self.dispatcher.groups.ep)
            self.overlap_degree = choice.degree
            if self.dispatcher.rank == 0:
                print(f"c2r-comm: schedule.overlap_degree auto -> {choice.degree} (one serial forward, slowest "
                      f"rank: exchange {choice.exchange_s * 1e3:.1f} ms of which {choice.hideable_exchange_s * 1e3:.1f}"
                      f" ms hideable, experts {choice.experts_s * 1e3:.1f} ms, {choice.rows_per_expert:.0f} rows per "
                      f"local expert; rule in schedule/auto.py)",
                      file=sys.stderr)
            return MoEOutput(timing.out_TD, zero, (timing.handle,))
        if self.overlap_degree > 1:
            run = ChunkPipeline(self.dispatcher, self.experts, self.shared_expert, self.overlap_degree,
                                self.exchange_thread)(
                x_TD, topk_idx_TK, topk_weight_TK)
            return MoEOutput(run.out_TD, zero, tuple(ch.handle for ch in run.chunks))
        res = serial_forward(self.dispatcher, experts, self.shared_expert, x_TD, topk_idx_TK, topk_weight_TK)
        return MoEOutput(res.out_TD, zero, (res.handle,))

    def apply_plan(self, plan: PlacementPlan, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Re-plan live: move the expert weights (and `optimizer`'s state for them) to `plan`'s ranks
        and slots with one all_to_all (migrate.py), and dispatch by `plan` from now on. Collective:
        every rank calls it with the same plan (checked first, on every rank); nothing may be in
        flight. The experts' Parameters stay the same objects, so the optimizer needs no rebuild."""
        if isinstance(self.router, DeviceConstrainedRouter):
            raise ValueError("apply_plan: routing.kind device_constrained picks experts by the placement's groups, so "
                             "a new plan would change the routing (and results): allowed with topk or c2r routing")
        d = self.dispatcher
        new = build_dispatcher(d.name, plan, d.groups, d.hidden_size, d.debug_checks, d.label, d.equal_tokens)
        migrate_experts(self.experts, d.plan, plan, d.rank, d.groups.ep, optimizer)
        self.dispatcher = new
        self.replica_grad_sync = (ReplicaGradSync(plan, new.rank, new.groups.ep, new.topology, new.groups.ep_reverse)
                                  if plan.replicas else None)

    def sync_replica_grads(self) -> None:
        """With a replica plan: give every copy of a replicated expert the sum of all copies'
        gradients (among each expert's holders: replica_grads.py), so an optimizer step keeps the copies
        identical. Collective: every rank calls it after backward, before the optimizer step. No-op
        without replicas."""
        if self.replica_grad_sync is not None:
            self.replica_grad_sync(self.experts)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Before anything of this layer loads: a state dict of other experts (another placement) is
        # refused on this rank (not collective: ranks whose experts match load, and see this rank's
        # failure at their next collective, as CommError naming it).
        self.experts.slot_order(state_dict, prefix + "experts.")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's routed experts: each rank holds other experts, and the dispatch already brought
        every rank's tokens, so their gradients need no data-parallel reduction (never hand them to
        DDP, which would average different experts; replica plans: sync_replica_grads)."""
        return list(self.experts.parameters())

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Weights every expert-parallel rank holds a copy of (router gate, shared expert): SUM their
        gradients over the ranks (all_reduce). An expert's gradient is already the sum over every
        rank's tokens, so both are then gradients of the sum of the ranks' losses; for the mean,
        divide each rank's loss by the world size first (train/step.py). Averaging these instead
        (DDP) would scale them 1/W against the experts'."""
        experts = {id(p) for p in self.experts.parameters()}
        return [p for p in self.parameters() if id(p) not in experts]

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        if x_TD.ndim != 2:
            raise ValueError(f"MoELayer takes x_TD [tokens, hidden], got shape {tuple(x_TD.shape)}: flatten the "
                             "other dimensions first (x.reshape(-1, x.shape[-1])) and restore them on out_TD")
        gate = self.router.gate.weight
        if x_TD.dtype != gate.dtype:
            device = x_TD.device.type
            if not torch.is_autocast_enabled(device):
                raise ValueError(f"MoELayer input dtype {x_TD.dtype}: allowed the layer's {gate.dtype} (run.dtype); "
                                 "cast the input or build the layer with that dtype")
            # Under autocast: the whole layer in its own dtype (the exchanges and the experts' backward
            # need one dtype), the output back in the input's.
            with torch.autocast(device, enabled=False):
                out = self.forward(x_TD.to(gate.dtype))
            return replace(out, out_TD=out.out_TD.to(x_TD.dtype))
        routing = self.router(x_TD)
        out = self.forward_routed(x_TD, routing.topk_idx_TK, routing.topk_weight_TK)
        return replace(out, aux_loss=routing.aux_loss, routing=routing)


def build_moe_layer(config: Config, groups: ProcessGroups, device: torch.device,
                    dispatcher: Optional[str] = None, plan: Optional[PlacementPlan] = None) -> MoELayer:
    """A layer from a validated config; every rank must call it together (plan check is collective)."""
    m, run = config.model, config.run
    if (config.parallel.nodes, config.parallel.gpus_per_node) != (groups.topology.nodes,
                                                                  groups.topology.gpus_per_node):
        raise ValueError(f"config parallel {config.parallel.nodes}x{config.parallel.gpus_per_node} but the process "
                         f"groups are {groups.topology}: allowed the groups' topology (build_process_groups with "
                         "the config's topology)")
    if plan is None:
        plan = load_layer_plan(config.placement.plan, config.placement.layer, groups.topology, m.num_experts)
    dtype = DTYPES[run.dtype]
    gate_rng = torch.Generator().manual_seed(run.seed)  # replicated router: same gate on every rank
    router = build_router(m, config.routing, plan, groups.topology, config.placement.layer, generator=gate_rng)
    router = router.to(device)
    capacity = CapacitySpec.of(config.routing)
    disp = build_dispatcher(dispatcher or config.dispatcher, plan, groups, m.hidden_size, run.debug_checks,
                            label=f"layer {config.placement.layer}",
                            equal_tokens=capacity is not None and capacity.pad_to_capacity)
    experts = GroupedExperts.for_rank(plan, groups.rank, m.hidden_size, m.ffn_hidden_size, run.seed, dtype, device)
    shared = None
    if m.num_shared_experts:
        ffn = m.num_shared_experts * (m.shared_ffn_hidden_size or m.ffn_hidden_size)
        shared = SharedExpert(m.hidden_size, ffn, run.seed, dtype).to(device)
    return MoELayer(router.to(dtype=dtype), disp, experts, shared, config.schedule.overlap_degree, capacity,
                    config.schedule.backward_exchanges)
