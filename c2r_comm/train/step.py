"""One training step of the demo model across ranks, and held-out evaluation, with their metrics.

Objective: the mean over ranks of each rank's mean token cross-entropy (+ router auxiliary losses).
Each rank back-propagates its own loss / world size; the replicated weights' gradients are then
summed over ranks (one all_reduce of one flat buffer) and every rank takes the same optimizer step;
routed experts' gradients need no reduction (the dispatch already brought every rank's tokens).
Metrics travel in one more all_reduce per step: loss, tokens, expert loads, copies and distinct
GPUs per token, so every rank logs the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.counting import bucket_counts
from c2r_comm.routing.collaboration import CollaborationProfiler
from c2r_comm.train.model import LMOutput, MoETransformerLM


@dataclass(frozen=True)
class StepMetrics:
    loss: float  # mean token cross-entropy over every rank's tokens
    aux_loss: float
    load_cv: float  # coefficient of variation of the expert loads (chosen (token, expert) pairs), mean over layers
    # rows the dispatches sent (kept on the rank included) per token and layer: copies of a token for
    # alltoall (k) and dedup (distinct GPUs); hierarchical counts both its stages (hops)
    copies_per_token: float
    gpus_per_token: float  # E[distinct GPUs a token's experts live on], mean over layers

    def as_dict(self) -> dict[str, float]:
        return dict(loss=self.loss, aux_loss=self.aux_loss, load_cv=self.load_cv,
                    copies_per_token=self.copies_per_token, gpus_per_token=self.gpus_per_token)


def _distinct_ranks(geo, idx_TK: torch.Tensor, by_node: bool) -> torch.Tensor:
    """Distinct GPUs each token's experts are sent to: the dispatcher's own choice of copies (exact
    without a plan copy_load_cap: the cover is minimal whatever batch the choice sees; with one, the
    layer's chunks may balance, and so choose, slightly differently from this whole-batch call)."""
    r_TK = geo.copies(idx_TK, torch.ones_like(idx_TK, dtype=torch.bool), by_node)[0].sort(dim=1).values
    return 1 + (r_TK[:, 1:] != r_TK[:, :-1]).sum(dim=1)


def _metrics(model: MoETransformerLM, out: LMOutput, ce_sum: torch.Tensor, tokens: int, group: Any) -> StepMetrics:
    """One all_reduce of [ce sum, tokens, aux, copies, distinct GPUs, loads per layer and expert]."""
    E = model.moes[0].router.num_experts if model.moes else 1
    loads = [bucket_counts(i, E).to(torch.float64) for i in out.topk_idx_LTK]
    distinct = [_distinct_ranks(m.dispatcher.geometry(i.device), i, m.dispatcher.name == "hierarchical").sum()
                for m, i in zip(model.moes, out.topk_idx_LTK)]  # the dispatcher's cached expert -> rank maps
    device = ce_sum.device

    def scalar(value: float) -> torch.Tensor:  # filled on the device: no host->device copy (a sync on CUDA)
        return torch.full((), value, dtype=torch.float64, device=device)

    head = torch.stack([ce_sum.detach().to(torch.float64), scalar(float(tokens)),
                        out.aux_loss.detach().to(device, torch.float64) * tokens,
                        scalar(float(sum(out.rows_sent_L))),
                        torch.stack(distinct).sum().to(torch.float64) if distinct
                        else torch.zeros((), dtype=torch.float64, device=device)])
    packed = torch.cat([head] + loads)
    if dist.get_backend(group) != "nccl":
        packed = packed.cpu()
    with guard(group_site("training metrics reduction", group)):
        dist.all_reduce(packed, group=group)
    packed = packed.cpu()  # the metrics' one host sync per step
    ce, n, aux, copies, gpus = packed[:5].tolist()
    L = max(len(loads), 1)
    cvs = [(ld.std(unbiased=False) / ld.mean()).item() if ld.mean() > 0 else 0.0 for ld in packed[5:].view(-1, E)] \
        if loads else [0.0]
    return StepMetrics(ce / n, aux / n, sum(cvs) / len(cvs), copies / (n * L), gpus / (n * L))


def train_step(model: MoETransformerLM, optimizer: torch.optim.Optimizer, inputs_BS: torch.Tensor,
               targets_BS: torch.Tensor, group: Any, profiler: Optional[CollaborationProfiler] = None) -> StepMetrics:
    """profiler: collects each MoE layer's routing of this step (for live re-planning, train/replan.py)."""
    world = dist.get_world_size(group)
    optimizer.zero_grad(set_to_none=True)
    out = model(inputs_BS)
    if profiler is not None:
        for layer, idx_TK in enumerate(out.topk_idx_LTK):
            profiler.update(layer, idx_TK.detach(), check=False)  # the router's own ids: valid
    ce_sum = F.cross_entropy(out.logits_BSV.reshape(-1, out.logits_BSV.shape[-1]), targets_BS.reshape(-1),
                             reduction="sum")
    tokens = targets_BS.numel()
    ((ce_sum / tokens + out.aux_loss) / world).backward()
    replicated = [p for p in model.replicated_parameters() if p.grad is not None]
    if world > 1 and replicated:
        flat = _flatten_dense_tensors([p.grad for p in replicated])
        with guard(group_site("training gradient all-reduce", group)):
            dist.all_reduce(flat, group=group)
        for p, g in zip(replicated, _unflatten_dense_tensors(flat, [p.grad for p in replicated])):
            p.grad.copy_(g)
    for moe in model.moes:  # replica plans: every copy of an expert gets the sum of the copies' gradients
        moe.sync_replica_grads()
    optimizer.step()
    return _metrics(model, out, ce_sum, tokens, group)


@torch.no_grad()
def evaluate(model: MoETransformerLM, batches: list[tuple[torch.Tensor, torch.Tensor]], group: Any) -> StepMetrics:
    """Held-out metrics averaged over `batches` (every rank passes its own, the same number); the
    model in eval mode meanwhile (no router noise)."""
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, batches, group)
    finally:
        model.train(was_training)


def _evaluate(model: MoETransformerLM, batches: list[tuple[torch.Tensor, torch.Tensor]], group: Any) -> StepMetrics:
    totals = None
    for inputs_BS, targets_BS in batches:
        out = model(inputs_BS)
        ce_sum = F.cross_entropy(out.logits_BSV.reshape(-1, out.logits_BSV.shape[-1]), targets_BS.reshape(-1),
                                 reduction="sum")
        m = _metrics(model, out, ce_sum, targets_BS.numel(), group)
        totals = [m] if totals is None else totals + [m]
    n = len(totals)
    return StepMetrics(*(sum(getattr(m, f) for m in totals) / n for f in
                         ("loss", "aux_loss", "load_cv", "copies_per_token", "gpus_per_token")))
