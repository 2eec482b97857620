"""Record routing from Hugging Face transformers MoE models into a RoutingTrace (extra `hf`).

A sparse MoE block is any module with both a `gate` and an `experts` child (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and others). A forward hook on the gate reads the chosen
experts from what the gate returns:
- a tuple holding an integer [tokens, k] tensor (transformers 5 routers return
  (logits, weights, indices); DeepSeek-style gates return indices and weights), or
- a float [tokens, E] logits tensor (gates that are a plain nn.Linear, as in transformers 4
  Mixtral/Qwen-MoE blocks): the block's own rule, softmax then top-k, is applied to it.
Only the torch module tree is inspected, so transformers itself is never imported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from c2r_comm.routing.trace import RoutingTrace


@dataclass(frozen=True)
class MoEGateSite:
    name: str  # module path of the MoE block
    block: nn.Module
    gate: nn.Module
    num_experts: int
    top_k: int


def _first_int_attr(modules: Iterable[Any], names: Iterable[str]) -> Optional[int]:
    for m in modules:
        for n in names:
            v = getattr(m, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def find_moe_gates(model: nn.Module) -> list[MoEGateSite]:
    """Every sparse MoE block of `model`, in module order (= layer order)."""
    config = getattr(model, "config", None)
    sites = []
    for name, block in model.named_modules():
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
            continue
        num_experts = _first_int_attr([gate, block, experts], ["num_experts", "n_routed_experts"])
        if num_experts is None and isinstance(gate, nn.Linear):
            num_experts = gate.out_features
        if num_experts is None and isinstance(experts, nn.ModuleList):
            num_experts = len(experts)
        top_k = _first_int_attr([gate, block, config], ["top_k", "num_experts_per_tok"])
        if num_experts is None or top_k is None:
            raise ValueError(f"MoE block {name!r} ({type(block).__name__}): cannot tell its number of experts "
                             f"({num_experts}) or top_k ({top_k}) from the gate, the block or the model config")
        sites.append(MoEGateSite(name, block, gate, num_experts, top_k))
    return sites


def _indices_from_gate_output(output: Any, site: MoEGateSite) -> torch.Tensor:
    """[tokens, k] int64 on the host from whatever the gate returned."""
    if isinstance(output, (tuple, list)):
        for item in output:
            if torch.is_tensor(item) and not item.dtype.is_floating_point and item.shape[-1:] == (site.top_k,):
                return item.detach().reshape(-1, site.top_k).long().cpu()
    elif torch.is_tensor(output) and output.dtype.is_floating_point and output.shape[-1] == site.num_experts:
        probs = torch.softmax(output.detach().float().reshape(-1, site.num_experts), dim=-1)
        return torch.topk(probs, site.top_k, dim=-1).indices.cpu()
    shape = tuple(output.shape) if torch.is_tensor(output) else [type(o).__name__ for o in output] \
        if isinstance(output, (tuple, list)) else type(output).__name__
    raise ValueError(f"gate of {site.name!r} ({type(site.gate).__name__}) returned {shape}: expected a tuple with an "
                     f"integer [tokens, {site.top_k}] tensor or float logits [tokens, {site.num_experts}]")


class RoutingRecorder:
    """Context manager that records the experts each MoE gate chooses.

    Each forward pass appends its tokens to the current prompt; `end_prompt()` closes it. Run one
    prompt per forward (batch size 1) so padding is not recorded as tokens.
    """

    def __init__(self, model: nn.Module, sites: Optional[list[MoEGateSite]] = None):
        self.sites = sites if sites is not None else find_moe_gates(model)
        if not self.sites:
            raise ValueError(f"{type(model).__name__} has no MoE block (a module with `gate` and `experts` children)")
        ks = {s.top_k for s in self.sites}
        es = {s.num_experts for s in self.sites}
        if len(ks) != 1 or len(es) != 1:
            raise ValueError(f"MoE blocks disagree on top_k {sorted(ks)} or number of experts {sorted(es)}; "
                             f"a RoutingTrace needs one of each")
        self.top_k, self.num_experts = ks.pop(), es.pop()
        self._chunks: list[list[torch.Tensor]] = [[] for _ in self.sites]
        self._prompt_ends: list[int] = []
        self._handles: list[Any] = []

    def _hook(self, index: int):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            self._chunks[index].append(_indices_from_gate_output(output, self.sites[index]))
        return record

    def attach(self) -> "RoutingRecorder":
        if not self._handles:
            self._handles = [s.gate.register_forward_hook(self._hook(i)) for i, s in enumerate(self.sites)]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _tokens_per_site(self) -> list[int]:
        return [sum(c.shape[0] for c in chunks) for chunks in self._chunks]

    def end_prompt(self) -> None:
        counts = self._tokens_per_site()
        if len(set(counts)) != 1:
            raise ValueError(f"MoE blocks saw different token counts {counts}; was a forward pass interrupted?")
        if counts[0] > (self._prompt_ends[-1] if self._prompt_ends else 0):
            self._prompt_ends.append(counts[0])

    def to_trace(self) -> RoutingTrace:
        """Everything recorded so far; an open prompt is closed first."""
        self.end_prompt()
        tokens = self._prompt_ends[-1] if self._prompt_ends else 0
        if tokens == 0:
            ids_TLK = np.zeros((0, len(self.sites), self.top_k), dtype=np.int64)
        else:
            ids_TLK = torch.stack([torch.cat(c) for c in self._chunks], dim=1).numpy()
        return RoutingTrace(ids_TLK, np.asarray([0] + self._prompt_ends, dtype=np.int64), self.num_experts)


@torch.no_grad()
def record_prompts(model: nn.Module, prompts: Iterable[torch.Tensor]) -> RoutingTrace:
    """Run each prompt (input_ids [seq] or [1, seq]) through `model` once; one trace prompt each."""
    recorder = RoutingRecorder(model)
    with recorder:
        for input_ids in prompts:
            ids = torch.as_tensor(input_ids)
            ids = ids[None] if ids.ndim == 1 else ids
            if ids.ndim != 2 or ids.shape[0] != 1:
                raise ValueError(f"each prompt must be input_ids [seq] or [1, seq], got shape {tuple(ids.shape)}")
            model(input_ids=ids)
            recorder.end_prompt()
    return recorder.to_trace()
