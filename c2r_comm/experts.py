"""Grouped local experts (SwiGLU) laid out in the plan's local slots; zero-token safe.

Weights are initialised per *global* expert id from (seed, expert id), so the same expert has the
same weights wherever a plan puts it: placement never changes results.

Two ways to run the local experts, same results to floating-point tolerance:
  * grouped GEMM: one `grouped_mm` per projection over all local experts (no host sync, no per-expert
    launches). Used where `grouped_mm_available(device, dtype)` says the installed torch has a fast
    kernel for it, i.e. CUDA sm90/sm100 with bf16 (elsewhere torch's grouped_mm is a per-group loop,
    on CUDA with a host sync), and hidden/ffn rows are 16-byte aligned.
  * loop: per-expert *views* of the stacked weights (one `unbind`), as one autograd node whose
    backward writes each expert's weight gradient straight into the stacked [L, D, F] gradient (no
    per-expert zero-fill of the whole gradient, no stack copy afterwards).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from c2r_comm.dispatch.layout import expert_offsets  # noqa: F401 (re-exported: the offsets dispatch hands over)
from c2r_comm.plan import PlacementPlan


def init_expert_weights(expert_id: int, hidden_size: int, ffn_size: int, seed: int,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_gate [D, F], w_up [D, F], w_down [F, D]) of one global expert, deterministic."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + expert_id)
    w_gate = torch.randn(hidden_size, ffn_size, generator=g) / math.sqrt(hidden_size)
    w_up = torch.randn(hidden_size, ffn_size, generator=g) / math.sqrt(hidden_size)
    w_down = torch.randn(ffn_size, hidden_size, generator=g) / math.sqrt(ffn_size)
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)


def swiglu(x_ND: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor,
           scale_N1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU; scale_N1 (a routing weight per row) multiplies the [N, F] activation before the down
    projection, which equals scaling the [N, D] output at F/D of the cost."""
    act_NF = F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)
    return (act_NF if scale_N1 is None else act_NF * scale_N1) @ w_down_FD


def grouped_mm_op() -> Optional[Callable[..., torch.Tensor]]:
    """The installed torch's grouped matmul: the public name (newer torch) first, then the private one."""
    op = getattr(F, "grouped_mm", None)
    return op if op is not None else getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether grouped GEMM is the default path for experts of `dtype` on `device`.

    True only where torch runs grouped_mm as one fused kernel: CUDA (not ROCm) devices of compute
    capability 9.x or 10.x with bf16 (torch's `_grouped_mm_cuda` fast path). Everywhere else torch
    falls back to one mm per group, on CUDA after copying `offs` to the host (a sync), so the loop path
    is no slower and needs no sync. On CPU (fp32/bf16/fp16 fallback) `c2r-comm bench-experts` measured
    it no faster than the loop path, so CPU is False too.
    """
    device = torch.device(device)
    if grouped_mm_op() is None or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.version.hip is not None or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major in (9, 10)


def grouped_mm_shapes_ok(hidden_size: int, ffn_size: int, dtype: torch.dtype) -> bool:
    """grouped_mm needs every row stride 16-byte aligned: hidden and ffn sizes x element size."""
    return hidden_size * dtype.itemsize % 16 == 0 and ffn_size * dtype.itemsize % 16 == 0


def _dense_grad(grad: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects broadcast (stride-0) gradients, e.g. the one out.sum().backward() sends.
    return grad.contiguous()


def grouped_swiglu(x_PD: torch.Tensor, w_gate_LDF: torch.Tensor, w_up_LDF: torch.Tensor, w_down_LFD: torch.Tensor,
                   offsets_E: torch.Tensor, weight_P: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every local expert's SwiGLU on its rows with one grouped GEMM per projection.

    Rows are grouped by expert; offsets_E (int32, on x's device) holds each group's END offset.
    Needs a torch with grouped_mm and 16-byte aligned rows (see grouped_mm_shapes_ok).
    """
    mm = grouped_mm_op()
    if mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm: use the loop path")
    h_gate_PF = mm(x_PD, w_gate_LDF, offs=offsets_E)
    h_up_PF = mm(x_PD, w_up_LDF, offs=offsets_E)
    act_PF = F.silu(h_gate_PF) * h_up_PF
    if weight_P is not None:
        act_PF = act_PF * weight_P.to(act_PF.dtype).unsqueeze(1)
    out_PD = mm(act_PF, w_down_LFD, offs=offsets_E)
    if out_PD.requires_grad:
        out_PD.register_hook(_dense_grad)
    return out_PD


def per_expert_mm(x_PK: torch.Tensor, w_LKN: torch.Tensor, counts: Sequence[int], offsets_E: Optional[torch.Tensor],
                  grouped: bool) -> torch.Tensor:
    """Row block e of x times w[e], for every expert e (rows grouped by expert): one grouped GEMM,
    or a loop over the experts' weight views."""
    if grouped:
        return grouped_mm_op()(x_PK, w_LKN, offs=offsets_E)
    parts = [c @ w for c, w in zip(torch.split(x_PK, list(counts)), w_LKN.unbind(0))]
    return torch.cat(parts) if parts else x_PK.new_zeros(0, w_LKN.shape[2])


def per_expert_outer(a_PM: torch.Tensor, b_PN: torch.Tensor, counts: Sequence[int], offsets_E: Optional[torch.Tensor],
                     grouped: bool) -> torch.Tensor:
    """[L, M, N]: a_e^T b_e per expert (the weight gradient of a grouped projection), each written
    straight into the stacked result (no per-expert temporaries stacked afterwards)."""
    if grouped:
        out = grouped_mm_op()(a_PM.t(), b_PN, offs=offsets_E)
        for e in (e for e, n in enumerate(counts) if n == 0):  # undefined on some GPUs for empty groups
            out[e].zero_()
        return out
    out = a_PM.new_empty(len(counts), a_PM.shape[1], b_PN.shape[1])
    for e, (a, b) in enumerate(zip(torch.split(a_PM, list(counts)), torch.split(b_PN, list(counts)))):
        torch.mm(a.t(), b, out=out[e])  # no rows: zeros
    return out


@dataclass(frozen=True)
class SwiGLUSaved:
    """What SwiGLU's backward needs from its forward (rows grouped by expert)."""

    x: torch.Tensor
    hg: torch.Tensor  # x Wg
    hu: torch.Tensor  # x Wu
    a: torch.Tensor  # silu(hg) * hu
    a_s: torch.Tensor  # a * routing weight (a when there is none)


def swiglu_rows_forward(x_PD, weight_P, w_gate, w_up, w_down, counts, offsets_E, grouped) -> tuple[torch.Tensor, SwiGLUSaved]:
    """y = ((silu(x Wg) * x Wu) * s) Wd per expert, and what backward needs."""
    hg = per_expert_mm(x_PD, w_gate, counts, offsets_E, grouped)
    hu = per_expert_mm(x_PD, w_up, counts, offsets_E, grouped)
    a = F.silu(hg) * hu
    a_s = a if weight_P is None else a * weight_P.to(a.dtype).unsqueeze(1)
    return per_expert_mm(a_s, w_down, counts, offsets_E, grouped), SwiGLUSaved(x_PD, hg, hu, a, a_s)


def swiglu_rows_backward(saved: SwiGLUSaved, gy_PD, weight_P, w_gate, w_up, w_down, counts, offsets_E, grouped):
    """Input gradients (gx, g_weight or None) and the weight-gradient inputs (g_hg, g_hu):
    gWg = x^T g_hg, gWu = x^T g_hu, gWd = a_s^T gy, per expert."""
    g_as = per_expert_mm(gy_PD, w_down.transpose(1, 2), counts, offsets_E, grouped)
    g_weight, g_a = None, g_as
    if weight_P is not None:
        g_weight = (g_as * saved.a).sum(1).to(weight_P.dtype)
        g_a = g_as * weight_P.to(g_as.dtype).unsqueeze(1)
    g_hu = g_a * F.silu(saved.hg)
    g_hg = torch.ops.aten.silu_backward(g_a * saved.hu, saved.hg)  # fused: grad * silu'(hg)
    gx = per_expert_mm(g_hg, w_gate.transpose(1, 2), counts, offsets_E, grouped) + \
        per_expert_mm(g_hu, w_up.transpose(1, 2), counts, offsets_E, grouped)
    return gx, g_weight, g_hg, g_hu


class _LoopSwiGLU(torch.autograd.Function):
    """The loop path as one autograd node: per-expert GEMMs over weight views, and a backward that
    writes each expert's weight gradient straight into the stacked [L, D, F] gradient (autograd over
    `unbind` views would stack L separate gradients afterwards: a full extra copy per weight)."""

    @staticmethod
    def forward(ctx, counts, x_PD, weight_P, w_gate, w_up, w_down):
        y, saved = swiglu_rows_forward(x_PD, weight_P, w_gate, w_up, w_down, counts, None, False)
        ctx.counts, ctx.has_weight = counts, weight_P is not None
        ctx.save_for_backward(saved.x, saved.hg, saved.hu, saved.a, saved.a_s,
                              weight_P if weight_P is not None else x_PD.new_zeros(0), w_gate, w_up, w_down)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy_PD):
        x, hg, hu, a, a_s, weight_P, w_gate, w_up, w_down = ctx.saved_tensors
        counts, gy_PD = ctx.counts, gy_PD.contiguous()
        saved = SwiGLUSaved(x, hg, hu, a, a_s)
        gx, g_weight, g_hg, g_hu = swiglu_rows_backward(saved, gy_PD, weight_P if ctx.has_weight else None,
                                                        w_gate, w_up, w_down, counts, None, False)
        n = ctx.needs_input_grad
        g_gate = per_expert_outer(x, g_hg, counts, None, False) if n[3] else None
        g_up = per_expert_outer(x, g_hu, counts, None, False) if n[4] else None
        g_down = per_expert_outer(a_s, gy_PD, counts, None, False) if n[5] else None
        return None, gx if n[1] else None, g_weight if n[2] else None, g_gate, g_up, g_down


def looped_swiglu(x_PD: torch.Tensor, tokens_per_expert: Sequence[int], w_gate_LDF: torch.Tensor,
                  w_up_LDF: torch.Tensor, w_down_LFD: torch.Tensor, weight_P: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every local expert's SwiGLU on its rows, one expert at a time over per-expert weight views,
    as one autograd node (_LoopSwiGLU). Empty experts still get a (zero) weight gradient."""
    return _LoopSwiGLU.apply(tuple(int(n) for n in tokens_per_expert), x_PD, weight_P, w_gate_LDF, w_up_LDF,
                             w_down_LFD)


class GroupedExperts(nn.Module):
    """The experts of one rank: w_gate_LDF, w_up_LDF, w_down_LFD indexed by local slot.

    use_grouped_mm: None picks per (device, dtype) of the weights with grouped_mm_available and
    grouped_mm_shapes_ok; True always takes the grouped-GEMM path (for benchmarks and tests; zero
    rows still take the loop); False always loops.
    """

    def __init__(self, global_ids: Sequence[int], hidden_size: int, ffn_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 use_grouped_mm: Optional[bool] = None):
        super().__init__()
        self.global_ids = tuple(int(e) for e in global_ids)
        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        if use_grouped_mm and grouped_mm_op() is None:
            raise ValueError(f"use_grouped_mm=True but torch {torch.__version__} has no grouped_mm")
        if use_grouped_mm and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"use_grouped_mm=True needs float32, bfloat16 or float16 weights (torch's grouped_mm), "
                             f"got {dtype}")
        if use_grouped_mm and not grouped_mm_shapes_ok(hidden_size, ffn_size, dtype):
            raise ValueError(f"use_grouped_mm=True needs hidden ({hidden_size}) and ffn ({ffn_size}) sizes whose "
                             f"{dtype} rows are multiples of 16 bytes")
        self.use_grouped_mm = use_grouped_mm
        self._grouped_mm_by: dict[tuple[torch.device, torch.dtype], bool] = {}  # decided once per pair
        weights = [init_expert_weights(e, hidden_size, ffn_size, seed, dtype) for e in self.global_ids]
        stack = lambda i: nn.Parameter(torch.stack([w[i] for w in weights]).to(device))  # noqa: E731
        self.w_gate_LDF, self.w_up_LDF, self.w_down_LFD = stack(0), stack(1), stack(2)

    @classmethod
    def for_rank(cls, plan: PlacementPlan, rank: int, hidden_size: int, ffn_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "GroupedExperts":
        return cls(plan.rank_experts[rank], hidden_size, ffn_size, seed, dtype, device)

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    # ---- state dict: which global expert each slot holds travels with the weights ----------------
    WEIGHTS = ("w_gate_LDF", "w_up_LDF", "w_down_LFD")

    def get_extra_state(self) -> dict:
        """Saved as `<prefix>_extra_state`: the global expert id of every local slot."""
        return {"global_ids": list(self.global_ids)}

    def set_extra_state(self, state: dict) -> None:
        """Nothing to set: the ids were checked, and the slots reordered, before the weights loaded."""

    def slot_order(self, state_dict: Mapping, prefix: str) -> Optional[list[int]]:
        """The saved slot of each of this layer's slots, when a state dict's experts are these in
        another order (None: the same order, or a state dict saved before the ids were). ValueError
        when the state dict holds other experts: loading them would silently compute with the wrong
        weights (e.g. a layer built with another placement plan)."""
        saved = state_dict.get(prefix + "_extra_state")
        if saved is None:
            return None
        saved_ids = [int(e) for e in saved["global_ids"]]
        if saved_ids == list(self.global_ids):
            return None
        if sorted(saved_ids) != sorted(self.global_ids):
            raise ValueError(f"state dict {prefix or 'of the experts'}: its slots hold experts {saved_ids}, this "
                             f"rank's placement puts experts {list(self.global_ids)} here; allowed a state dict "
                             "saved under the same placement (build the layer with the plan it was saved under and "
                             "move the experts with MoELayer.apply_plan, or load per expert id as "
                             "train/checkpoint.py does)")
        return [saved_ids.index(e) for e in self.global_ids]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        order = self.slot_order(state_dict, prefix)
        if order is not None:  # the same experts in other slots: take each slot's rows from where they were
            for name in self.WEIGHTS:
                if prefix + name in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + name][order]
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # an older state dict: no ids
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def grouped_mm_path(self) -> bool:
        """Whether forward takes the grouped-GEMM path for the weights' current device and dtype."""
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        key = (self.w_gate_LDF.device, self.w_gate_LDF.dtype)
        if key not in self._grouped_mm_by:
            self._grouped_mm_by[key] = (grouped_mm_available(*key)
                                        and grouped_mm_shapes_ok(self.hidden_size, self.ffn_size, key[1]))
        return self._grouped_mm_by[key]

    def forward(self, x_PD: torch.Tensor, tokens_per_expert: Sequence[int],
                offsets_E: Optional[torch.Tensor] = None, weight_P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows grouped by local slot (counts in tokens_per_expert) -> outputs in the same order.

        offsets_E: optional int32 [L] END offsets of the groups on x's device (expert_offsets of the
        counts); the grouped-GEMM path uses it as is, so the caller's device counts need no host copy.
        weight_P: optional routing weight per row (ExpertBatch.weight_P); the output rows come back
        multiplied by it (applied to the [P, F] activation, the cheapest place), for
        `combine(..., weighted=True)`.
        """
        L = self.num_local_experts
        if len(tokens_per_expert) != L or sum(tokens_per_expert) != x_PD.shape[0]:
            raise ValueError(f"tokens_per_expert {list(tokens_per_expert)} does not match {L} "
                             f"local experts and {x_PD.shape[0]} rows")
        if offsets_E is not None and (offsets_E.shape != (L,) or offsets_E.dtype != torch.int32
                                      or offsets_E.device != x_PD.device):
            raise ValueError(f"offsets_E must be int32 [{L}] on {x_PD.device}, got {offsets_E.dtype} "
                             f"{list(offsets_E.shape)} on {offsets_E.device}")
        if weight_P is not None and weight_P.shape != (x_PD.shape[0],):
            raise ValueError(f"weight_P must hold one weight per row [{x_PD.shape[0]}], got {list(weight_P.shape)}")
        weights = (self.w_gate_LDF, self.w_up_LDF, self.w_down_LFD)
        if self.grouped_mm_path() and x_PD.shape[0] > 0 and x_PD.dtype == self.w_gate_LDF.dtype:
            x_PD = x_PD.contiguous()
            if x_PD.data_ptr() % 16 == 0:
                if offsets_E is None:  # host counts -> device: a blocking copy on CUDA (dispatchers pass offsets_E)
                    offsets_E = torch.tensor(list(itertools.accumulate(tokens_per_expert)), dtype=torch.int32,
                                             device=x_PD.device)
                return grouped_swiglu(x_PD, *weights, offsets_E, weight_P)
        return looped_swiglu(x_PD, tokens_per_expert, *weights, weight_P)


class SharedExpert(nn.Module):
    """Dense SwiGLU every token goes through (DeepSeek / Qwen shared experts); no communication."""

    def __init__(self, hidden_size: int, ffn_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        w = init_expert_weights(-1, hidden_size, ffn_size, seed, dtype)  # id -1: never a routed expert
        self.w_gate_DF, self.w_up_DF, self.w_down_FD = (nn.Parameter(t) for t in w)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)


def reference_moe(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                  experts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Single-process MoE: out[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]). For tests and checks."""
    out = x_TD.new_zeros(x_TD.shape)
    for e, (wg, wu, wd) in enumerate(experts):
        t, k = (topk_idx_TK == e).nonzero(as_tuple=True)
        if t.numel():
            out = out.index_add(0, t, swiglu(x_TD[t], wg, wu, wd) * topk_weight_TK[t, k].unsqueeze(1))
    return out
