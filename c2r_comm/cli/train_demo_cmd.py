"""`c2r-comm train-demo`: train a small byte-level MoE transformer LM expert-parallel with our layer.

Text from `--text` (a file or a folder of *.txt; default ../shared/text), the last 10 % of each
file held out for validation. Logs loss, load balance (CV of expert loads) and copies per token per
step (progress bar; `--log` writes one JSON line per step and per evaluation), evaluates on the
held-out text, and writes a checkpoint (`--checkpoint DIR`: one file per rank; with `--checkpoint-every N`
also every N steps, in DIR/step<S>) that `--resume` continues from. Run plainly it starts its ranks itself, like `bench`; under torchrun or mpiexec it
joins their world. The dispatcher never changes the results: `--dispatcher alltoall` and `dedup`
give the same losses step by step.

This module checks the arguments and launches (no torch imported); train_demo_rank.py is what each
rank runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from c2r_comm.bench.rank_launcher import run_local_ranks
from c2r_comm.cli.bench_cmd import check_plan, check_writable
from c2r_comm.config import Config, ConfigError, load_config, parse_topology, with_overrides
from c2r_comm.launch_env import launched
from c2r_comm.train.checkpoint_meta import check_resume, model_shape
from c2r_comm.train.data import ByteCorpus

DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config: model, parallel, dispatcher, routing, placement, run.seed/device")
    p.add_argument("--topology", help="NODESxGPUS_PER_NODE, e.g. 2x2")
    p.add_argument("--dispatcher", help="alltoall | dedup | hierarchical (overrides the config)")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="a text file or a folder of *.txt (default ../shared/text)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (each with one MoE layer)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per rank per evaluation")
    p.add_argument("--hidden-size", type=int, default=None, help="overrides model.hidden_size")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="overrides model.ffn_hidden_size")
    p.add_argument("--num-experts", type=int, default=None, help="overrides model.num_experts")
    p.add_argument("--top-k", type=int, default=None, help="overrides model.top_k")
    p.add_argument("--seed", type=int, default=None, help="overrides run.seed (weights and data order)")
    p.add_argument("--dtype", default=None, help="overrides run.dtype (float32; float64 to compare dispatchers "
                                                 "exactly: fp32 sums in another order drift apart over steps)")
    p.add_argument("--plan", default=None, help="placement plan JSON (plan layer i for MoE layer i)")
    p.add_argument("--routing", default=None, help="topk | c2r | device_constrained (overrides routing.kind)")
    p.add_argument("--top-t", type=int, default=None, help="C2R Top-T collaborators (routing.top_t)")
    p.add_argument("--collaborators", default=None,
                   help="C2R: profiler .npz (c2r-comm profile --out) of the model's routing (routing.collaborators)")
    p.add_argument("--max-groups", type=int, default=None,
                   help="device_constrained: at most this many GPUs per token (routing.max_groups)")
    p.add_argument("--record-routing", default=None, metavar="NPZ",
                   help="after training, route --record-batches training batches per rank and save them as a "
                        "routing trace (layers = MoE layers) for c2r-comm profile / plan")
    p.add_argument("--record-batches", type=int, default=16)
    p.add_argument("--log", default=None, help="write one JSON line per step and per evaluation here")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="write DIR/rank<r>.pt at the end")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also at every step count S before the end that N divides (counted on across --resume), "
                        "DIR/step<S>/rank<r>.pt; needs --checkpoint (0: only at the end)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from a --checkpoint DIR (steps count on)")
    p.add_argument("--replan-every", type=int, default=0, metavar="N",
                   help="every N steps, re-plan each MoE layer's placement from the co-activations of the steps "
                        "since the last one and move its experts there (live re-planning; 0: off). With --resume "
                        "the run continues on the placement the checkpoint was re-planned to")


def resolve(args: argparse.Namespace) -> Config:
    overrides = {"dispatcher": args.dispatcher, "model.hidden_size": args.hidden_size,
                 "model.ffn_hidden_size": args.ffn_hidden_size, "model.num_experts": args.num_experts,
                 "model.top_k": args.top_k, "run.seed": args.seed, "run.dtype": args.dtype, "placement.plan": args.plan,
                 "routing.kind": args.routing, "routing.top_t": args.top_t,
                 "routing.collaborators": args.collaborators, "routing.max_groups": args.max_groups}
    if args.topology:
        overrides["parallel.nodes"], overrides["parallel.gpus_per_node"] = parse_topology(args.topology)
    config = load_config(args.config, overrides) if args.config else with_overrides(Config(), overrides)
    for flag in ("steps", "layers", "heads", "seq_len", "batch", "eval_batches", "record_batches"):
        if getattr(args, flag) < 1:
            raise ConfigError("--" + flag.replace("_", "-"), getattr(args, flag), "an integer >= 1")
    if config.model.hidden_size % args.heads:
        raise ConfigError("--heads", args.heads, f"a divisor of model.hidden_size ({config.model.hidden_size})")
    if args.eval_every < 0:
        raise ConfigError("--eval-every", args.eval_every, "an integer >= 0")
    if args.replan_every < 0:
        raise ConfigError("--replan-every", args.replan_every, "an integer >= 0")
    if args.replan_every and config.routing.kind == "device_constrained":
        raise ConfigError("--replan-every", args.replan_every, "0 with routing.kind device_constrained (its routing "
                          "follows the placement, so re-planning would change the model)")
    if not args.lr > 0:
        raise ConfigError("--lr", args.lr, "a number > 0")
    plans_by_layer = check_plan(config, range(args.layers), "--plan" if args.plan else "placement.plan")
    if args.replan_every and any(plan.replicas for plan in plans_by_layer.values()):
        raise ConfigError("--replan-every", args.replan_every, "0 with a replica plan (re-planning from co-activations "
                          "makes plans without replicas)")
    if args.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every", args.checkpoint_every, "an integer >= 0")
    if args.checkpoint_every and not args.checkpoint:
        raise ConfigError("--checkpoint-every", args.checkpoint_every, "0 without --checkpoint DIR (where they go)")
    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError("--resume", args.resume, "a folder written by --checkpoint")
    if args.resume:  # a model the saved tensors do not fit: refused here, not by every rank's traceback
        check_resume(args.resume, model_shape(config, args.layers, args.seq_len))
    if not launched(os.environ):
        for flag in ("log", "record_routing"):
            if getattr(args, flag):
                check_writable(getattr(args, flag), "--" + flag.replace("_", "-"))
    return config


def run(args: argparse.Namespace) -> int:
    config = resolve(args)
    corpus = ByteCorpus.load(args.text, args.seq_len)  # unreadable or too short text: refused before any rank starts
    world = config.parallel.world_size
    if world > 1 and not launched(os.environ):
        return run_local_ranks([sys.executable, "-m", "c2r_comm", *args.argv], world)
    return _run_this_rank(args, config, corpus)


def _run_this_rank(args: argparse.Namespace, config: Config, corpus: ByteCorpus) -> int:
    """This process is a rank (launched, or a world of one): only now torch and the model are imported."""
    from c2r_comm.cli.train_demo_rank import run_rank
    return run_rank(args, config, corpus)
