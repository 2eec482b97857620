"""The report of a sweep: sweep.json and sweep.md from run_sweep's result (see sweep_run.py).

    sweep.json {"name", "git_commit", "git_dirty", "machine", "emulation_unavailable", "records": [...],
               "failures": [...], "missing": [{"launch", "dispatcher"}, ...]}; every record is bench's
               (resolved config included) plus "sweep" (the cell's axes), "git_commit", "git_dirty", "machine"
    sweep.md   one markdown row per cell (format_sweep_table), then the failures and the missing cells
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from c2r_comm.bench.sweep_run import Failure, SweepResult, git_commit, machine_info
from c2r_comm.bench.sweep_spec import SweepSpec


def total_ms(rec: dict) -> float:
    return rec["measurement"]["total"]["median_ms"]


def cell_group(rec: dict) -> tuple:
    """Records comparable to each other: same topology, routing and inter-node rate."""
    s = rec["sweep"]
    return s["topology"], s["routing"], s["inter_node_gbit"]


def speedup_vs_baseline(records: Sequence[dict]) -> dict[int, Optional[float]]:
    """id(record) -> baseline total median / its total median; the baseline is alltoall with contiguous
    placement of the same topology, routing and rate (None where that did not run)."""
    base = {cell_group(r): total_ms(r) for r in records
            if r["sweep"]["dispatcher"] == "alltoall" and r["sweep"]["placement"] == "contiguous"}
    return {id(r): (base[cell_group(r)] / total_ms(r) if cell_group(r) in base and total_ms(r) > 0 else None)
            for r in records}


def rate_text(rec: dict) -> str:
    s = rec["sweep"]
    if not s["emulate"]:
        return "-"
    text = "unshaped" if s["inter_node_gbit"] is None else f"{s['inter_node_gbit']:g}"
    return text + ("*" if rec.get("emulation") is None else "")


def _timing(t: dict) -> str:
    return f"{t['median_ms']:.2f} ({t['p10_ms']:.2f}-{t['p90_ms']:.2f})"


def format_sweep_table(records: Sequence[dict]) -> str:
    head = ("| topology | inter-node Gbit/s | routing | placement | dispatcher | fwd ms p50 (p10-p90) "
            "| bwd ms p50 (p10-p90) | total ms p50 (p10-p90) | copies/token same-node | copies/token cross-node "
            "| MB same-node | MB cross-node | peak MB/rank | speed-up vs alltoall+contiguous |")
    rows = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    speedup = speedup_vs_baseline(records)
    for r in records:
        s, m = r["sweep"], r["measurement"]
        mb = lambda link: (m["dispatch"][f"bytes_{link}"] + m["combine"][f"bytes_{link}"]) / 1e6  # noqa: E731
        up = speedup[id(r)]
        rows.append(f"| {s['topology']} | {rate_text(r)} | {s['routing']} | {s['placement']} | {s['dispatcher']} "
                    f"| {_timing(m['forward'])} | {_timing(m['backward'])} | {_timing(m['total'])} "
                    f"| {r['copies_per_token_same_node']:.3f} | {r['copies_per_token_cross_node']:.3f} "
                    f"| {mb('same_node'):.2f} | {mb('cross_node'):.2f} | {m['peak_memory_mb']:.1f} "
                    f"| {'-' if up is None else f'{up:.2f}x'} |")
    return "\n".join(rows)


def format_failures(failures: Sequence[Failure]) -> str:
    lines = []
    for f in failures:
        lines.append(f"- {f.what}: {f.reason}" + (f" (log {f.log})" if f.log else ""))
        lines += [f"    {line}" for line in f.stderr_tail]
    return "\n".join(lines)


def format_missing(missing: Sequence[tuple[str, str]]) -> str:
    """One line per cell without a record: launch (topology, routing, placement, rate), dispatcher."""
    return "\n".join(f"- {launch}: {dispatcher}" for launch, dispatcher in missing)


def write_reports(spec: SweepSpec, result: SweepResult, out_dir: Path, repo: Path,
                  emulation_unavailable: Optional[str] = None) -> tuple[Path, Path]:
    """sweep.json and sweep.md; emulation_unavailable: why emulated nodes could not be made (every rate
    cell then ran unshaped over loopback), recorded in both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = (result.records[0]["git_commit"], result.records[0]["git_dirty"]) if result.records \
        else git_commit(repo)
    doc = {"name": spec.name, "git_commit": commit, "git_dirty": dirty, "machine": machine_info(),
           "emulation_unavailable": emulation_unavailable, "records": list(result.records),
           "failures": [asdict(f) for f in result.failures],
           "missing": [{"launch": launch, "dispatcher": d} for launch, d in result.missing]}
    json_path, md_path = out_dir / "sweep.json", out_dir / "sweep.md"
    json_path.write_text(json.dumps(doc, indent=1))
    b = spec.base
    md = [f"# sweep {spec.name}", "",
          f"hidden {b.model.hidden_size}, ffn {b.model.ffn_hidden_size}, {b.model.num_experts} experts top-"
          f"{b.model.top_k}, {b.run.tokens_per_rank} tokens/rank, {b.run.dtype}; {b.run.iters} timed iterations "
          f"after {b.run.warmup_iters} warm-up; commit {commit}{' (uncommitted changes)' if dirty else ''}.", "",
          "Times: the slowest rank per iteration, median (p10-p90). Copies and MB: one forward (dispatch + "
          "combine, all ranks; backward sends as much again). Peak MB/rank: max over ranks (CPU: peak RSS of "
          "the rank's process, runtime included; CUDA: max allocated).", ""]
    if spec.emulate and emulation_unavailable:
        md += [f"**Emulation unavailable** ({emulation_unavailable}): every cell ran plainly over loopback, "
               "unshaped, whatever its inter-node rate.", ""]
    if spec.emulate and any(r.get("emulation") is None for r in result.records):
        md += ["\\* emulation was unavailable for this cell: it ran plainly over loopback, unshaped.", ""]
    md.append(format_sweep_table(result.records) if result.records else "(no cell completed)")
    if result.failures:
        md += ["", "## failures", "", format_failures(result.failures)]
    if result.missing:
        md += ["", f"## missing cells ({len(result.missing)} of {spec.num_cells})", "",
               format_missing(result.missing)]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
