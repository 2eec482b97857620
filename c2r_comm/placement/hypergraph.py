"""km1 partitioning of the token hypergraph into equal blocks, flat or hierarchical (nodes, then GPUs).

Mt-KaHyPar does the partitioning (`pip install c2r-comm[plan]`), with its deterministic preset and,
by default, 1 initial-partitioning run instead of the preset's 20: a 64-vertex hypergraph is never
coarsened, so those runs are nearly all the time (0.5 s instead of 3-4 s per layer on 2 cores) and
bought < 1 % km1 on the DeepSeek trace. Without Mt-KaHyPar a swap local search on the same objective
stands in, with a warning (lower quality; it is not a multilevel partitioner).

Hierarchical: split experts into nodes minimising distinct nodes per token, then each node's
experts into its GPUs on the node's sub-hypergraph. Distinct GPUs per token is the sum over nodes
of distinct GPUs within the node, so the second step optimises exactly what is left.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from c2r_comm.placement.refine import equalize_group_sizes, improve_by_swaps
from c2r_comm.placement.swap_cost import CostLevel, SwapCost
from c2r_comm.placement.token_hypergraph import TokenHypergraph
from c2r_comm.topology import Topology

PARTITIONERS = ("auto", "mtkahypar", "local_search")

# Mt-KaHyPar 1.7's deterministic preset with the initial-partitioning run count as a parameter
# (the Python API exposes presets, not that knob, so the context is read from this file).
_DETERMINISTIC_INI = """\
mode=direct
preset-type=deterministic
deterministic=true
maxnet-removal-factor=0.01
smallest-maxnet-threshold=50000
maxnet-ignore=1000
num-vcycles=0
s-use-localized-random-shuffle=false
s-static-balancing-work-packages=128
p-enable-community-detection=true
p-louvain-edge-weight-function=hybrid
p-max-louvain-pass-iterations=5
p-louvain-min-vertex-move-fraction=0.01
p-vertex-degree-sampling-threshold=200000
p-louvain-low-memory-contraction=true
p-num-sub-rounds=16
c-type=deterministic_multilevel_coarsener
c-use-adaptive-edge-size=false
c-resolve-swaps=true
c-min-shrink-factor=1.01
c-max-shrink-factor=2.5
c-s=1
c-t=160
c-vertex-degree-sampling-threshold=200000
c-num-sub-rounds=3
c-rating-score=heavy_edge
c-rating-heavy-node-penalty=no_penalty
c-rating-acceptance-criterion=best_prefer_unmatched
i-mode=rb
i-runs={runs}
i-use-adaptive-ip-runs=false
i-perform-refinement-on-best-partitions=false
i-fm-refinement-rounds=3
i-lp-maximum-iterations=20
i-lp-initial-block-size=5
i-r-refine-until-no-improvement=false
i-r-rebalancer-type=deterministic
i-r-lp-type=deterministic
i-r-lp-maximum-iterations=5
i-r-sync-lp-sub-rounds=1
i-r-lp-he-size-activation-threshold=100
i-r-sync-lp-active-nodeset=true
i-r-fm-type=do_nothing
i-population-size=64
r-refine-until-no-improvement=false
r-rebalancer-type=deterministic
r-max-det-rebalancing-rounds=0
r-det-rebalancing-deadzone=0.1
r-det-rebalancing-heavy-vertex-exclusion=1.5
r-lp-type=do_nothing
r-lp-maximum-iterations=5
r-sync-lp-sub-rounds=1
r-lp-he-size-activation-threshold=100
r-sync-lp-active-nodeset=true
r-jet-type=deterministic
r-jet-num-iterations=8
r-jet-relative-improvement-threshold=0.001
r-jet-dynamic-rounds=3
r-jet-initial-negative-gain=0.75
r-jet-final-negative-gain=0.0
r-fm-type=do_nothing
r-flow-algo=do_nothing
"""


@dataclass(frozen=True)
class PartitionSettings:
    partitioner: str = "auto"  # auto: Mt-KaHyPar if importable, else local search with a warning
    seed: int = 0
    num_threads: int = 2
    initial_partitioning_runs: int = 1  # 20 = Mt-KaHyPar's deterministic preset unchanged

    def __post_init__(self) -> None:
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner = {self.partitioner!r} is invalid: allowed {PARTITIONERS}")
        if self.num_threads < 1 or self.initial_partitioning_runs < 1:
            raise ValueError(f"num_threads ({self.num_threads}) and initial_partitioning_runs "
                             f"({self.initial_partitioning_runs}) must be >= 1")


def _import_mtkahypar():
    try:
        import mtkahypar  # noqa: PLC0415 (optional dependency, imported when used)
    except ImportError as exc:
        return None, exc
    return mtkahypar, None


@lru_cache(maxsize=None)
def _initializer(num_threads: int):
    # Mt-KaHyPar's thread pool is process-wide; initialise once per thread count.
    mtkahypar, _ = _import_mtkahypar()
    return mtkahypar.initialize(num_threads, False)


def resolve_partitioner(requested: str) -> str:
    """'mtkahypar' or 'local_search'; warns when auto has to fall back."""
    if requested not in PARTITIONERS:
        raise ValueError(f"partitioner = {requested!r} is invalid: allowed {PARTITIONERS}")
    if requested == "local_search":
        return requested
    mtkahypar, exc = _import_mtkahypar()
    if mtkahypar is not None:
        return "mtkahypar"
    if requested == "mtkahypar":
        raise ValueError(f"partitioner 'mtkahypar' needs the mtkahypar package (pip install c2r-comm[plan]): {exc}")
    warnings.warn(f"mtkahypar is not importable ({exc}); using the pure-Python swap local search on the km1 "
                  "objective instead (lower quality). Install it with: pip install c2r-comm[plan]", stacklevel=3)
    return "local_search"


def _mtkahypar_blocks(hg: TokenHypergraph, k: int, settings: PartitionSettings) -> np.ndarray:
    import mtkahypar  # noqa: PLC0415

    init = _initializer(settings.num_threads)
    if settings.initial_partitioning_runs == 20:
        ctx = init.context_from_preset(mtkahypar.PresetType.DETERMINISTIC)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ini = Path(tmp) / "deterministic.ini"
            ini.write_text(_DETERMINISTIC_INI.format(runs=settings.initial_partitioning_runs))
            ctx = init.context_from_file(str(ini))
    ctx.set_partitioning_parameters(k, 0.0, mtkahypar.Objective.KM1)
    ctx.logging = False
    mtkahypar.set_seed(settings.seed)
    graph = init.create_hypergraph(ctx, hg.num_vertices, hg.num_edges, hg.edge_lists(),
                                   [1] * hg.num_vertices, hg.edge_weights.tolist())
    return np.asarray(graph.partition(ctx).get_partition(), dtype=np.int64)


def partition_equal(hg: TokenHypergraph, k: int, settings: PartitionSettings, backend: str) -> np.ndarray:
    """[vertices] block in 0..k-1 with exactly num_vertices / k vertices per block, min km1."""
    n = hg.num_vertices
    if k < 1 or n % k:
        raise ValueError(f"{n} experts cannot be split into {k} equal blocks")
    cost = SwapCost(hg, (CostLevel(1, k, 1.0),))
    contiguous = np.arange(n, dtype=np.int64) // (n // k)
    if k == 1 or hg.num_edges == 0:
        return contiguous
    if backend == "mtkahypar":
        blocks = _mtkahypar_blocks(hg, k, settings)
        return equalize_group_sizes(cost, blocks, n // k)
    if backend == "local_search":
        start = np.random.default_rng(settings.seed).permutation(contiguous)
        return improve_by_swaps(cost, start)[0]
    raise ValueError(f"partition backend {backend!r} is invalid: allowed 'mtkahypar' or 'local_search'")


def hypergraph_ranks(hg: TokenHypergraph, topology: Topology, settings: PartitionSettings,
                     hierarchical: bool) -> tuple[np.ndarray, str]:
    """[experts] rank of each expert, and the backend used ('mtkahypar' or 'local_search')."""
    backend = resolve_partitioner(settings.partitioner)
    N, G = topology.nodes, topology.gpus_per_node
    if not hierarchical or N == 1 or G == 1:
        return partition_equal(hg, topology.world_size, settings, backend), backend
    node_E = partition_equal(hg, N, settings, backend)
    rank_E = np.empty(hg.num_vertices, dtype=np.int64)
    for node in range(N):
        experts = np.flatnonzero(node_E == node)
        local = partition_equal(hg.restrict(experts), G, settings, backend)
        rank_E[experts] = node * G + local
    return rank_E, backend
