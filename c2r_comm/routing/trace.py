"""RoutingTrace: per-token expert selections, per layer; load/save/select/synthesise.

File format (the shared DeepSeek-V2-Lite trace's): `.npz` with `expert_ids` [tokens, layers, k]
and `prompt_offsets` [prompts + 1] (prompt i = rows offs[i]:offs[i+1]); optional `num_experts`.
Layer numbers are always 0-based indices into the layer axis. A token's expert ids are distinct
(check_distinct_experts: the one rule bench, plan and profile share; see docs/routing.md).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

DISTINCT_RULE = "a token's expert ids must be distinct"


def _repeat_mask(ids: np.ndarray) -> np.ndarray:
    """bool over every axis but the last: that row holds some expert id more than once."""
    K = ids.shape[-1]
    if K > 8:  # one sort; below that, K(K-1)/2 compares are cheaper
        return (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any(-1)
    dup = np.zeros(ids.shape[:-1], dtype=bool)
    for i in range(K - 1):
        for j in range(i + 1, K):
            dup |= ids[..., i] == ids[..., j]
    return dup


def check_distinct_experts(ids: np.ndarray, layer: Optional[int] = None) -> None:
    """Every row of ids ([tokens, k] or [tokens, layers, k]) holds distinct experts, else a ValueError
    naming the first offending token (lowest index), its layer and the repeated expert."""
    ids = np.asarray(ids)
    if ids.ndim < 2 or ids.shape[-1] < 2 or ids.size == 0:
        return
    dup = _repeat_mask(ids)
    if not dup.any():
        return
    where = tuple(int(i) for i in np.argwhere(dup)[0])  # token order first
    values, counts = np.unique(ids[where], return_counts=True)
    layer = where[1] if len(where) > 1 else layer
    at = f"token {where[0]}" + ("" if layer is None else f" of layer {layer}")
    raise ValueError(f"a token selects the same expert twice: {at} selects expert {int(values[counts > 1][0])} "
                     f"more than once ({DISTINCT_RULE})")


@dataclass(frozen=True)
class RoutingTrace:
    expert_ids: np.ndarray  # [tokens, layers, k] int64
    prompt_offsets: np.ndarray  # [prompts + 1] int64, starts at 0, ends at tokens
    num_experts: int

    def __post_init__(self) -> None:
        ids = np.asarray(self.expert_ids)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if ids.ndim != 3:
            raise ValueError(f"expert_ids must be [tokens, layers, k], got shape {ids.shape}")
        offs = np.asarray(self.prompt_offsets, dtype=np.int64)
        if offs.ndim != 1 or len(offs) < 1 or offs[0] != 0 or offs[-1] != ids.shape[0] or (np.diff(offs) < 0).any():
            raise ValueError(f"prompt_offsets must rise from 0 to {ids.shape[0]} (tokens), got {offs[:3]}...{offs[-3:]}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expert_ids must hold integers, got dtype {ids.dtype} (ids are never rounded)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert ids must lie in 0..{self.num_experts - 1}, found {ids.min()}..{ids.max()}")
        check_distinct_experts(ids)
        object.__setattr__(self, "expert_ids", ids.astype(np.int64, copy=False))
        object.__setattr__(self, "prompt_offsets", offs)

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_offsets) - 1

    def layer(self, index: int) -> np.ndarray:
        """[tokens, k] expert ids of one layer (0-based index into the layer axis)."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer {index} is out of range: this trace has layers 0..{self.num_layers - 1}")
        return self.expert_ids[:, index, :]

    def select_prompts(self, start: Optional[int], stop: Optional[int]) -> "RoutingTrace":
        """Prompts [start, stop) by position, Python slice style (negatives allowed)."""
        idx = range(self.num_prompts)[slice(start, stop)]
        if len(idx) == 0:
            raise ValueError(f"prompt range {start}:{stop} selects no prompt of {self.num_prompts}")
        lo, hi = self.prompt_offsets[idx.start], self.prompt_offsets[idx.stop]
        return RoutingTrace(self.expert_ids[lo:hi], self.prompt_offsets[idx.start: idx.stop + 1] - lo, self.num_experts)

    def select_layers(self, layers: Sequence[int]) -> "RoutingTrace":
        if len(layers) == 0:
            raise ValueError(f"select_layers needs at least one layer of 0..{self.num_layers - 1}")
        for l in layers:
            self.layer(l)  # range check with a clear message
        return RoutingTrace(self.expert_ids[:, list(layers), :], self.prompt_offsets, self.num_experts)

    def batches(self, batch_tokens: int) -> Iterator[np.ndarray]:
        """Consecutive [<=batch_tokens, layers, k] blocks of tokens."""
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        for s in range(0, self.num_tokens, batch_tokens):
            yield self.expert_ids[s: s + batch_tokens]

    def rank_block(self, layer: int, rank: int, tokens_per_rank: int) -> np.ndarray:
        """Rows dealt to `rank` in order: rank r takes the r-th block of `tokens_per_rank` rows."""
        if rank < 0 or tokens_per_rank < 0:
            raise ValueError(f"rank ({rank}) and tokens_per_rank ({tokens_per_rank}) must be >= 0")
        lo, hi = rank * tokens_per_rank, (rank + 1) * tokens_per_rank
        if hi > self.num_tokens:
            raise ValueError(f"the trace has {self.num_tokens} tokens; rank {rank} needs rows {lo}:{hi}")
        return self.layer(layer)[lo:hi]

    # ---- I/O ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, num_experts: Optional[int] = None) -> "RoutingTrace":
        """Read a trace .npz; every error names the file (integer ids only, nothing is coerced)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"routing trace {path} does not exist")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive (empty or not), as np.savez writes
            raise ValueError(f"routing trace {path} is not an npz archive: allowed a .npz written by numpy.savez "
                             "(e.g. RoutingTrace.save)")
        try:
            with np.load(path) as z:
                if "expert_ids" not in z:
                    raise ValueError(f"routing trace {path} has no 'expert_ids' array (keys: {list(z.keys())})")
                ids = z["expert_ids"]
                if ids.ndim != 3:
                    raise ValueError(f"routing trace {path}: expert_ids must be [tokens, layers, k], got shape "
                                     f"{ids.shape}")
                offs = z["prompt_offsets"] if "prompt_offsets" in z else np.array([0, ids.shape[0]])
                stored = z["num_experts"] if "num_experts" in z else None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"routing trace {path} is not a readable npz archive ({exc})") from None
        for name, arr in (("expert_ids", ids), ("prompt_offsets", offs), ("num_experts", stored)):
            if arr is not None and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"routing trace {path}: '{name}' has dtype {arr.dtype}, allowed integers only "
                                 "(expert ids are never rounded)")
        if 0 in ids.shape:
            raise ValueError(f"routing trace {path} is empty: expert_ids has shape {ids.shape} [tokens, layers, k]; "
                             "allowed >= 1 token, >= 1 layer and k >= 1 experts per token")
        if num_experts is None:
            if stored is not None:
                num_experts = int(stored)
            elif ids.size and ids.max() < 0:
                raise ValueError(f"routing trace {path} has no valid expert ids: all are negative "
                                 f"({ids.min()}..{ids.max()}); allowed ids 0..num_experts-1")
            else:
                num_experts = int(ids.max()) + 1 if ids.size else 0
        try:
            return cls(ids, offs, num_experts)
        except ValueError as exc:
            raise ValueError(f"routing trace {path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        # Smallest dtype that holds every id (int16 alone would wrap above 32767 experts).
        dtype = np.uint8 if self.num_experts <= 256 else np.int16 if self.num_experts <= 32768 else np.int32
        np.savez_compressed(path, expert_ids=self.expert_ids.astype(dtype),
                            prompt_offsets=self.prompt_offsets, num_experts=np.int64(self.num_experts))

    # ---- synthetic ----------------------------------------------------------------------------
    @classmethod
    def synthetic(cls, num_tokens: int, num_experts: int, top_k: int, num_layers: int = 1,
                  num_clusters: int = 4, in_cluster: float = 0.9, zipf_a: float = 0.0,
                  tokens_per_prompt: int = 64, seed: int = 0) -> "RoutingTrace":
        """Clustered routing: a token draws its top-1 with Zipf(zipf_a) popularity, then each further
        expert from the top-1's cluster with probability `in_cluster`, else from anywhere.

        Experts are shuffled into clusters per layer, so contiguous placement does not see them.
        in_cluster=1 with clusters of >= top_k experts gives "clean" clusters a planner must recover.
        """
        if num_tokens < 0 or top_k < 1 or num_layers < 1 or tokens_per_prompt < 1 or not 0 <= in_cluster <= 1:
            raise ValueError(f"need num_tokens >= 0 ({num_tokens}), top_k >= 1 ({top_k}), num_layers >= 1 "
                             f"({num_layers}), tokens_per_prompt >= 1 ({tokens_per_prompt}) and "
                             f"0 <= in_cluster <= 1 ({in_cluster})")
        if num_clusters < 1 or num_experts % num_clusters or top_k > num_experts:
            raise ValueError(f"need num_experts ({num_experts}) divisible by num_clusters ({num_clusters}) "
                             f"and top_k ({top_k}) <= num_experts")
        rng = np.random.default_rng(seed)
        ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
        pop = 1.0 / np.arange(1, num_experts + 1) ** zipf_a
        for l in range(num_layers):
            perm = rng.permutation(num_experts)
            cluster_of = np.empty(num_experts, dtype=np.int64)
            cluster_of[perm] = np.arange(num_experts) // (num_experts // num_clusters)
            p = rng.permutation(pop) / pop.sum()
            rows = np.arange(num_tokens)
            top1 = rng.choice(num_experts, size=num_tokens, p=p)
            taken = np.zeros((num_tokens, num_experts), dtype=bool)
            taken[rows, top1] = True
            same = cluster_of[None, :] == cluster_of[top1][:, None]
            ids[:, l, 0] = top1
            for j in range(1, top_k):
                # Gumbel-max sampling of one more distinct expert, popularity-weighted.
                allowed = ~taken
                inside = (rng.random(num_tokens) < in_cluster)[:, None] & (same & allowed).any(1, keepdims=True)
                allowed &= np.where(inside, same, True)
                key = np.log(p)[None, :] + rng.gumbel(size=(num_tokens, num_experts))
                pick = np.where(allowed, key, -np.inf).argmax(1)
                taken[rows, pick] = True
                ids[:, l, j] = pick
        offs = np.arange(0, num_tokens + tokens_per_prompt, tokens_per_prompt).clip(max=num_tokens)
        offs = np.unique(np.concatenate([[0], offs, [num_tokens]]))
        return cls(ids, offs, num_experts)


def parse_range(text: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """'A:B' -> (A, B) with empty ends as None; None -> the whole range."""
    if text is None:
        return None, None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(int(p) if p.strip() else None for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"range {text!r} is invalid: allowed 'A:B' with integers, either end may be empty") from None


def parse_layers(text: str, num_layers: int, flag: str = "--layers") -> list[int]:
    """'all' | comma list of 0-based indices and A:B ranges -> layer indices (checked, no repeats)."""
    if text.strip() == "all":
        return list(range(num_layers))
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if ":" in part:
            layers.extend(range(num_layers)[slice(*parse_range(part))])
        elif part.lstrip("-").isdigit():
            layers.append(int(part))
        elif part:
            raise ValueError(f"{flag} {text!r} is invalid: allowed 'all' or comma-separated indices and A:B ranges")
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        what = f" (layer {bad[0]} is out of range)" if bad else " (selects no layer)"
        raise ValueError(f"{flag} {text!r} is invalid: allowed indices 0..{num_layers - 1}{what}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{flag} {text!r} names a layer twice: allowed each layer at most once")
    return layers
