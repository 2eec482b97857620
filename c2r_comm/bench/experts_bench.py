"""Forward + backward time of one rank's local experts alone (no communication), per implementation.

Rows: `rows` tokens, each sent to one of `num_experts` experts uniformly at random (a seeded
multinomial: torch.randint + bincount), grouped by expert as a dispatcher delivers them.

Implementations, all with the same weights (init_expert_weights), rows and output gradient:
  grouped_experts    GroupedExperts on the path it picks itself (`path` says which), given offsets_E
  per_expert_params  a Python loop over separately allocated per-expert nn.Parameters: the reference
  grouped_mm         GroupedExperts forced onto grouped GEMM, where torch has grouped_mm for the
                     device, dtype and shape (otherwise listed under `skipped` with torch's reason)
  stacked_index      the implementation before unbind: stacked weights indexed w[i] per expert
  deferred_wgrad     only with chunks > 1: the pipelined layer's experts (schedule/deferred_wgrad.py),
                     input gradients per chunk, weight gradients once over every chunk
With chunks = C > 1 every implementation runs the rows as C chunks (each expert's rows split evenly
in order), forward and backward one chunk after another, as the pipelined layer does.
One iteration = forward + backward; grads are set to None between iterations (as zero_grad does) and
the implementations take turns each iteration, so machine noise hits them alike.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from c2r_comm.bench.timing import Timing, sync
from c2r_comm.experts import GroupedExperts, expert_offsets, init_expert_weights, swiglu
from c2r_comm.schedule.deferred_wgrad import DeferredWeightGrads, deferred_experts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
REFERENCE = "per_expert_params"


@dataclass(frozen=True)
class ExpertsBenchConfig:
    num_experts: int = 16
    hidden_size: int = 512
    ffn_hidden_size: int = 256
    rows: int = 4096
    dtype: str = "float32"
    device: str = "cpu"
    iters: int = 20
    warmup: int = 3
    seed: int = 0
    chunks: int = 1

    def validate(self) -> None:
        for name in ("num_experts", "hidden_size", "ffn_hidden_size", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: allowed an integer >= 1")
        if self.chunks < 1:
            raise ValueError(f"chunks = {self.chunks}: allowed an integer >= 1")
        for name in ("rows", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: allowed an integer >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: allowed one of {sorted(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: allowed cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device cuda, but this torch ({torch.__version__}) sees no CUDA device: allowed cpu")


@dataclass(frozen=True)
class ImplResult:
    name: str
    path: str  # how it computes: loop / grouped_mm
    timing: Timing
    max_abs_diff: float  # output vs per_expert_params, one forward


@dataclass(frozen=True)
class ExpertsBenchResult:
    config: ExpertsBenchConfig
    tokens_per_expert: tuple[int, ...]
    results: tuple[ImplResult, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it did not run
    threads: int = 1
    torch_version: str = torch.__version__
    device_name: str = ""

    def ratio(self, name: str) -> Optional[float]:
        """Median fwd+bwd time of `name` over the per-expert-parameter loop's."""
        by = {r.name: r.timing.median_ms for r in self.results}
        return by[name] / by[REFERENCE] if name in by and by[REFERENCE] > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "threads": self.threads, "torch": self.torch_version,
                "device_name": self.device_name, "tokens_per_expert": list(self.tokens_per_expert),
                "results": [{"name": r.name, "path": r.path, **asdict(r.timing), "max_abs_diff": r.max_abs_diff,
                             "vs_" + REFERENCE: self.ratio(r.name)} for r in self.results],
                "ratios": {f"{r.name}/{REFERENCE}": self.ratio(r.name) for r in self.results if r.name != REFERENCE},
                "skipped": dict(self.skipped)}


class PerExpertParams(nn.Module):
    """One nn.Parameter triple per expert, separately allocated; a Python loop over experts."""

    def __init__(self, global_ids: Sequence[int], hidden_size: int, ffn_size: int, seed: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        weights = [init_expert_weights(e, hidden_size, ffn_size, seed, dtype) for e in global_ids]
        self.w_gate_DF, self.w_up_DF, self.w_down_FD = (
            nn.ParameterList(nn.Parameter(w[i].to(device)) for w in weights) for i in range(3))

    def forward(self, x_PD: torch.Tensor, tokens_per_expert: Sequence[int]) -> torch.Tensor:
        chunks = torch.split(x_PD, list(tokens_per_expert))
        return torch.cat([swiglu(c_ND, self.w_gate_DF[i], self.w_up_DF[i], self.w_down_FD[i])
                          for i, c_ND in enumerate(chunks)])


class StackedIndexExperts(GroupedExperts):
    """GroupedExperts as it was before unbind: w[i] per expert, so backward runs one SelectBackward per
    expert, each zero-filling and adding into the whole stacked weight gradient."""

    def forward(self, x_PD: torch.Tensor, tokens_per_expert: Sequence[int],
                offsets_E: Optional[torch.Tensor] = None) -> torch.Tensor:
        chunks = torch.split(x_PD, list(tokens_per_expert))
        return torch.cat([swiglu(c_ND, self.w_gate_LDF[i], self.w_up_LDF[i], self.w_down_LFD[i])
                          for i, c_ND in enumerate(chunks)])


def split_rows(rows: int, num_experts: int, seed: int) -> tuple[int, ...]:
    """Rows per expert: each row picks an expert uniformly at random (seeded multinomial)."""
    g = torch.Generator().manual_seed(seed)
    pick_P = torch.randint(0, num_experts, (rows,), generator=g)
    return tuple(torch.bincount(pick_P, minlength=num_experts).tolist())


def _chunk_counts(counts: tuple[int, ...], chunks: int) -> list[tuple[int, ...]]:
    """Each expert's rows split evenly (in order) over `chunks` chunks: rows per expert per chunk."""
    return [tuple(n // chunks + (1 if c < n % chunks else 0) for n in counts) for c in range(chunks)]


def _chunk_rows(x_PD: torch.Tensor, counts: tuple[int, ...], per_chunk: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The rows of each chunk, grouped by expert (one gather per chunk)."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    done, out = [0] * len(counts), []
    for chunk in per_chunk:
        idx = [torch.arange(starts[e] + done[e], starts[e] + done[e] + n) for e, n in enumerate(chunk)]
        done = [d + n for d, n in zip(done, chunk)]
        out.append(x_PD.index_select(0, torch.cat(idx).to(x_PD.device)))
    return out


@dataclass(frozen=True)
class ChunkedRows:
    """The rows split into chunks once, outside the timed loop (as the pipeline gets them)."""

    counts: tuple[tuple[int, ...], ...]  # rows per expert, per chunk
    x: tuple[torch.Tensor, ...]
    grad: tuple[torch.Tensor, ...]
    offsets: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, x_PD: torch.Tensor, grad_PD: torch.Tensor, counts: tuple[int, ...], chunks: int) -> "ChunkedRows":
        per_chunk = _chunk_counts(counts, chunks)
        offs = tuple(expert_offsets(torch.tensor(c, device=x_PD.device)) for c in per_chunk)
        return cls(tuple(per_chunk), tuple(_chunk_rows(x_PD, counts, per_chunk)),
                   tuple(_chunk_rows(grad_PD, counts, per_chunk)), offs)


def _step(impl: nn.Module, x_PD: torch.Tensor, counts: tuple[int, ...], offsets_E: torch.Tensor,
          grad_PD: torch.Tensor, chunked: Optional[ChunkedRows] = None) -> torch.Tensor:
    if chunked is None:
        x_PD = x_PD.detach().requires_grad_()
        out_PD = impl(x_PD, counts, offsets_E) if isinstance(impl, GroupedExperts) else impl(x_PD, counts)
        out_PD.backward(grad_PD)
        return out_PD.detach()
    sink = DeferredWeightGrads(impl.experts) if isinstance(impl, DeferredChunks) else None
    outs = []
    for x, g, c, offs in zip(chunked.x, chunked.grad, chunked.counts, chunked.offsets):
        x = x.detach().requires_grad_()
        if sink is not None:
            y = deferred_experts(sink, x, c, offs, None)
        else:
            y = impl(x, c, offs) if isinstance(impl, GroupedExperts) else impl(x, c)
        y.backward(g)
        outs.append(y.detach())
    if sink is not None:
        sink.flush()
    return torch.cat([o.split(list(c))[e] for e in range(len(counts)) for o, c in zip(outs, chunked.counts)])


class DeferredChunks(nn.Module):
    """Marks GroupedExperts to be run the pipelined layer's way (deferred weight gradients)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.experts = experts


def build_impls(cfg: ExpertsBenchConfig, device: torch.device) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, path) of every implementation the run measures (grouped_mm may fail later)."""
    dtype, ids = DTYPES[cfg.dtype], range(cfg.num_experts)
    args = (ids, cfg.hidden_size, cfg.ffn_hidden_size, cfg.seed, dtype, device)
    auto = GroupedExperts(*args)
    impls = {"grouped_experts": (auto, "grouped_mm" if auto.grouped_mm_path() else "loop"),
             REFERENCE: (PerExpertParams(*args), "loop")}
    try:
        impls["grouped_mm"] = (GroupedExperts(*args, use_grouped_mm=True), "grouped_mm")
    except ValueError as exc:  # no grouped_mm in this torch, or unaligned rows
        impls["grouped_mm"] = (None, str(exc))
    impls["stacked_index"] = (StackedIndexExperts(*args), "loop")
    if cfg.chunks > 1:
        deferred = GroupedExperts(*args)
        impls["deferred_wgrad"] = (DeferredChunks(deferred), "grouped_mm" if deferred.grouped_mm_path() else "loop")
    return impls


def run_experts_bench(cfg: ExpertsBenchConfig) -> ExpertsBenchResult:
    cfg.validate()
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    counts = split_rows(cfg.rows, cfg.num_experts, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x_PD = torch.randn(cfg.rows, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
    grad_PD = torch.randn(cfg.rows, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
    offsets_E = expert_offsets(torch.tensor(counts, device=device))  # as the dispatcher will pass it
    chunked = ChunkedRows.of(x_PD, grad_PD, counts, cfg.chunks) if cfg.chunks > 1 else None
    impls, skipped, ref_out = {}, {}, None
    for name, (impl, path) in build_impls(cfg, device).items():
        if impl is None:
            skipped[name] = path
            continue
        try:  # first call doubles as the correctness check (and fails early where torch lacks a kernel)
            out_PD = _step(impl, x_PD, counts, offsets_E, grad_PD, chunked)
        except RuntimeError as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            continue
        ref_out = out_PD if name == REFERENCE else ref_out
        impls[name] = (impl, path, out_PD)
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for it in range(cfg.warmup + cfg.iters):
        for name, (impl, _, _) in impls.items():
            impl.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            _step(impl, x_PD, counts, offsets_E, grad_PD, chunked)
            sync(device)
            if it >= cfg.warmup:
                samples[name].append(time.perf_counter() - t0)
    results = tuple(ImplResult(name, path, Timing.of(samples[name]),
                               float((out.double() - ref_out.double()).abs().max()) if out.numel() else 0.0)
                    for name, (_, path, out) in impls.items())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return ExpertsBenchResult(cfg, counts, results, skipped, torch.get_num_threads(), torch.__version__, device_name)


def format_experts_table(res: ExpertsBenchResult) -> str:
    rows = [f"| experts | path | fwd+bwd ms p50 (p10-p90) | vs {REFERENCE} | max abs diff |", "|---|---|---|---|---|"]
    for r in res.results:
        t, ratio = r.timing, res.ratio(r.name)
        rows.append(f"| {r.name} | {r.path} | {t.median_ms:.2f} ({t.p10_ms:.2f}-{t.p90_ms:.2f}) "
                    f"| {ratio:.3f} | {r.max_abs_diff:.2e} |")
    rows += [f"skipped {name}: {why}" for name, why in res.skipped.items()]
    return "\n".join(rows)
