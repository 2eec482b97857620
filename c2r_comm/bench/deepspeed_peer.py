"""DeepSpeed's MoE layer as a benchmark peer (`c2r-comm bench --peers deepspeed`; registry: peers.py).

DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`, written against deepspeed 0.19.8), run in
the same launch, on the same ranks and process group world, after our dispatchers. Install:

    DS_BUILD_OPS=0 python -m pip install "c2r-comm[peers]"        (or "deepspeed==0.19.8")

DS_BUILD_OPS=0 is needed at build time (its sdist otherwise tries to compile CUDA/C++ ops); the MoE
layer needs none of them.

Matched with our rows: tokens per rank (the same x_TD and grad_TD), hidden size, ffn size, dtype,
number of experts, top-k, and the experts themselves: our SwiGLU (experts.swiglu, no bias) with our
expert weights (GroupedExperts' init per global expert id, copied into DeepSpeed's experts). Its
settings: `MoE(H, expert=SwiGLU, num_experts=E, ep_size=W, k=K, drop_tokens=False, use_rts=False,
noisy_gate_policy=None, top2_2nd_expert_sampling=False)`: dropless, plain renormalised top-k (the
default samples the 2nd expert with Gumbel noise; k > 2 goes through its `topkgating`).

Routing:
  * with --trace: its gate (`TopKGate`) is replaced by `given routing` (see _given_routing_gate): logits
    log(w) on the trace's expert ids (w = 1/k, exactly as our rows) and -1e4 elsewhere, so softmax puts
    all mass on them (exp(-1e4) is 0 in fp32) and DeepSpeed's own top1/top2/topkgating picks exactly
    those experts, renormalises their weights and applies its own dropless capacity rule. The gate's
    projection is skipped, as our trace rows skip the router.
  * without --trace: its own TopKGate, with our router's gate weights copied in. For routing.kind
    topk (no noise, renormalised, k >= 2) it picks the same experts with the same weights as our router
    (its topkgating l_aux also equals our load-balancing loss, so aux_loss_weight * l_aux is added to
    the backward like ours; top2gating's l_aux counts first choices only). Otherwise routing differs:
    c2r / device_constrained routers constrain the choice, DeepSpeed does plain top-k; k = 1 weights
    are the softmax probability (not renormalised to 1); z-loss and gate noise have no DeepSpeed
    counterpart; in bf16/fp16 its gate projects in fp32, ours in the layer's dtype.

What differs, by design of DeepSpeed's layer (reported, not changed):
  * padding: dropless still means capacity C = the largest count of any expert on any rank, found with
    one all-reduce (MAX) per forward over the expert-parallel group (outside our CommStats; counted in
    the record's config["peer"]). Every rank's [E, C, H] buffer is padded to C rows per expert.
  * k copies per token: one per (token, expert), even when experts share a rank or node; no dedup.
  * one equal-split all_to_all_single for dispatch and one for combine (and two more in backward):
    every rank sends W x E_local x C rows, padding rows included. Our CommStats for this row count
    exactly those rows, padding included (they are bytes on the wire), classified same-node /
    cross-node by the topology like ours; rows_local is the rank's own chunk.
  * experts compute on every padded row (W x C rows per local expert), zeros included.
  * encode/decode: 0.19.8 gathers into the [E, C, H] buffer with index_select (`sparse_routes`; older
    releases built dense [S, E, C] combine/dispatch tensors with einsum) and combines in fp32.
  * placement: always contiguous (EP rank r holds experts r*E/W .. (r+1)*E/W - 1); a --plan file
    applies to our rows only. Needs num_experts divisible by the world size.
  * a shared expert (model.num_shared_experts) is our SharedExpert added to its output, as our layer does.

CPU shims (all here, none in DeepSpeed's files):
  * DS_ACCELERATOR is set right before deepspeed is imported: DeepSpeed's own contract is that
    get_accelerator() reads it once, at first use, and otherwise guesses from what is installed.
  * its TorchBackend would JIT-compile a shared-memory collective op (ninja + a C++ compiler, minutes)
    when a compiler is present; that op only serves inference all-reduce, so it is not built
    (build_shm_op -> None): the MoE layer's collectives go to torch.distributed (gloo) like ours.
  * deepspeed.init_distributed(dist_backend=<our backend>) adopts the process group we created;
    set_deepspeed_parallelism() creates its expert groups (its print to stdout is swallowed).
  * the module-level `dist` that deepspeed.moe.sharded_moe calls is wrapped (CommRecorder) to record
    the tensors each all_to_all_single / all_reduce is given: the bytes in the record are what it sends.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from c2r_comm.bench.measure import BenchRecord, measure_module
from c2r_comm.bench.deepspeed_traffic import CommCall, CommRecorder, deepspeed_traffic, sharded_moe_recorder
from c2r_comm.bench.peers import DEEPSPEED_INSTALL, DEEPSPEED_VERSION, peer_record, set_given_routing
from c2r_comm.config import Config
from c2r_comm.experts import GroupedExperts, SharedExpert, swiglu
from c2r_comm.layer import DTYPES
from c2r_comm.routing.router import TopKRouter

_LOGIT_OFF = -1.0e4  # softmax weight exp(-1e4 - log(k)) underflows to exactly 0 in fp32


# ---- DeepSpeed: import and shims ---------------------------------------------------------------------

def import_deepspeed(device: torch.device):
    """Import deepspeed for `device` (cpu or cuda) with the CPU shims installed; returns the module."""
    want = "cuda" if device.type == "cuda" else "cpu"
    have = os.environ.get("DS_ACCELERATOR")
    if have is not None and have != want:
        raise ValueError(f"DS_ACCELERATOR={have!r} but the benchmark runs on {device.type}: unset it or set {want!r}")
    # DeepSpeed's contract: get_accelerator() reads DS_ACCELERATOR once, at its first use, else guesses.
    os.environ["DS_ACCELERATOR"] = want
    try:
        import deepspeed
        import deepspeed.comm.torch as ds_comm_torch
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe import sharded_moe
    except Exception as exc:  # a broken install fails here, on the ranks, with the way out
        raise RuntimeError(f"deepspeed failed to import ({type(exc).__name__}: {exc}); install it with "
                           f"{DEEPSPEED_INSTALL}") from exc
    name = getattr(get_accelerator(), "_name", None)
    if name != want:
        raise RuntimeError(f"deepspeed's accelerator is {name!r}, the benchmark needs {want!r} (deepspeed was "
                           f"imported earlier in this process with another DS_ACCELERATOR)")
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        warnings.warn(f"deepspeed {deepspeed.__version__}: the peer was written against {DEEPSPEED_VERSION}")
    if want == "cpu":
        ds_comm_torch.build_shm_op = lambda: None  # shim: no JIT build of the inference-only shm op
    if not isinstance(sharded_moe.dist, CommRecorder):
        sharded_moe.dist = CommRecorder(sharded_moe.dist)
    return deepspeed


# ---- DeepSpeed: the layer ---------------------------------------------------------------------------

class SwiGLUExpert(nn.Module):
    """One expert as DeepSpeed's Experts runs it (x [..., H] -> [..., H]): our SwiGLU, no bias."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.w_gate_DF = nn.Parameter(torch.zeros(hidden_size, ffn_size))
        self.w_up_DF = nn.Parameter(torch.zeros(hidden_size, ffn_size))
        self.w_down_FD = nn.Parameter(torch.zeros(ffn_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate_DF, self.w_up_DF, self.w_down_FD)


def _given_routing_gate(sharded_moe, hidden_size: int, num_experts: int, k: int) -> nn.Module:
    """A TopKGate whose logits come from given routing (set_routing) instead of its projection; its own
    top1/top2/topkgating then pick exactly those experts with those (renormalised) weights, dropless."""

    class GivenRoutingGate(sharded_moe.TopKGate):
        logits_SE: Optional[torch.Tensor] = None

        def set_routing(self, idx_SK: torch.Tensor, weight_SK: torch.Tensor) -> None:
            S, K = idx_SK.shape
            if K != self.k:
                raise ValueError(f"routing picks {K} experts per token, the gate was built for k = {self.k}")
            if S and (int(idx_SK.min()) < 0 or int(idx_SK.max()) >= num_experts):
                raise ValueError(f"routing expert ids must lie in 0..{num_experts - 1}")
            if K > 1 and S and bool((idx_SK.sort(1).values.diff(dim=1) == 0).any()):
                raise ValueError("routing repeats an expert within a token: DeepSpeed's gate cannot express it")
            if S and not bool((weight_SK > 0).all()):
                raise ValueError("routing weights must be > 0 (they become logits log(w))")
            logits = torch.full((S, num_experts), _LOGIT_OFF, dtype=torch.float32, device=idx_SK.device)
            self.logits_SE = logits.scatter_(1, idx_SK.long(), weight_SK.float().log())

        def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # noqa: A002 (its name)
            logits = self.logits_SE
            if logits is None or logits.shape[0] != input.shape[0]:
                raise ValueError(f"given routing covers {None if logits is None else logits.shape[0]} tokens, "
                                 f"the layer got {input.shape[0]}")
            cf = self.capacity_factor if self.training else self.eval_capacity_factor
            if self.k == 1:
                return sharded_moe.top1gating(logits, cf, self.min_capacity, used_token, None, self.drop_tokens,
                                              self.use_rts, self.ep_group, sparse_routes, use_tutel)
            if self.k == 2:
                if self.top2_2nd_expert_sampling:  # it adds noise to the logits in place
                    logits = logits.clone()
                return sharded_moe.top2gating(logits, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                                              self.top2_2nd_expert_sampling, sparse_routes)
            return sharded_moe.topkgating(logits, self.k, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                                          sparse_routes=sparse_routes)

    return GivenRoutingGate(hidden_size, num_experts, k, 1.0, 1.0, 0, None, False, False, None, False)


class DeepSpeedPeer(nn.Module):
    """DeepSpeed's MoE layer (+ our shared expert when the model has one); forward(x) -> (out_TD, aux_loss)."""

    def __init__(self, moe: nn.Module, shared_expert: Optional[SharedExpert], aux_loss_weight: float,
                 given_routing: bool):
        super().__init__()
        self.moe, self.shared_expert = moe, shared_expert
        self.aux_loss_weight, self.given_routing = aux_loss_weight, given_routing

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    @property
    def ep_group(self):
        return self.moe.deepspeed_moe.ep_group

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_TD, l_aux, _ = self.moe(x_TD)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        if self.given_routing or not self.aux_loss_weight:  # our rows: zero for given routing too
            return out_TD, x_TD.new_zeros((), dtype=torch.float32)
        return out_TD, self.aux_loss_weight * l_aux


def build_deepspeed_peer(config: Config, groups, device: torch.device,
                         routing: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> DeepSpeedPeer:
    """DeepSpeed's MoE layer matching our layer of `config` (see the module doc). Collective: every rank
    calls it together (deepspeed creates its expert-parallel groups). routing: fixed (idx, weight) per
    token for its gate, else its own TopKGate with our router's gate weights."""
    deepspeed = import_deepspeed(device)
    from deepspeed.moe import sharded_moe
    from deepspeed.moe.layer import MoE

    m, run = config.model, config.run
    dtype = DTYPES[run.dtype]
    W = groups.topology.world_size
    if dist.get_world_size() != W or dist.get_process_group_ranks(groups.ep) != list(range(W)):
        raise ValueError("the deepspeed peer builds its expert-parallel group over the whole world: the bench's "
                         f"group must be all {dist.get_world_size()} ranks in order")
    if m.num_experts % W:
        raise ValueError(f"the deepspeed peer needs num_experts ({m.num_experts}) divisible by the world size ({W})")
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    moe = MoE(m.hidden_size, expert=SwiGLUExpert(m.hidden_size, m.ffn_hidden_size), num_experts=m.num_experts,
              ep_size=W, k=m.top_k, capacity_factor=1.0, eval_capacity_factor=1.0,
              min_capacity=0,  # dropless: only an assert in top1gating (tokens >= min_capacity) reads it
              noisy_gate_policy=None, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    if routing is not None:
        moe.deepspeed_moe.gate = _given_routing_gate(sharded_moe, m.hidden_size, m.num_experts, m.top_k)
    else:  # our router's gate weights: build_moe_layer draws them from Generator(seed) first thing
        ours = TopKRouter(m.hidden_size, m.num_experts, m.top_k, generator=torch.Generator().manual_seed(run.seed))
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
    moe = moe.to(device=device, dtype=dtype)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "No existing process group found, ..."
        moe.set_deepspeed_parallelism()
    if routing is not None:
        set_given_routing(moe.deepspeed_moe.gate.set_routing, routing, groups.ep, "deepspeed")
    # Our expert weights, by global id: EP rank r holds experts r*L .. r*L+L-1 (its equal-split all2all).
    L = m.num_experts // W
    ep_rank = dist.get_rank(moe.deepspeed_moe.ep_group)
    ours = GroupedExperts(range(ep_rank * L, (ep_rank + 1) * L), m.hidden_size, m.ffn_hidden_size, run.seed, dtype,
                          device)
    copy_expert_weights(moe, ours)
    shared = None
    if m.num_shared_experts:
        ffn = m.num_shared_experts * (m.shared_ffn_hidden_size or m.ffn_hidden_size)
        shared = SharedExpert(m.hidden_size, ffn, run.seed, dtype).to(device)
    return DeepSpeedPeer(moe, shared, config.routing.aux_loss_weight, routing is not None)


def copy_expert_weights(moe: nn.Module, experts: GroupedExperts) -> None:
    """Our experts' weights (local slot j) into DeepSpeed's local expert j."""
    ds_experts = moe.deepspeed_moe.experts.deepspeed_experts
    if len(ds_experts) != experts.num_local_experts:
        raise ValueError(f"deepspeed holds {len(ds_experts)} local experts, ours {experts.num_local_experts}")
    with torch.no_grad():
        for j, e in enumerate(ds_experts):
            e.w_gate_DF.copy_(experts.w_gate_LDF[j])
            e.w_up_DF.copy_(experts.w_up_LDF[j])
            e.w_down_FD.copy_(experts.w_down_LFD[j])


def bench_deepspeed(config: Config, routing: Optional[tuple[torch.Tensor, torch.Tensor]], routing_desc: str,
                    trace_layer: Optional[int], groups, device: torch.device, x_TD: torch.Tensor, grad_TD: torch.Tensor,
                    show: bool, network_interface: Optional[str] = None) -> BenchRecord:
    """DeepSpeed's MoE layer timed exactly like measure_layer (measure_module: warm-up, barrier, slowest
    rank, CPU user/sys, peak memory, wire bytes), bytes from its all2all calls."""
    run = config.run
    peer = build_deepspeed_peer(config, groups, device, routing)
    recorder = sharded_moe_recorder()

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[CommCall]]:
        recorder.calls = calls = []
        out_TD, aux = peer(x)
        return out_TD, aux, calls[:]  # the forward's calls; backward's are appended to `calls`

    label = f"{'deepspeed':>12}" + (f" layer {trace_layer:>2}" if trace_layer is not None else "")
    try:
        meas, fwd_calls = measure_module(peer, step, x_TD, grad_TD, run.warmup_iters, run.iters, groups.ep,
                                         groups.topology, label, show, network_interface)
        all_calls = recorder.calls or []
    finally:
        recorder.calls = None
    traffic = deepspeed_traffic(peer, fwd_calls, all_calls[len(fwd_calls):], x_TD.shape[0], groups, device)
    record = peer_record("deepspeed", config, routing_desc, trace_layer, str(groups.topology), meas, traffic,
                         _routing_differences(config, routing is not None))
    if show:
        n = traffic.notes
        print(f"deepspeed {n['version']} MoE layer{'' if trace_layer is None else f' (layer {trace_layer})'}: "
              f"capacity {n['capacity_per_expert']} rows/expert, {n['all2all_rows_per_iteration']} all2all rows for "
              f"{n['routes']} routes (x{n['padding_factor'] or 0:.2f} padding), k copies per token, "
              f"{n['all_reduce_forward_per_rank']} all-reduce/forward; routing: {n['routing']}"
              + ("" if record.routing == routing_desc else " (differs from ours: config.peer.differs)"), file=sys.stderr)
    return record


def _routing_differences(config: Config, given_routing: bool) -> list[str]:
    """What differs between its gate and our router for this config (see the module doc); entries that
    change which experts or weights a token gets start with 'routing'."""
    if given_routing:
        return []
    r, k, out = config.routing, config.model.top_k, []
    if r.kind != "topk":
        out.append(f"routing: plain top-k, ours is the {r.kind} router")
    if k == 1 or not r.renormalize:
        out.append("routing weights: its top-1 weight is the softmax probability" if k == 1 else
                   "routing weights: it renormalises the top-k weights, ours does not (routing.renormalize false)")
    if r.noise_std:
        out.append("routing: no gate noise (ours: routing.noise_std)")
    if config.run.dtype != "float32":
        out.append("routing logits: it projects in fp32, ours in the layer's dtype (ties may break differently)")
    if r.aux_loss_weight and k == 2:
        out.append("aux loss: top2gating's l_aux counts first choices only (ours: all k)")
    if r.z_loss_weight:
        out.append("aux loss: no z-loss")
    return out
