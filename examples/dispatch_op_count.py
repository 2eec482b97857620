"""Host-side work of one dispatch + combine, forward and backward: torch operators and wall time per phase.

On a GPU the phases of a dispatch issue many small kernels; after the count exchange's host sync the
GPU waits while Python issues them (docs/benchmarks.md, "GPU targets": about 3 ms of a 15.4 ms
layer step on an H200 was idle time). The number of operators each phase issues is a
device-independent measure of that cost, so it can be tracked on a CPU: this script runs one rank
(gloo, world size 1), identity experts, tiny tensors (so wall time is host overhead), and counts
every aten operator per phase with a TorchDispatchMode (views included: each costs a dispatcher
call). Wall times are medians over --iters steps and move with the machine's load; the counts do
not. On CUDA the dispatchers also build CSR row-sum structures (row_sum.py), a few more operators
per phase than counted here.

    .venv/bin/python examples/dispatch_op_count.py [--tokens 64] [--hidden 64] [--experts 64] [--top-k 6]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from c2r_comm.dispatch import DISPATCHERS, build_dispatcher
from c2r_comm.groups import build_process_groups
from c2r_comm.plan import PlacementPlan
from c2r_comm.topology import Topology

PHASES = ("layout", "count exchange", "send", "combine", "backward")


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def one_step(disp, x_TD, idx_TK, w_TK, counter: OpCounter | None) -> dict[str, tuple[float, int]]:
    """(seconds, operators) per phase of one dispatch + combine, forward and backward."""
    out: dict[str, tuple[float, int]] = {}
    t0, n0 = time.perf_counter(), 0

    def mark(phase: str) -> None:
        nonlocal t0, n0
        t1, n1 = time.perf_counter(), counter.count if counter else 0
        out[phase] = (t1 - t0, n1 - n0)
        t0, n0 = time.perf_counter(), n1

    plan = disp.layout(x_TD, idx_TK, w_TK)
    mark("layout")
    route = disp.exchange_counts(plan)
    mark("count exchange")
    batch, handle = disp.send(x_TD, w_TK, route).wait()
    mark("send")
    expert_out = batch.x_PD * 1.0  # identity experts (one operator, not counted as a phase)
    t0, n0 = time.perf_counter(), counter.count if counter else 0
    out_TD = disp.combine(expert_out, handle)
    mark("combine")
    out_TD.sum().backward()
    mark("backward")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dispatchers", default=",".join(DISPATCHERS))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=0, world_size=1)
        try:
            groups = build_process_groups(Topology(1, 1), timeout_s=60)
            g = torch.Generator().manual_seed(args.seed)
            idx_TK = torch.stack([torch.randperm(args.experts, generator=g)[:args.top_k] for _ in range(args.tokens)])
            w_TK = torch.rand(args.tokens, args.top_k, generator=g).requires_grad_()
            x_TD = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
            print(f"world size 1 (gloo, CPU), {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts "
                  f"top-{args.top_k}; wall ms: median of {args.iters} steps")
            print("| dispatcher | " + " | ".join(f"{p} ops (ms)" for p in PHASES) + " | total ops (ms) |")
            print("|---|" + "---|" * (len(PHASES) + 1))
            for name in args.dispatchers.split(","):
                disp = build_dispatcher(name, PlacementPlan.contiguous(args.experts, 1), groups, args.hidden)
                for _ in range(10):
                    one_step(disp, x_TD, idx_TK, w_TK, None)
                times = collections.defaultdict(list)
                for _ in range(args.iters):
                    for phase, (s, _) in one_step(disp, x_TD, idx_TK, w_TK, None).items():
                        times[phase].append(s * 1e3)
                counter = OpCounter()
                with counter:
                    ops = {p: n for p, (_, n) in one_step(disp, x_TD, idx_TK, w_TK, counter).items()}
                ms = {p: statistics.median(times[p]) for p in PHASES}
                cells = [f"{ops[p]} ({ms[p]:.2f})" for p in PHASES]
                print(f"| {name} | " + " | ".join(cells) + f" | {sum(ops.values())} ({sum(ms.values()):.2f}) |")
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
