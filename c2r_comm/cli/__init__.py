"""`c2r-comm <command>`: each command lives in its own module with `add_arguments` and `run`."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "bench": ("c2r_comm.cli.bench_cmd", "time forward+backward of a MoE layer per dispatcher and count bytes sent"),
    "profile": ("c2r_comm.cli.profile_cmd", "co-activation stats of a routing trace: load CV, breadth, E[GPUs/token]"),
    "plan": ("c2r_comm.cli.plan_cmd", "place experts on nodes x GPUs from a routing trace (km1 hypergraph, occult, ...)"),
    "bench-experts": ("c2r_comm.cli.experts_cmd", "time forward+backward of one rank's local experts per implementation"),
    "simulate": ("c2r_comm.cli.simulate_cmd", "predict bytes per link class and exchange time of each dispatcher on N nodes x G GPUs (alpha-beta cost model)"),
    "sweep": ("c2r_comm.cli.sweep_cmd", "run a grid of bench cells from one YAML (dispatcher x placement x routing x topology x link rate) -> JSON, markdown, plots"),
    "check-model": ("c2r_comm.cli.check_model_cmd", "the cost model against a measured bench --phases run: bytes exact, time within a tolerance"),
    "emulate": ("c2r_comm.cli.emulate_cmd", "run a command's ranks on N emulated nodes (network namespaces, shaped links)"),
    "c2r-quality": ("c2r_comm.cli.quality_cmd", "C2R quality check: pretrain top-k, profile + plan its routing, continue with top-k / C2R / device-constrained per seed; table and plots"),
    "train-demo": ("c2r_comm.cli.train_demo_cmd", "train a small byte-level MoE transformer LM expert-parallel with our layer; loss, load CV, copies/token; checkpoint"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser, or (command given) one whose only full sub-parser is that command's: the
    others keep their name and help, and their modules (torch, for most) are not imported."""
    parser = argparse.ArgumentParser(prog="c2r-comm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the command argv starts with (the top level has no options but --help, so the
    command comes first; `c2r-comm --help` or an unknown command needs no command's arguments)."""
    return build_parser(argv[0] if argv and argv[0] in COMMANDS else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser_for(argv).parse_args(argv)
    args.argv = argv  # commands that relaunch themselves (bench under torchrun) pass these on
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Config, plan and trace errors already say field, value and what is allowed.
        print(f"c2r-comm {args.command}: error: {exc}", file=sys.stderr)
        return 2
