"""`c2r-comm sweep --spec SPEC.yaml --out DIR`: a grid of bench cells from one YAML.

Dispatcher x placement x routing x topology x inter-node rate (see c2r_comm/bench/sweep_spec.py for
the YAML). Cells sharing topology, routing, placement and rate run all their dispatchers in one
`c2r-comm bench` launch (under `c2r-comm emulate` when the spec emulates nodes). Writes
DIR/sweep.json, DIR/sweep.md and PNG plots (see c2r_comm/bench/sweep_run.py, sweep_plots.py).
The whole spec is checked before anything runs; a failing launch is reported and the others still
run, and the command then exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from c2r_comm.bench.sweep_run import describe_jobs, format_failures, format_sweep_table, run_sweep, sweep_jobs, \
    write_reports
from c2r_comm.bench.sweep_spec import load_sweep_spec
from c2r_comm.placement.plot import matplotlib_available

REPO = Path(__file__).resolve().parents[2]  # the checkout whose commit the records name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="sweep YAML, e.g. configs/sweeps/smoke.yaml")
    p.add_argument("--out", required=True, help="output directory (plans, configs, logs, sweep.json/.md, PNGs)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and launch command lines; run nothing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (they need matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    spec = load_sweep_spec(args.spec)
    jobs = sweep_jobs(spec, Path(args.out))
    if args.dry_run:
        print(describe_jobs(spec, jobs))
        return 0
    if not args.no_plots and not matplotlib_available():
        raise ValueError("sweep plots need matplotlib, which is not installed: pip install 'c2r-comm[plot]' "
                         "(or pass --no-plots)")
    print(f"sweep {spec.name}: {spec.num_cells} cells in {len(jobs.launches)} launches "
          f"(+ {len(jobs.steps)} plan/profile steps), output in {args.out}", file=sys.stderr)
    result = run_sweep(spec, jobs, Path(args.out), REPO, show_progress=not args.quiet)
    json_path, md_path = write_reports(spec, result, Path(args.out), REPO)
    if result.records:
        print(format_sweep_table(result.records))
    written = [json_path, md_path]
    if not args.no_plots:
        from c2r_comm.bench.sweep_plots import save_sweep_plots  # noqa: PLC0415 (matplotlib only when plotting)
        written += save_sweep_plots(result.records, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in written))
    if result.failures:
        print(f"{len(result.failures)} of {len(jobs.steps) + len(jobs.launches)} steps/launches failed:\n"
              + format_failures(result.failures), file=sys.stderr)
        return 1
    return 0
