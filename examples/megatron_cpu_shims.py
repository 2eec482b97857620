"""CPU-ONLY SHIMS for megatron-core 0.16.1, which assumes CUDA in a few places. Not needed (and not
installed) on GPUs; never part of the c2r_comm package. Used by examples/megatron_moe_layer.py and
by the tests (tests/megatron_cases.py)."""
from __future__ import annotations

import contextlib

import torch


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
    """The four monkeypatches megatron-core 0.16.1 needs to run its MoE layer on CPU (gloo)."""
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
