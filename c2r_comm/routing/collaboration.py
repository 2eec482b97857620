"""Collaboration profiler: per-layer expert co-activation counts, loads, and what they imply.

C[l, i, j] = number of tokens whose selected set at layer l holds both i and j (i != j).
Counts stay on the device of the routed indices (one sync-free count per update); ranks merge with a
single all_reduce of one packed int64 tensor. Results are a frozen `CollaborationStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from c2r_comm.comm_failures import group_site, guard
from c2r_comm.config import check_top_t
from c2r_comm.counting import bucket_counts
from c2r_comm.plan import PlacementPlan, distinct_per_token, expert_to_node
from c2r_comm.routing.trace import check_distinct_experts
from c2r_comm.topology import Topology


def check_expert_ids(ids_TK: torch.Tensor, num_experts: int, layer: Optional[int] = None) -> None:
    """Range and distinctness of each token's selected experts, with a message naming the value
    (distinctness: the rule and message of routing.trace.check_distinct_experts)."""
    if ids_TK.ndim != 2:
        raise ValueError(f"topk_idx must be [tokens, k], got shape {tuple(ids_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"topk_idx must hold integer expert ids, got dtype {ids_TK.dtype}")
    if ids_TK.numel() == 0:
        return
    lo, hi = int(ids_TK.min()), int(ids_TK.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, found {lo}..{hi}")
    if ids_TK.shape[1] > 1 and (ids_TK.sort(1).values.diff(dim=1) == 0).any():
        check_distinct_experts(ids_TK.cpu().numpy(), layer)  # names the first offending token


def expected_distinct_groups(ids_TK: np.ndarray, group_of_expert: np.ndarray) -> float:
    """E[distinct groups per token] (groups = GPUs or nodes); nan with no tokens."""
    d = distinct_per_token(group_of_expert, ids_TK)
    return float(d.mean()) if d.size else float("nan")


def pair_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Flattened [E*E] co-activation counts of one batch (zero diagonal), on the ids' device.

    Ordered pairs (a, b) of slots with a != b: each unordered expert pair counts once per direction,
    so the matrix is symmetric. A token's experts must be distinct (update()'s check). No host sync.
    """
    E = num_experts
    pair_TKK = ids_TK[:, :, None] * E + ids_TK[:, None, :]
    counts = bucket_counts(pair_TKK, E * E)
    # every slot's pair with itself lands on the diagonal; distinct experts per token never do
    return counts.view(E, E).fill_diagonal_(0).view(-1)


def coactivation_counts(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] int64: tokens selecting both i and j (i != j), for a whole [tokens, k] array."""
    ids = torch.as_tensor(np.asarray(ids_TK, dtype=np.int64))
    check_expert_ids(ids, num_experts)
    return pair_counts(ids, num_experts).reshape(num_experts, num_experts).numpy()


@dataclass(frozen=True)
class CollaborationStats:
    """Accumulated counts; all arrays int64, layers are 0-based trace layer indices."""

    counts_LEE: np.ndarray  # co-activations, symmetric, zero diagonal
    loads_LE: np.ndarray  # (token, slot) assignments per expert
    tokens_L: np.ndarray  # tokens seen per layer
    top_k: int
    # Optional: sums of distinct GPUs / nodes per token under the plan given to the profiler.
    gpu_sum_L: Optional[np.ndarray] = None
    node_sum_L: Optional[np.ndarray] = None
    expert_to_rank: Optional[np.ndarray] = None
    gpus_per_node: Optional[int] = None
    # Trace layer index of each row (profiling a subset of layers keeps their original numbers).
    layer_ids: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        c = np.asarray(self.counts_LEE, dtype=np.int64)
        if c.ndim != 3 or c.shape[1] != c.shape[2]:
            raise ValueError(f"counts_LEE must be [layers, E, E], got shape {c.shape}")
        L, E = c.shape[0], c.shape[1]
        for name, shape in (("loads_LE", (L, E)), ("tokens_L", (L,))):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {np.shape(getattr(self, name))}")
        object.__setattr__(self, "counts_LEE", c)
        object.__setattr__(self, "loads_LE", np.asarray(self.loads_LE, dtype=np.int64))
        object.__setattr__(self, "tokens_L", np.asarray(self.tokens_L, dtype=np.int64))
        ids = np.arange(L) if self.layer_ids is None else np.asarray(self.layer_ids, dtype=np.int64)
        if ids.shape != (L,) or len(set(ids.tolist())) != L:
            raise ValueError(f"layer_ids must be {L} distinct layer indices, got {ids.tolist()}")
        object.__setattr__(self, "layer_ids", ids)

    @property
    def num_layers(self) -> int:
        return self.counts_LEE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts_LEE.shape[1]

    def row_of_layer(self, layer: int) -> int:
        """Row holding trace layer `layer`."""
        hits = np.flatnonzero(self.layer_ids == layer)
        if hits.size == 0:
            raise ValueError(f"layer {layer} was not profiled: these stats hold layers {self.layer_ids.tolist()}")
        return int(hits[0])

    # ---- derived metrics ----------------------------------------------------------------------
    def collaborators(self, top_t: int) -> np.ndarray:
        """Top-T partners per expert [L, E, T], strongest first; self excluded; ties -> lower id."""
        E = self.num_experts
        top_t = check_top_t(top_t, E)  # no top_k here: lists may serve any model, so 1..E-1
        key = self.counts_LEE.astype(np.float64)
        key[:, np.arange(E), np.arange(E)] = -1.0  # self ranks below every real partner, even count 0
        order = np.argsort(-key, axis=-1, kind="stable")  # stable: equal counts keep ascending id
        return order[:, :, :top_t].astype(np.int64)

    def breadth(self, coverage: float = 0.8) -> np.ndarray:
        """Partners needed to cover `coverage` of each expert's co-activations [L, E]; 0 if none."""
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage = {coverage} is invalid: allowed 0 < coverage <= 1")
        sorted_LEE = -np.sort(-self.counts_LEE, axis=-1)
        cum = np.cumsum(sorted_LEE, axis=-1)
        total = cum[..., -1:]
        # Small tolerance so exact coverage (e.g. 4 of 5 equal partners at 0.8) is not missed by rounding.
        reached = cum >= coverage * total - 1e-9 * np.maximum(total, 1)
        return np.where(total[..., 0] > 0, reached.argmax(-1) + 1, 0)

    def partner_entropy(self) -> np.ndarray:
        """Entropy (bits) of each expert's partner distribution [L, E]; 0 if it never co-activates."""
        c = self.counts_LEE.astype(np.float64)
        total = c.sum(-1, keepdims=True)
        p = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
        return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)

    def load_cv(self) -> np.ndarray:
        """Coefficient of variation (population std / mean) of per-expert load [L]; nan if empty."""
        loads = self.loads_LE.astype(np.float64)
        mean = loads.mean(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, loads.std(-1) / np.where(mean > 0, mean, 1.0), np.nan)

    def expected_gpus_per_token(self) -> np.ndarray:
        return self._per_token(self.gpu_sum_L, "GPUs")

    def expected_nodes_per_token(self) -> np.ndarray:
        return self._per_token(self.node_sum_L, "nodes")

    def _per_token(self, sum_L: Optional[np.ndarray], what: str) -> np.ndarray:
        if sum_L is None:
            raise ValueError(f"E[distinct {what} per token] needs a placement plan: build the profiler with "
                             f"plan= and topology=")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tokens_L > 0, sum_L / np.maximum(self.tokens_L, 1), np.nan)

    # ---- I/O ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        extra: dict[str, Any] = {}
        if self.gpu_sum_L is not None:
            extra = dict(gpu_sum_L=self.gpu_sum_L, node_sum_L=self.node_sum_L,
                         expert_to_rank=self.expert_to_rank, gpus_per_node=np.int64(self.gpus_per_node))
        np.savez_compressed(path, counts_LEE=self.counts_LEE, loads_LE=self.loads_LE, tokens_L=self.tokens_L,
                            top_k=np.int64(self.top_k), layer_ids=self.layer_ids, **extra)

    @classmethod
    def load(cls, path: str | Path) -> "CollaborationStats":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"collaboration stats file {path} does not exist")
        with np.load(path) as z:
            missing = [k for k in ("counts_LEE", "loads_LE", "tokens_L", "top_k") if k not in z]
            if missing:
                raise ValueError(f"{path} is not a profiler .npz: missing keys {missing} (has {list(z.keys())})")
            opt = {k: z[k] for k in ("gpu_sum_L", "node_sum_L", "expert_to_rank", "layer_ids") if k in z}
            gpn = int(z["gpus_per_node"]) if "gpus_per_node" in z else None
            return cls(z["counts_LEE"], z["loads_LE"], z["tokens_L"], int(z["top_k"]), gpus_per_node=gpn, **opt)


class CollaborationProfiler:
    """Accumulate co-activation counts per layer from a stream of topk_idx [tokens, k].

    Counts live on `device` (default: that of the first update). With `plan` and `topology`, it
    also sums distinct GPUs and nodes per token (via plan.distinct_per_token, on the host).
    """

    def __init__(self, num_layers: int, num_experts: int, device: Optional[torch.device | str] = None,
                 plan: Optional[PlacementPlan] = None, topology: Optional[Topology] = None):
        if num_layers < 1 or num_experts < 2:
            raise ValueError(f"need num_layers >= 1 and num_experts >= 2, got {num_layers} and {num_experts}")
        if (plan is None) != (topology is None):
            raise ValueError("pass plan and topology together (or neither)")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.plan, self.topology = plan, topology
        self._gpu_of = self._node_of = None
        if plan is not None:
            plan.check_matches(num_experts, topology.world_size, what="profiler")
            self._gpu_of = np.asarray(plan.expert_to_rank)
            self._node_of = expert_to_node(plan, topology)
        self.top_k: Optional[int] = None
        self._device = torch.device(device) if device is not None else None
        self._counts_LP: Optional[torch.Tensor] = None  # [L, E*E]

    def _state(self, device: torch.device) -> None:
        L, E = self.num_layers, self.num_experts
        self._device = device
        self._counts_LP = torch.zeros(L, E * E, dtype=torch.long, device=device)
        self._loads_LE = torch.zeros(L, E, dtype=torch.long, device=device)
        self._tokens_L = torch.zeros(L, dtype=torch.long, device=device)
        self._gpu_sum_L = torch.zeros(L, dtype=torch.long, device=device)
        self._node_sum_L = torch.zeros(L, dtype=torch.long, device=device)

    def update(self, layer: int, topk_idx_TK: torch.Tensor, check: bool = True) -> None:
        """Add one batch of one layer's selections. check=False skips the id checks (three host
        syncs) for routing a router just produced (training loops)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range: the profiler has layers 0..{self.num_layers - 1}")
        ids_TK = torch.as_tensor(topk_idx_TK)
        if check:
            check_expert_ids(ids_TK, self.num_experts, layer)
        K = ids_TK.shape[1]
        if self.top_k is None:
            self.top_k = K
        elif K != self.top_k:
            raise ValueError(f"topk_idx has k = {K} but earlier updates had k = {self.top_k}")
        if self._counts_LP is None:
            self._state(self._device if self._device is not None else ids_TK.device)
        ids_TK = ids_TK.to(self._device, torch.long)
        E = self.num_experts
        self._counts_LP[layer] += pair_counts(ids_TK, E)
        self._loads_LE[layer] += bucket_counts(ids_TK, E)
        self._tokens_L[layer] += ids_TK.shape[0]
        if self._gpu_of is not None and ids_TK.shape[0]:
            ids_np = ids_TK.cpu().numpy()
            self._gpu_sum_L[layer] += int(distinct_per_token(self._gpu_of, ids_np).sum())
            self._node_sum_L[layer] += int(distinct_per_token(self._node_of, ids_np).sum())

    def update_layers(self, ids_TLK: torch.Tensor | np.ndarray) -> None:
        """Add a [tokens, layers, k] block (e.g. a RoutingTrace batch) covering every layer."""
        ids_TLK = torch.as_tensor(ids_TLK)
        if ids_TLK.ndim != 3 or ids_TLK.shape[1] != self.num_layers:
            raise ValueError(f"expected [tokens, {self.num_layers} layers, k], got shape {tuple(ids_TLK.shape)}")
        for l in range(self.num_layers):
            self.update(l, ids_TLK[:, l, :])

    def all_reduce(self, group: Any = None) -> None:
        """Sum counts over the ranks of `group` with one all_reduce. Collective: every rank calls it."""
        if self._counts_LP is None:
            # A rank that saw no tokens still joins (raising here would leave the others waiting).
            default = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
                else torch.device("cpu")
            self._state(self._device or default)
        parts = [self._counts_LP, self._loads_LE, self._tokens_L[:, None], self._gpu_sum_L[:, None],
                 self._node_sum_L[:, None]]
        packed = torch.cat([p.reshape(self.num_layers, -1) for p in parts], dim=1)
        with guard(group_site("collaboration profile reduction", group)):
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        E2, E = self.num_experts ** 2, self.num_experts
        self._counts_LP = packed[:, :E2].contiguous()
        self._loads_LE = packed[:, E2:E2 + E].contiguous()
        self._tokens_L, self._gpu_sum_L, self._node_sum_L = (packed[:, E2 + E + i].contiguous() for i in range(3))

    def stats(self) -> CollaborationStats:
        L, E = self.num_layers, self.num_experts
        if self._counts_LP is None:
            self._state(self._device if self._device is not None else torch.device("cpu"))
        extra: dict[str, Any] = {}
        if self._gpu_of is not None:
            extra = dict(gpu_sum_L=self._gpu_sum_L.cpu().numpy(), node_sum_L=self._node_sum_L.cpu().numpy(),
                         expert_to_rank=self._gpu_of.copy(), gpus_per_node=self.topology.gpus_per_node)
        return CollaborationStats(self._counts_LP.reshape(L, E, E).cpu().numpy(), self._loads_LE.cpu().numpy(),
                                  self._tokens_L.cpu().numpy(), int(self.top_k or 0), **extra)
