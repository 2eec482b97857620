"""Bench records -> a text table (also valid markdown) and a JSON file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from c2r_comm.bench.measure import BenchRecord
from c2r_comm.bench.phases import BACKWARD_PHASES, FORWARD_PHASES


def format_table(records: Sequence[BenchRecord]) -> str:
    with_layer = any(r.layer is not None for r in records)
    head = (("| layer " if with_layer else "") + "| dispatcher | placement | copies/token off-rank | same-node | cross-node | MB sent/iter "
            "| cross-node MB | fwd ms p50 (p10-p90) | bwd ms p50 (p10-p90) | CPU s/iter user+sys (all ranks) "
            "| peak MB/rank |")
    # Emulated nodes (c2r-comm emulate): what the node links really carried, forward + backward
    # (the accounted cross-node MB above are forward only; backward sends about as much again).
    with_wire = any(r.measurement.wire_bytes_sent is not None for r in records)
    if with_wire:
        head += " wire MB/iter fwd+bwd (node links) |"
    with_sync = any(r.measurement.replica_sync is not None for r in records)
    if with_sync:  # replica plans: the gradient sync a training step adds (not timed here)
        head += " replica grad sync MB/step (cross-node) |"
    with_drops = any(r.measurement.dropped_choices is not None for r in records)
    if with_drops:  # capacity mode
        head += " dropped choices (% of routed) | tokens with every choice dropped |"
    rule = "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"
    rows = [head, rule]
    for r in records:
        f, b = r.measurement.forward, r.measurement.backward
        rows.append(
            (f"| {r.layer} " if with_layer else "") + f"| {r.dispatcher} | {r.placement} | {r.per_token(r.dispatch.rows_off_rank):.3f} "
            f"| {r.per_token(r.dispatch.rows_same_node):.3f} | {r.per_token(r.dispatch.rows_cross_node):.3f} "
            f"| {r.mb_sent:.2f} | {r.cross_node_mb:.2f} "
            f"| {f.median_ms:.2f} ({f.p10_ms:.2f}-{f.p90_ms:.2f}) | {b.median_ms:.2f} ({b.p10_ms:.2f}-{b.p90_ms:.2f}) "
            f"| {r.measurement.cpu_user_s:.2f}+{r.measurement.cpu_sys_s:.2f} | {r.measurement.peak_memory_mb:.1f} |"
            + (f" {_mb(r.measurement.wire_bytes_sent)} |" if with_wire else "")
            + (f" {_sync(r)} |" if with_sync else "")
            + (f" {_drops(r)} |" if with_drops else ""))
    return "\n".join(rows)


def _sync(r: BenchRecord) -> str:
    s = r.measurement.replica_sync
    return "-" if s is None else f"{s.bytes_off_rank / 1e6:.2f} ({s.bytes_cross_node / 1e6:.2f})"


def _drops(r: BenchRecord) -> str:
    m = r.measurement
    if m.dropped_choices is None:
        return "- | -"
    share = 100.0 * m.dropped_choices / m.routed_choices if m.routed_choices else 0.0
    return f"{m.dropped_choices} ({share:.1f} %) | {m.dropped_tokens}"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def format_summary(records: Sequence[BenchRecord]) -> str:
    """Per dispatcher over all benchmarked layers: mean copies per token, summed MB, and cross-node
    bytes relative to the baseline (alltoall) when it ran."""
    by: dict[str, list[BenchRecord]] = {}
    for r in records:
        by.setdefault(r.dispatcher, []).append(r)
    base = sum(r.cross_node_mb for r in by.get("alltoall", []))
    rows = ["| dispatcher | layers | copies/token off-rank | same-node | cross-node | MB sent (sum) "
            "| cross-node MB (sum) | cross-node vs alltoall |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        ratio = f"{sum(r.cross_node_mb for r in rs) / base:.3f}" if base > 0 else "-"
        rows.append(f"| {name} | {len(rs)} | {mean(lambda r: r.per_token(r.dispatch.rows_off_rank)):.3f} "
                    f"| {mean(lambda r: r.per_token(r.dispatch.rows_same_node)):.3f} "
                    f"| {mean(lambda r: r.per_token(r.dispatch.rows_cross_node)):.3f} "
                    f"| {sum(r.mb_sent for r in rs):.2f} | {sum(r.cross_node_mb for r in rs):.2f} | {ratio} |")
    return "\n".join(rows)


def format_phases(records: Sequence[BenchRecord]) -> str:
    """Median ms of each phase timed alone (bench --phases), forward then backward, per dispatcher."""
    with_layer = any(r.layer is not None for r in records)
    cols = [f"fwd {p}" for p in FORWARD_PHASES] + [f"bwd {p}" for p in BACKWARD_PHASES]
    head = ("| layer " if with_layer else "") + "| dispatcher | " + " | ".join(cols) + " | sum |"
    rows = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in records:
        if r.phases is None:
            continue
        vals = [r.phases.forward[p].median_ms for p in FORWARD_PHASES] + \
            [r.phases.backward[p].median_ms for p in BACKWARD_PHASES]
        rows.append(("| " + str(r.layer) + " " if with_layer else "") + f"| {r.dispatcher} | "
                    + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals):.2f} |")
    cpu_rows = [head.replace(" sum |", " sum |"), rows[1]]
    for r in records:
        if r.phases is None:
            continue
        vals = [r.phases.forward_cpu_s[p] for p in FORWARD_PHASES] + \
            [r.phases.backward_cpu_s[p] for p in BACKWARD_PHASES]
        cpu_rows.append(("| " + str(r.layer) + " " if with_layer else "") + f"| {r.dispatcher} | "
                        + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals):.3f} |")
    return ("phases (ms, median of the slowest rank; each phase alone after a barrier, device synced):\n"
            + "\n".join(rows) + "\nphases (host CPU seconds, user + sys, summed over ranks, median):\n"
            + "\n".join(cpu_rows))


def write_json(records: Sequence[BenchRecord], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([r.to_json() for r in records], indent=1))
