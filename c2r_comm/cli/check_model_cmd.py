"""`c2r-comm check-model --bench-json RUN.json --trace PATH [--prompts A:B] [--hardware emulated_cpu]`:
the cost model against a measured `bench --phases` run (bytes exactly, exchange time within a tolerance).

Exit 0 when every record's bytes agree and every time is within the tolerance, 1 otherwise (2: bad
input, e.g. a --trace or --prompts other than the benchmark's, which bench records in its JSON).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from c2r_comm.bench.hardware import load_profile
from c2r_comm.bench.model_check import check_record, format_checks, load_records
from c2r_comm.config import ConfigError
from c2r_comm.routing.trace import RoutingTrace, parse_range


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench-json", required=True, action="append",
                   help="a `c2r-comm bench --trace ... --phases --json` file (repeat for several runs)")
    p.add_argument("--trace", required=True, help="the routing trace the benchmark replayed")
    p.add_argument("--prompts", default=None, help="the --prompts the benchmark used, if any")
    p.add_argument("--hardware", default="emulated_cpu", help="hardware profile name or YAML path")
    p.add_argument("--inter-node-gbit", type=float, default=None,
                   help="link rate to assume (default: each record's emulated rate; required for unshaped runs)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="allowed |model/measured - 1| (default 0.25); exit 1 when a record is outside it or its "
                        "bytes differ")
    p.add_argument("--json", default=None, help="write the comparison here")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.tolerance < 10:
        raise ConfigError("--tolerance", args.tolerance, "a fraction > 0, e.g. 0.25")
    profile = load_profile(args.hardware).with_rates(inter_node_gbit=args.inter_node_gbit)
    runs = [load_records(p) for p in args.bench_json]  # every file checked before any work
    unshaped = [r["dispatcher"] for rs in runs for r in rs if not (r.get("emulation") or {}).get("inter_node_gbit")]
    if unshaped and args.inter_node_gbit is None:
        raise ConfigError("--inter-node-gbit", None, f"a link rate: records {unshaped} ran on unshaped links "
                          "(no `c2r-comm emulate --inter-node-gbit`), so the model needs the rate to assume")
    full = RoutingTrace.load(args.trace)
    trace = full.select_prompts(*parse_range(args.prompts)) if args.prompts else full

    def prompt_range(text):  # '800:' and '800:999' are the same prompts of a 999-prompt trace
        picked = range(full.num_prompts)[slice(*parse_range(text))] if text else range(full.num_prompts)
        return picked.start, picked.stop, picked.step
    for path, records in zip(args.bench_json, runs):  # the same tokens as the benchmark, or no comparison
        source = records[0].get("trace_source")  # bench writes it since it exists; older files have none
        if source is None:
            continue
        if prompt_range(source.get("prompts")) != prompt_range(args.prompts):
            theirs = f"--prompts {source['prompts']}" if source.get("prompts") else "no --prompts (the whole trace)"
            raise ConfigError("--prompts", args.prompts, f"{theirs}, as {path} replayed")
        if source.get("tokens") != trace.num_tokens:
            raise ConfigError("--trace", args.trace, f"the trace {path} replayed ({source.get('file')}: "
                              f"{source.get('tokens')} tokens after --prompts, this one {trace.num_tokens})")
    checks = []
    for records in runs:
        for r in records:
            rec = dict(r)
            if args.inter_node_gbit is not None:  # the flag wins over the record's emulated rate
                rec["emulation"] = dict(rec.get("emulation") or {}, inter_node_gbit=args.inter_node_gbit)
            checks.append(check_record(rec, trace, profile))
    print(f"cost model ({profile.name}) vs measured exchange phases; tolerance {args.tolerance:.0%}")
    print(format_checks(checks, args.tolerance))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([c.to_json() for c in checks], indent=1))
        print(f"wrote {args.json}")
    ok = all(c.bytes_equal and abs(c.ratio - 1) <= args.tolerance for c in checks)
    return 0 if ok else 1
