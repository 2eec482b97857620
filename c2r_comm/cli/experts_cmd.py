"""`c2r-comm bench-experts`: forward + backward time of one rank's local experts, per implementation.

Defaults are the target case of the grouped-experts issue: 16 experts, hidden 512, FFN 256, 4,096
rows spread uniformly at random (seeded) over the experts, fp32, one CPU thread. Prints a table and
GroupedExperts' time over a loop on separately allocated per-expert parameters (target <= 1.15 on
CPU). On a GPU, e.g. DeepSeek-V2-Lite shapes:
  c2r-comm bench-experts --device cuda --dtype bfloat16 --rows 16384 --hidden-size 2048 \\
      --ffn-hidden-size 1408 --num-experts 64
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from c2r_comm.bench.experts_bench import (DTYPES, REFERENCE, ExpertsBenchConfig, format_experts_table,
                                          run_experts_bench)

DEFAULTS = ExpertsBenchConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-experts", type=int, default=DEFAULTS.num_experts, help="local experts")
    p.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size)
    p.add_argument("--ffn-hidden-size", type=int, default=DEFAULTS.ffn_hidden_size)
    p.add_argument("--rows", type=int, default=DEFAULTS.rows,
                   help="rows (token copies) the rank's experts get, spread by a seeded uniform multinomial")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=sorted(DTYPES))
    p.add_argument("--device", default=DEFAULTS.device, choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--iters", type=int, default=DEFAULTS.iters, help="timed forward+backward iterations")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="untimed iterations first")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="weights, rows and the row split")
    p.add_argument("--chunks", type=int, default=DEFAULTS.chunks,
                   help="run the rows as C chunks, as the pipelined layer does (schedule.overlap_degree); adds "
                        "deferred_wgrad, the pipeline's experts (weight gradients once over all chunks)")
    p.add_argument("--json", default=None, help="write the config, split, timings and ratios here")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: allowed an integer >= 1")
    cfg = ExpertsBenchConfig(args.num_experts, args.hidden_size, args.ffn_hidden_size, args.rows, args.dtype,
                             args.device, args.iters, args.warmup, args.seed, args.chunks)
    cfg.validate()
    torch.set_num_threads(args.threads)
    res = run_experts_bench(cfg)
    print(f"{cfg.num_experts} experts, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, {cfg.rows} rows, "
          f"{cfg.dtype} on {cfg.device} ({res.device_name}), {res.threads} thread(s), torch {res.torch_version}; "
          f"fwd+bwd over {cfg.iters} iters after {cfg.warmup} warmup" + (f", rows in {cfg.chunks} chunks" if cfg.chunks > 1 else ""))
    print(format_experts_table(res))
    for name in ("grouped_experts", "stacked_index", "grouped_mm", "deferred_wgrad"):
        ratio = res.ratio(name)
        if ratio is not None:
            print(f"{name} / {REFERENCE} = {ratio:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_json(), indent=1))
        print(f"wrote {args.json}")
    return 0
