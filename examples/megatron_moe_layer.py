"""A megatron-core MoELayer with c2r-comm's dispatcher, next to the same layer with megatron-core's own.

    torchrun --standalone --nproc-per-node 2 examples/megatron_moe_layer.py
    torchrun --standalone --nproc-per-node 4 examples/megatron_moe_layer.py --dispatcher hierarchical --nodes 2
    torchrun --standalone --nproc-per-node 4 examples/megatron_moe_layer.py --expert-parallel 2   # 2 EP groups

Needs `pip install 'c2r-comm[megatron]'` (megatron-core 0.16.1; no Transformer Engine). On GPUs it
runs as is (NCCL); on a CPU-only machine (gloo) it first installs the CPU-only shims for
megatron-core's CUDA-only parts (`c2r_comm.bench.megatron_peer.install_cpu_only_shims`, the
benchmark peer's). It builds the layer from
megatron-core's own TransformerConfig and local layer spec, swaps the MoE module with
`use_c2r_dispatcher`, copies the weights into a reference layer that uses megatron-core's
MoEAlltoAllTokenDispatcher, runs forward + backward of both and prints the largest differences and
the time per iteration.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from c2r_comm.bench.megatron_peer import install_cpu_only_shims  # CPU only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dispatcher", default="dedup", choices=["dedup", "hierarchical"])
    ap.add_argument("--nodes", type=int, default=1, help="nodes the expert-parallel group spans")
    ap.add_argument("--expert-parallel", type=int, default=None, help="EP size (default: the world)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    else:
        install_cpu_only_shims()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from c2r_comm.integrations.megatron import C2RMegatronOptions, megatron_process_groups, use_c2r_dispatcher

    ep = args.expert_parallel or dist.get_world_size()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=4, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=2 * args.hidden, ffn_hidden_size=2 * args.hidden,
        moe_token_dispatcher_type="alltoall",  # MoELayer builds this one; C2RMoELayer replaces it
        moe_router_load_balancing_type="none", add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, use_cpu_initialization=True, expert_model_parallel_size=ep)
    layer_spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)

    # The one thing a Megatron model changes: the MoE module of its layer spec (groups built once).
    options = C2RMegatronOptions(dispatcher=args.dispatcher, groups=megatron_process_groups(nodes=args.nodes))
    c2r_spec = use_c2r_dispatcher(layer_spec, options)

    torch.manual_seed(0)
    ours = build_module(c2r_spec.submodules.mlp, config=config).to(device)
    reference = build_module(layer_spec.submodules.mlp, config=config).to(device)
    reference.load_state_dict(ours.state_dict())  # same router and experts (contiguous placement)

    torch.manual_seed(1 + dist.get_rank())
    x = torch.randn(args.tokens, 1, args.hidden, device=device)
    grad = torch.randn_like(x)
    results = {}
    for name, layer in (("megatron alltoall", reference), (f"c2r {args.dispatcher}", ours)):
        times = []
        for _ in range(args.iters):
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            out, _ = layer(xi)
            (out * grad).sum().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = (out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()], sorted(times))
    (o_ref, gx_ref, gp_ref, t_ref), (o, gx, gp, t) = results.values()
    diffs = torch.tensor([float((o - o_ref).abs().max()), float((gx - gx_ref).abs().max()),
                          max(float((a - b).abs().max()) for a, b in zip(gp, gp_ref))], device=device)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks, EP {ep}, {args.experts} experts, top-{args.topk}, "
              f"{args.tokens} tokens/rank")
        for name, (*_, times) in results.items():
            print(f"  {name:20s} fwd+bwd median {1e3 * times[len(times) // 2]:8.2f} ms (rank 0)")
        print(f"  largest |c2r - megatron| over ranks: output {diffs[0]:.2e}, input grad {diffs[1]:.2e}, "
              f"weight grads {diffs[2]:.2e}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
