"""megatron-core's MoE layer with its own all2all dispatcher as a benchmark peer (`c2r-comm bench
--peers megatron`; registry: peers.py).

megatron-core's `MoELayer` built from its own `TransformerConfig` and local layer spec, with
`moe_token_dispatcher_type="alltoall"` (its `MoEAlltoAllTokenDispatcher`, Megatron-LM's default for
expert parallelism) and its `SequentialMLP` experts (the local spec without Transformer Engine; its
grouped-GEMM experts need TE or the grouped_gemm package), written against megatron-core 0.16.1.
Run in the same launch, on the same ranks, after our dispatchers. Install: `pip install
"c2r-comm[megatron]"`.

Matched with our rows: tokens per rank (the same x_TD and grad_TD), hidden size, ffn size, dtype,
number of experts, top-k, and the experts themselves: gated SiLU MLPs without bias holding our
expert weights (GroupedExperts' init per global expert id; its fc1 is [gate; up], its fc2 our down
projection), so its experts compute our SwiGLU.

Routing:
  * with --trace: its router is replaced by `GivenRouting`, which returns the trace's routing map and
    probabilities 1/k on the chosen experts (exactly our rows' weights); its dispatcher and experts
    run unchanged (the experts scale each row by its probability, as Megatron does).
  * without --trace: its own TopKRouter with our router's gate weights (softmax over the top-k logits,
    i.e. renormalised, or with routing.renormalize false softmax over all then top-k); its aux loss
    (`moe_router_load_balancing_type: aux_loss`, coefficient routing.aux_loss_weight) is attached to
    the graph by megatron-core itself. c2r / device-constrained routers, gate noise and z-loss have no
    counterpart here (the record lists what differs).

What differs, by design of megatron-core's dispatcher (reported, not changed):
  * k copies per token: one row per (token, expert), even when experts share a rank or node; no dedup.
  * per forward: one all_gather of every rank's per-expert counts (E int64), a device->host copy of the
    splits, one all_to_all_single for the token rows and a second for their probabilities, one for the
    combine; backward mirrors the two token all2alls (its autograd), plus the probabilities'.
  * no padding (dropless): rows are exactly the routes.
  * placement: contiguous (EP rank r holds experts r*E/W .. (r+1)*E/W - 1); a --plan applies to our
    rows only. Needs num_experts divisible by the world size.
  * a shared expert (model.num_shared_experts) is our SharedExpert added to its output, as our layer does.

CPU shims (`install_cpu_only_shims`, here and nowhere else; examples/megatron_moe_layer.py and the
adapter's tests use them too): megatron-core 0.16.1 assumes CUDA in four places (current device,
streams, Transformer Engine's gemm name, the host copy of the splits). They patch torch.cuda's stream
API and two megatron-core names in the calling process, so they are installed only on CPU runs,
only when the megatron peer (or the example/tests) asks for them; our dispatchers never call those
names on CPU.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from c2r_comm.bench.measure import BenchRecord, measure_module
from c2r_comm.bench.peers import MEGATRON_VERSION, PeerTraffic, peer_record, set_given_routing
from c2r_comm.comm_failures import group_site, guard
from c2r_comm.config import Config
from c2r_comm.dispatch.exchange_plan import stats_of_messages
from c2r_comm.experts import GroupedExperts, SharedExpert
from c2r_comm.layer import DTYPES
from c2r_comm.routing.router import TopKRouter


# ---- CPU shims ------------------------------------------------------------------------------------

class NoStream:
    """Stands in for torch.cuda.Stream / Event on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args):
        return NoStream()


def install_cpu_only_shims() -> None:
    """The four monkeypatches megatron-core 0.16.1 needs to run its MoE layer on CPU (gloo). Call it
    only in a CPU-only process that runs megatron-core (it patches torch.cuda's stream API)."""
    torch.cuda.current_device = lambda: "cpu"  # the router moves its weight to the "current device"
    torch.cuda.Stream = NoStream  # its alltoall dispatcher and overlapped shared expert make streams
    torch.cuda.current_stream = lambda *a, **k: NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.te_general_gemm = None  # 0.16.1 refers to it when Transformer Engine is absent

    def to_cpu(tensor, as_numpy=False, record_stream=False):  # also CPU tensors: gloo needs int splits
        if torch.is_tensor(tensor):
            tensor = tensor.cpu().numpy() if as_numpy else tensor.cpu()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu


# ---- recording what its dispatcher sends ------------------------------------------------------------

@dataclass(frozen=True)
class A2ACall:
    """One all_to_all its dispatcher issued: rows (dim 0) to each EP rank and bytes per row."""

    rows_to: tuple[int, ...]
    row_bytes: int


class _Recorder:
    """megatron-core's token_dispatcher.all_to_all and gather_from_sequence_parallel_region wrapped: while
    recording, notes each call's splits and shapes (host ints it already has; no copies, no syncs)."""

    def __init__(self, all_to_all, gather):
        self._all_to_all, self._gather = all_to_all, gather
        self.calls: Optional[list[A2ACall]] = None
        self.gathered_bytes = 0

    def all_to_all(self, group, input_, output_split_sizes_=None, input_split_sizes=None):
        if self.calls is not None:
            size = dist.get_world_size(group)
            rows = ([input_.shape[0] // size] * size if input_split_sizes is None
                    else [int(s) for s in input_split_sizes])
            self.calls.append(A2ACall(tuple(rows), math.prod(input_.shape[1:]) * input_.element_size()))
        return self._all_to_all(group, input_, output_split_sizes_, input_split_sizes)

    def gather(self, input_, *args, **kwargs):
        if self.calls is not None:
            self.gathered_bytes += input_.numel() * input_.element_size()
        return self._gather(input_, *args, **kwargs)


def _recorder() -> _Recorder:
    from megatron.core.transformer.moe import token_dispatcher as td
    if not isinstance(getattr(td.all_to_all, "__self__", None), _Recorder):
        rec = _Recorder(td.all_to_all, td.gather_from_sequence_parallel_region)
        td.all_to_all, td.gather_from_sequence_parallel_region = rec.all_to_all, rec.gather
    return td.all_to_all.__self__


# ---- the layer ------------------------------------------------------------------------------------

class GivenRouting(nn.Module):
    """Stands in for megatron-core's router: returns (probs [T, E], routing_map [T, E]) of given routing
    (set_routing) instead of projecting the tokens."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.probs_TE: Optional[torch.Tensor] = None
        self.map_TE: Optional[torch.Tensor] = None

    def set_routing(self, idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> None:
        T, K = idx_TK.shape
        if K != self.top_k:
            raise ValueError(f"routing picks {K} experts per token, the layer was built for top-{self.top_k}")
        if T and (int(idx_TK.min()) < 0 or int(idx_TK.max()) >= self.num_experts):
            raise ValueError(f"routing expert ids must lie in 0..{self.num_experts - 1}")
        if K > 1 and T and bool((idx_TK.sort(1).values.diff(dim=1) == 0).any()):
            raise ValueError("routing repeats an expert within a token: megatron-core's routing map cannot express it")
        probs = torch.zeros(T, self.num_experts, dtype=torch.float32, device=idx_TK.device)
        self.probs_TE = probs.scatter_(1, idx_TK.long(), weight_TK.float())
        self.map_TE = torch.zeros(T, self.num_experts, dtype=torch.bool, device=idx_TK.device).scatter_(
            1, idx_TK.long(), True)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):  # noqa: A002 (its name)
        T = input.shape[0] * input.shape[1] if input.dim() == 3 else input.shape[0]
        if self.probs_TE is None or self.probs_TE.shape[0] != T:
            raise ValueError(f"given routing covers {None if self.probs_TE is None else self.probs_TE.shape[0]} "
                             f"tokens, the layer got {T}")
        return self.probs_TE, self.map_TE

    def set_layer_number(self, layer_number: int) -> None:
        pass


@contextlib.contextmanager
def quiet_megatron():
    """Silences the warnings megatron-core 0.16.1 gives, once per rank, for what this peer does on purpose:
    no Apex / Transformer Engine (its local spec), no cuda_graph_scope, router dtype with many experts;
    and torch's deprecation of the all_gather it uses."""
    with warnings.catch_warnings():
        for message in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                        "full scope is deprecated", "Using a large number of experts",
                        "`torch.distributed.all_gather_into_tensor` is deprecated"):
            warnings.filterwarnings("ignore", message=message)
        yield


class MegatronPeer(nn.Module):
    """megatron-core's MoELayer (+ our shared expert); forward(x_TD) -> (out_TD, zero aux: its aux loss,
    when any, is attached to the graph by megatron-core)."""

    def __init__(self, moe: nn.Module, shared_expert: Optional[SharedExpert], given_routing: bool):
        super().__init__()
        self.moe, self.shared_expert, self.given_routing = moe, shared_expert, given_routing

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _bias = self.moe(x_TD.unsqueeze(1))  # its layout: [sequence, batch, hidden]
        out_TD = out.squeeze(1)
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        return out_TD, x_TD.new_zeros((), dtype=torch.float32)


def megatron_config(config: Config, world_size: int):
    """megatron-core's TransformerConfig for our layer of `config` (expert parallel over the world)."""
    import torch.nn.functional as Fn
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, r, dtype = config.model, config.routing, DTYPES[config.run.dtype]
    aux = r.kind == "topk" and r.aux_loss_weight > 0
    return TransformerConfig(
        num_layers=1, hidden_size=m.hidden_size, num_attention_heads=1, num_moe_experts=m.num_experts,
        moe_router_topk=m.top_k, moe_ffn_hidden_size=m.ffn_hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, gated_linear_unit=True,
        activation_func=Fn.silu, expert_model_parallel_size=world_size, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        moe_router_pre_softmax=not r.renormalize or m.top_k == 1,  # megatron-core refuses k = 1 otherwise
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=r.aux_loss_weight if aux else 0.0,
        use_cpu_initialization=True, perform_initialization=False)  # weights are ours, copied in


def build_megatron_peer(config: Config, groups, device: torch.device,
                        routing: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> MegatronPeer:
    """megatron-core's MoELayer with its alltoall dispatcher, matching our layer of `config` (see the
    module doc). Collective: every rank calls it together (megatron-core creates its process groups
    once per process). routing: fixed (idx, weight) per token, else its TopKRouter with our gate weights."""
    with quiet_megatron():
        if device.type == "cpu":
            install_cpu_only_shims()
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.spec_utils import build_module

    m, run = config.model, config.run
    W = groups.topology.world_size
    if dist.get_world_size() != W or dist.get_process_group_ranks(groups.ep) != list(range(W)):
        raise ValueError("the megatron peer builds its expert-parallel group over the whole world: the bench's "
                         f"group must be all {dist.get_world_size()} ranks in order")
    if m.num_experts % W:
        raise ValueError(f"the megatron peer needs num_experts ({m.num_experts}) divisible by the world size ({W})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=W)
    elif parallel_state.get_expert_model_parallel_world_size() != W:
        raise ValueError(f"megatron-core's model parallel state is set up for expert parallel "
                         f"{parallel_state.get_expert_model_parallel_world_size()}, the bench needs {W}")
    with quiet_megatron():
        mcfg = megatron_config(config, W)
        spec = get_gpt_layer_local_spec(num_experts=m.num_experts, moe_grouped_gemm=False)
        moe = build_module(spec.submodules.mlp, config=mcfg)
    if routing is not None:
        moe.router = GivenRouting(m.num_experts, m.top_k)
        set_given_routing(moe.router.set_routing, routing, groups.ep, "megatron")
    else:  # our router's gate weights: build_moe_layer draws them from Generator(seed) first thing
        ours = TopKRouter(m.hidden_size, m.num_experts, m.top_k, generator=torch.Generator().manual_seed(run.seed))
        with torch.no_grad():
            moe.router.weight.copy_(ours.gate.weight)
    L = m.num_experts // W
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    experts = GroupedExperts(range(ep_rank * L, (ep_rank + 1) * L), m.hidden_size, m.ffn_hidden_size, run.seed,
                             DTYPES[run.dtype])
    copy_expert_weights(moe, experts)
    shared = None
    if m.num_shared_experts:
        ffn = m.num_shared_experts * (m.shared_ffn_hidden_size or m.ffn_hidden_size)
        shared = SharedExpert(m.hidden_size, ffn, run.seed, DTYPES[run.dtype])
    return MegatronPeer(moe, shared, routing is not None).to(device)


def copy_expert_weights(moe: nn.Module, experts: GroupedExperts) -> None:
    """Our experts' weights (local slot j) into megatron-core's local expert j: fc1 = [gate; up] (its
    gated MLP chunks fc1's output into act(first half) * second half), fc2 = down."""
    local = moe.experts.local_experts
    if len(local) != experts.num_local_experts:
        raise ValueError(f"megatron-core holds {len(local)} local experts, ours {experts.num_local_experts}")
    with torch.no_grad():
        for j, mlp in enumerate(local):
            mlp.linear_fc1.weight.copy_(torch.cat([experts.w_gate_LDF[j].t(), experts.w_up_LDF[j].t()], dim=0))
            mlp.linear_fc2.weight.copy_(experts.w_down_LFD[j].t())


# ---- measured like our rows -------------------------------------------------------------------------

def megatron_traffic(calls: list[A2ACall], gathered_bytes: int, tokens: int, groups,
                     device: torch.device) -> PeerTraffic:
    """Rows and bytes its forward sent (dispatch: token rows + their probabilities; combine), over all
    ranks, classified by our topology. Collective (one all_reduce)."""
    W, me = groups.topology.world_size, groups.rank
    if W > 1 and len(calls) != 3:
        raise RuntimeError(f"expected megatron-core's alltoall dispatcher to call all_to_all 3 times per forward "
                           f"(tokens, probs, combine), it called it {len(calls)} times (a megatron-core other than "
                           f"{MEGATRON_VERSION}?)")
    t = torch.zeros(3, W, W, dtype=torch.int64)
    for i, call in enumerate(calls):
        t[i, me] = torch.tensor(call.rows_to)
    flat = torch.cat([t.reshape(-1), torch.tensor([tokens, gathered_bytes])]).to(device)
    with guard(group_site("benchmark peer traffic", groups.ep)):
        dist.all_reduce(flat, group=groups.ep)
    flat = flat.cpu()
    t, (tokens_all, gathered_all) = flat[:-2].reshape(3, W, W), flat[-2:].tolist()
    if not torch.equal(t[0], t[1]):
        raise RuntimeError("megatron-core's dispatcher sent its probabilities with other splits than its tokens")
    row_bytes = [c.row_bytes for c in calls] if calls else [0, 0, 0]
    msgs = lambda i: [(s, r, int(t[i, s, r])) for s in range(W) for r in range(W)]  # noqa: E731
    # A dispatch row is its token and its probability (same splits, two collectives: two messages each).
    rows = stats_of_messages(msgs(0), row_bytes[0] + row_bytes[1], groups.topology)
    dispatch = replace(rows, messages_same_node=2 * rows.messages_same_node,
                       messages_cross_node=2 * rows.messages_cross_node)
    combine = stats_of_messages(msgs(2), row_bytes[2], groups.topology)
    routes = int(t[0].sum())
    notes = {
        "peer": "megatron", "layer": "megatron.core.transformer.moe.moe_layer.MoELayer",
        "dispatcher": "MoEAlltoAllTokenDispatcher", "experts": "SequentialMLP", "version": _megatron_version(),
        "routes": routes,  # (token, expert) pairs, all ranks: its dispatch rows (no padding)
        "all_to_all_forward": len(calls),
        # its per-expert counts (E int64 per rank) all_gathered per forward: each rank's to W - 1 others
        "count_all_gather_bytes_sent_all_ranks": gathered_all * (W - 1),
        "placement": "contiguous (rank r holds experts r*E/W .. (r+1)*E/W - 1)",
        "differs": ["k copies per token (one per chosen expert), no dedup per rank or node",
                    "token rows and their probabilities in two all_to_all_single calls; counts by all_gather",
                    "experts: SequentialMLP (one GEMM pair per local expert), ours: GroupedExperts",
                    "contiguous placement only (a --plan applies to our rows)"],
    }
    return PeerTraffic(dispatch, combine, int(tokens_all), notes)


def _megatron_version() -> str:
    from importlib.metadata import version
    return version("megatron-core")


def bench_megatron(config: Config, routing: Optional[tuple[torch.Tensor, torch.Tensor]], routing_desc: str,
                   trace_layer: Optional[int], groups, device: torch.device, x_TD: torch.Tensor, grad_TD: torch.Tensor,
                   show: bool, network_interface: Optional[str] = None) -> BenchRecord:
    """megatron-core's MoE layer timed exactly like measure_layer (measure_module), bytes from the
    all2all calls its dispatcher made in the last timed forward."""
    peer = build_megatron_peer(config, groups, device, routing)
    recorder = _recorder()

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        recorder.calls, recorder.gathered_bytes = [], 0
        out_TD, aux = peer(x)
        keep = (recorder.calls, recorder.gathered_bytes)
        recorder.calls = None
        return out_TD, aux, keep

    label = f"{'megatron':>12}" + (f" layer {trace_layer:>2}" if trace_layer is not None else "")
    with quiet_megatron():
        meas, (calls, gathered) = measure_module(peer, step, x_TD, grad_TD, config.run.warmup_iters, config.run.iters,
                                                 groups.ep, groups.topology, label, show, network_interface)
    traffic = megatron_traffic(calls, gathered, x_TD.shape[0], groups, device)
    record = peer_record("megatron", config, routing_desc, trace_layer, str(groups.topology), meas, traffic,
                         _routing_differences(config, routing is not None))
    if show:
        n = traffic.notes
        print(f"megatron-core {n['version']} MoELayer (alltoall dispatcher, SequentialMLP)"
              f"{'' if trace_layer is None else f' (layer {trace_layer})'}: {n['routes']} routes, k copies per "
              f"token, 3 all2alls + 1 count all_gather per forward"
              + ("" if record.routing == routing_desc else "; routing differs from ours (config.peer.differs)"),
              file=sys.stderr)
    return record


def _routing_differences(config: Config, given_routing: bool) -> list[str]:
    """What differs between its router and ours for this config; entries that change which experts or
    weights a token gets start with 'routing'."""
    if given_routing:  # (capacity mode with peers is refused before launch: the peers run dropless)
        return []
    r, out = config.routing, []
    if r.kind != "topk":
        out.append(f"routing: plain top-k, ours is the {r.kind} router")
    if config.run.dtype != "float32":
        out.append(f"routing weights: its router rounds its softmax scores to {config.run.dtype} (ours keeps them in "
                   "fp32; ties may also pick other experts)")
    if config.model.top_k == 1 and r.renormalize:
        out.append("routing weights: its top-1 weight is the softmax probability (megatron-core needs pre-softmax "
                   "at k = 1), ours is renormalised to 1")
    if r.noise_std:
        out.append("routing: no gate noise (ours: routing.noise_std)")
    if r.aux_loss_weight and r.kind == "topk":
        out.append("aux loss: megatron-core's switch-style load-balancing loss (its scaling), ours: ours")
    if r.z_loss_weight:
        out.append("aux loss: no z-loss")
    return out
