"""What each rank of `c2r-comm train-demo` runs (train_demo_cmd.py checks the arguments and
launches): the training loop, evaluations, checkpoints, re-planning and the routing record."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from c2r_comm.bootstrap import init_distributed, report_to_launcher, shutdown
from c2r_comm.comm_failures import EXIT_COMM_ERROR, CommError
from c2r_comm.config import Config
from c2r_comm.groups import build_process_groups
from c2r_comm.topology import Topology
from c2r_comm.train import checkpoint
from c2r_comm.train.checkpoint_meta import model_shape, write_meta
from c2r_comm.train.data import ByteCorpus
from c2r_comm.train.model import MoETransformerLM
from c2r_comm.train.record import record_routing
from c2r_comm.train.replan import new_profiler, replan
from c2r_comm.train.step import StepMetrics, evaluate, train_step

RECORD_STEP = 10 ** 9  # --record-routing draws training windows from steps no run reaches
EVAL_SEED = 0  # held-out windows do not depend on --seed


def run_rank(args: argparse.Namespace, config: Config, corpus: ByteCorpus) -> int:
    try:
        ctx = init_distributed(config.run.timeout_s, config.run.device)
        config.check_world_size(ctx.world_size)
        return _train(args, config, ctx, corpus)
    except CommError as exc:
        print(f"c2r-comm train-demo: {exc}", file=sys.stderr, flush=True)
        report_to_launcher(exc)
        return EXIT_COMM_ERROR
    finally:
        shutdown()


def _train(args: argparse.Namespace, config: Config, ctx, corpus: ByteCorpus) -> int:
    groups = build_process_groups(Topology(config.parallel.nodes, config.parallel.gpus_per_node), config.run.timeout_s)
    model = MoETransformerLM(config, groups, ctx.device, args.layers, args.heads, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if args.resume:
        start, same_placement = checkpoint.load(model, optimizer, args.resume, ctx.rank, ctx.device)
        if not same_placement and args.replan_every:
            # Live re-planning owns the placement: continue on the one the run had re-planned to.
            for moe, plan in zip(model.moes, checkpoint.saved_plans(args.resume, ctx.rank)):
                moe.apply_plan(plan, optimizer)
            if ctx.rank == 0:
                print(f"c2r-comm train-demo: continuing on the placement {args.resume} was re-planned to",
                      file=sys.stderr)
        elif not same_placement and ctx.rank == 0:
            print(f"c2r-comm train-demo: {args.resume} was saved under another placement: experts and their "
                  "optimizer state moved to their new ranks", file=sys.stderr)
    log = open(args.log, "a") if (args.log and ctx.rank == 0) else None
    seed = config.run.seed
    show = ctx.rank == 0
    t0 = time.perf_counter()
    profiler = new_profiler(model) if args.replan_every else None
    bar = tqdm(range(start, start + args.steps), desc=f"train-demo {config.dispatcher}", disable=not show,
               file=sys.stderr)
    try:
        for step in bar:
            inputs, targets = (t.to(ctx.device) for t in corpus.batch("train", args.batch, args.seq_len, seed, step,
                                                                       ctx.rank))
            m = train_step(model, optimizer, inputs, targets, groups.ep, profiler)
            if args.replan_every and (step + 1) % args.replan_every == 0:
                plans = replan(model, profiler, optimizer, groups.ep)
                profiler = new_profiler(model)
                _write(log, {"kind": "replan", "step": step + 1,
                             "expert_to_rank": [list(p.expert_to_rank) for p in plans]})
            bar.set_postfix(loss=f"{m.loss:.3f}", cv=f"{m.load_cv:.2f}", copies=f"{m.copies_per_token:.2f}")
            _write(log, {"kind": "train", "step": step + 1, **m.as_dict()})
            last = step + 1 == start + args.steps
            if args.checkpoint_every and not last and (step + 1) % args.checkpoint_every == 0:
                _save(args, config, model, optimizer, step + 1, Path(args.checkpoint) / f"step{step + 1}", ctx.rank)
            if last or (args.eval_every and (step + 1) % args.eval_every == 0):
                v = _evaluate(model, corpus, args, ctx.rank, ctx.device, groups.ep)
                _write(log, {"kind": "valid", "step": step + 1, **v.as_dict()})
                if show:
                    tqdm.write(f"step {step + 1}: train loss {m.loss:.4f}, valid loss {v.loss:.4f}, load CV "
                               f"{v.load_cv:.3f}, copies/token {v.copies_per_token:.2f}, GPUs/token "
                               f"{v.gpus_per_token:.2f}", file=sys.stderr)
        elapsed = time.perf_counter() - t0
    finally:
        bar.close()
        if log:
            log.close()
    if args.checkpoint:
        _save(args, config, model, optimizer, start + args.steps, Path(args.checkpoint), ctx.rank)
    if args.record_routing:
        batches = [corpus.batch("train", args.batch, args.seq_len, seed, RECORD_STEP + i, ctx.rank)[0].to(ctx.device)
                   for i in range(args.record_batches)]
        trace = record_routing(model, batches, groups.ep)
        if show:
            trace.save(args.record_routing)
            print(f"c2r-comm train-demo: wrote {args.record_routing} ({trace.num_tokens} tokens x "
                  f"{trace.num_layers} MoE layers, top-{config.model.top_k})", file=sys.stderr)
    if show:
        print(f"c2r-comm train-demo: {args.steps} steps in {elapsed:.1f} s ({args.steps / elapsed:.2f} steps/s), "
              f"{config.dispatcher} on {config.parallel.nodes}x{config.parallel.gpus_per_node}, "
              f"{args.layers} MoE layer{'s' if args.layers > 1 else ''} of {config.model.num_experts} experts "
              f"top-{config.model.top_k}; "
              f"final valid loss {v.loss:.4f}" + (f"; checkpoint {args.checkpoint}" if args.checkpoint else ""))
    return 0


def _save(args: argparse.Namespace, config: Config, model, optimizer, step: int, folder: Path, rank: int) -> None:
    checkpoint.save(model, optimizer, step, folder, rank,
                    {"config": config.to_dict(), "args": {k: v for k, v in vars(args).items() if k != "argv"}})
    if rank == 0:  # what the launcher of a --resume checks before any rank starts
        write_meta(folder, model_shape(config, args.layers, args.seq_len), step)


def _evaluate(model, corpus: ByteCorpus, args: argparse.Namespace, rank: int, device, group) -> StepMetrics:
    # the same held-out windows at every evaluation and for every --seed: runs compare on the same text
    batches = [tuple(t.to(device) for t in corpus.batch("valid", args.batch, args.seq_len, EVAL_SEED, i, rank))
               for i in range(args.eval_batches)]
    return evaluate(model, batches, group)


def _write(log: Optional[object], record: dict) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()
