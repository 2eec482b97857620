"""`c2r-comm c2r-quality`: the C2R quality check with the training demo (see c2r_comm/bench/quality.py).

Pretrain with top-k, profile and plan from the model's own routing, then continue for the same
number of steps with top-k, C2R at several Top-T and the device-constrained router, once per seed;
write DIR/quality.md (table), DIR/c2r_quality_loss.png and DIR/c2r_quality_tradeoff.png, and every
command it ran to DIR/commands.txt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from c2r_comm.config import ConfigError
from c2r_comm.bench.quality import CommandFailed, format_table, plot, read_log, run_command, summarize, variants


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text", default=None, help="text file or folder (default: train-demo's, ../shared/text)")
    p.add_argument("--topology", default="2x2")
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=150, help="pretraining steps, and steps of every continuation")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches per rank per evaluation")
    p.add_argument("--seeds", default="0,1,2", help="comma list: one continuation per seed and routing")
    p.add_argument("--only", default=None, help="comma list of routing names to run (default: all)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CommandFailed as exc:  # the failing command's own error is in the message
        print(f"c2r-comm c2r-quality: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", args.seeds, "a comma list of distinct integers")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cmds = out / "commands.txt"
    model = ["--topology", args.topology, "--num-experts", str(args.num_experts), "--top-k", str(args.top_k),
             "--hidden-size", str(args.hidden_size), "--ffn-hidden-size", str(args.ffn_hidden_size),
             "--layers", str(args.layers), "--eval-every", str(args.eval_every),
             "--eval-batches", str(args.eval_batches)] + \
        (["--text", args.text] if args.text else [])
    ck, trace, collab, plan = out / "pretrain", out / "routing.npz", out / "collaboration.npz", out / "plan.json"
    pre_log = out / "runs" / "pretrain.jsonl"
    chosen = variants(args.num_experts, args.top_k, str(collab))
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = [v.name for v in chosen]
        if "topk" not in names or any(n not in known for n in names):
            raise ConfigError("--only", args.only, f"a comma list of {known} that includes topk (the baseline)")
        chosen = [v for v in chosen if v.name in names]
    if not all(p.is_file() for p in (ck / "rank0.pt", trace, collab, plan, pre_log)):
        pre_log.unlink(missing_ok=True)
        run_command(["train-demo", *model, "--routing", "topk", "--steps", str(args.steps), "--seed", "0",
                     "--checkpoint", str(ck), "--record-routing", str(trace), "--log", str(pre_log)], cmds)
        run_command(["profile", "--trace", str(trace), "--topology", args.topology, "--out", str(collab)], cmds)
        run_command(["plan", "--trace", str(trace), "--topology", args.topology, "--method", "hypergraph",
                     "--out", str(plan), "--no-png"], cmds)
    results = []
    for v in chosen:
        logs = []
        for seed in seeds:
            log = out / "runs" / f"{v.name}_seed{seed}.jsonl"
            if not log.is_file() or not any('"valid"' in line for line in log.read_text().splitlines()[-1:]):
                log.unlink(missing_ok=True)
                run_command(["train-demo", *model, *v.flags, "--steps", str(args.steps), "--seed", str(seed),
                             "--resume", str(ck), "--plan", str(plan), "--log", str(log)], cmds)
            logs.append(read_log(log))
        results.append(summarize(v.name, seeds, logs))
        print(f"c2r-comm c2r-quality: {v.name} done", flush=True)
    pretrain_loss = [r for r in read_log(pre_log) if r["kind"] == "valid"][-1]["loss"]
    table = format_table(results, pretrain_loss)
    pngs = plot(results, out)
    (out / "quality.md").write_text(table + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    print(table)
    print(f"wrote {out / 'quality.md'}, " + ", ".join(str(p) for p in pngs))
    return 0
