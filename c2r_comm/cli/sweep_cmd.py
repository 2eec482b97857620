"""`c2r-comm sweep --spec SPEC.yaml --out DIR`: a grid of bench cells from one YAML.

Dispatcher x placement x routing x topology x inter-node rate (see c2r_comm/bench/sweep_spec.py for
the YAML). Cells sharing topology, routing, placement and rate run all their dispatchers in one
`c2r-comm bench` launch (under `c2r-comm emulate` when the spec emulates nodes). Writes
DIR/sweep.json, DIR/sweep.md and PNG plots (see c2r_comm/bench/sweep_run.py, sweep_report.py,
sweep_plots.py). The whole spec is checked before anything runs; a failing launch is reported, its
cells are listed as missing, the others still run, and the command then exits 1. SIGINT, SIGTERM
or SIGHUP stop the running launch (its whole process group) and exit 128 + the signal number.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from c2r_comm.bench import netns
from c2r_comm.bench.rank_launcher import Interrupted
from c2r_comm.bench.sweep_plots import require_matplotlib, save_sweep_plots
from c2r_comm.bench.sweep_report import format_failures, format_missing, format_sweep_table, write_reports
from c2r_comm.bench.sweep_run import describe_jobs, run_sweep, sweep_jobs
from c2r_comm.bench.sweep_spec import SweepSpec, load_sweep_spec

REPO = Path(__file__).resolve().parents[2]  # the checkout whose commit the records name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="sweep YAML, e.g. configs/sweeps/smoke.yaml")
    p.add_argument("--out", required=True, help="output directory (plans, configs, logs, sweep.json/.md, PNGs)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and launch command lines; run nothing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (they need matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def emulation_unavailable(spec: SweepSpec) -> Optional[str]:
    """Why an emulating sweep cannot make network namespaces here (None: it can, or it does not emulate).
    `c2r-comm emulate` then runs each launch plainly over loopback, so every rate cell runs unshaped."""
    if not spec.emulate:
        return None
    try:
        netns.check_available()
    except netns.EmulationUnavailable as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    spec = load_sweep_spec(args.spec)
    jobs = sweep_jobs(spec, Path(args.out))
    if args.dry_run:
        print(describe_jobs(spec, jobs))
        return 0
    if not args.no_plots:
        require_matplotlib()
    no_emulation = emulation_unavailable(spec)
    if no_emulation:
        print(f"c2r-comm sweep: warning: no emulated nodes here ({no_emulation}): every launch runs plainly over "
              f"loopback, so all {len(spec.rates_gbit)} inter-node rate(s) run unshaped and their cells measure the "
              f"same link", file=sys.stderr)
    print(f"sweep {spec.name}: {spec.num_cells} cells in {len(jobs.launches)} launches "
          f"(+ {len(jobs.steps)} plan/profile steps), output in {args.out}", file=sys.stderr)
    try:
        result = run_sweep(spec, jobs, Path(args.out), REPO, show_progress=not args.quiet)
    except Interrupted as exc:
        print(f"c2r-comm sweep: {exc}; the running launch and all its processes were ended, no report written "
              f"(the finished launches' JSON are in {Path(args.out) / 'raw'})", file=sys.stderr)
        return 128 + exc.signum
    json_path, md_path = write_reports(spec, result, Path(args.out), REPO, emulation_unavailable=no_emulation)
    if result.records:
        print(format_sweep_table(result.records))
    written = [json_path, md_path]
    if not args.no_plots:
        written += save_sweep_plots(result.records, Path(args.out))  # matplotlib is imported only here
    print("wrote " + ", ".join(str(p) for p in written))
    if result.failures:
        print(f"{len(result.failures)} of {len(jobs.steps) + len(jobs.launches)} steps/launches failed:\n"
              + format_failures(result.failures), file=sys.stderr)
    if result.missing:
        print(f"{len(result.missing)} of {spec.num_cells} cells have no record (launch: dispatcher):\n"
              + format_missing(result.missing), file=sys.stderr)
    return 1 if result.failures or result.missing else 0
