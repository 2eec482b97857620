"""Run a SweepSpec: plan/profile steps, then one subprocess per bench launch; collect and report.

Output directory layout (everything a sweep writes):
    plans/     plan JSONs (`c2r-comm plan`), cached: a rerun with the same inputs reuses them
    profiles/  collaborator stats (`c2r-comm profile`) for c2r routings without a lists file, cached
    configs/   the bench config YAML of each launch
    raw/       each launch's bench JSON;  logs/  each step's and launch's stdout and stderr
    sweep.json {"name", "git_commit", "git_dirty", "machine", "records": [...], "failures": [...]};
               every record is bench's (resolved config included) plus "sweep" (the cell's axes),
               "git_commit", "git_dirty" and "machine"
    sweep.md   one markdown row per cell (format_sweep_table), then the failures

A launch that fails (exit code, timeout, no JSON) is reported with its last stderr lines and the
sweep goes on; the caller exits non-zero when any failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from tqdm import tqdm

from c2r_comm.bench.sweep_spec import Launch, SweepSpec

C2R = (sys.executable, "-m", "c2r_comm")
TAIL_LINES = 10
ERROR_LINE = re.compile(r"^c2r-comm [\w-]+: error:|^\w+(Error|Exception)\b")


@dataclass(frozen=True)
class Step:
    """A prerequisite of some launches: one plan file or one collaborator profile, cached by output."""

    kind: str  # "plan" | "profile"
    argv: tuple[str, ...]
    output: Path

    @property
    def name(self) -> str:
        return self.output.stem


@dataclass(frozen=True)
class LaunchJob:
    launch: Launch
    argv: tuple[str, ...]
    config_path: Path
    config_yaml: str
    json_path: Path
    needs: tuple[Step, ...]


@dataclass(frozen=True)
class SweepJobs:
    steps: tuple[Step, ...]
    launches: tuple[LaunchJob, ...]


@dataclass(frozen=True)
class Failure:
    what: str  # "launch NAME" or "plan NAME" / "profile NAME"
    exit_code: Optional[int]  # None: timed out or never started
    reason: str
    stderr_tail: tuple[str, ...]
    log: str


@dataclass(frozen=True)
class SweepResult:
    records: tuple[dict, ...]
    failures: tuple[Failure, ...]


# ---- command lines (pure) ---------------------------------------------------------------------

def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def plan_step(spec: SweepSpec, method: str, topology, out_dir: Path) -> Step:
    t = spec.trace
    out = out_dir / "plans" / f"{method}_{topology}_layer{t.layer}_{_digest(t.path, t.fit_prompts, t.eval_prompts)}.json"
    argv = [*C2R, "plan", "--trace", t.path, "--topology", str(topology), "--method", method, "--layers", str(t.layer),
            "--out", str(out), "--no-png"]
    argv += ["--fit-prompts", t.fit_prompts] if t.fit_prompts else []
    argv += ["--eval-prompts", t.eval_prompts] if t.eval_prompts else []
    return Step("plan", tuple(argv), out)


def profile_step(spec: SweepSpec, out_dir: Path) -> Step:
    t = spec.trace
    out = out_dir / "profiles" / f"collaborators_layer{t.layer}_{_digest(t.path, t.fit_prompts)}.npz"
    argv = [*C2R, "profile", "--trace", t.path, "--layers", str(t.layer), "--topology", "1x1", "--out", str(out)]
    argv += ["--prompts", t.fit_prompts] if t.fit_prompts else []
    return Step("profile", tuple(argv), out)


def launch_argv(spec: SweepSpec, launch: Launch, config_path: Path, json_path: Path) -> list[str]:
    """`c2r-comm bench ...` for the launch; under `c2r-comm emulate` when the sweep emulates nodes."""
    bench = ["bench", "--config", str(config_path), "--topology", str(launch.topology),
             "--dispatcher", ",".join(launch.dispatchers), "--json", str(json_path)]
    bench += ["--layer", str(spec.base.placement.layer)]  # bench sets placement.layer from it (default 0)
    if launch.routing.kind == "trace":
        bench += ["--trace", spec.trace.path]
        bench += ["--prompts", spec.trace.eval_prompts] if spec.trace.eval_prompts else []
    if not spec.emulate:
        return [*C2R, *bench]
    emulate = ["emulate", "--nodes", str(launch.topology.nodes), "--gpus-per-node", str(launch.topology.gpus_per_node)]
    emulate += ["--inter-node-gbit", f"{launch.rate_gbit:g}"] if launch.rate_gbit is not None else []
    emulate += ["--intra-node-gbit", f"{spec.intra_node_gbit:g}"] if spec.intra_node_gbit is not None else []
    return [*C2R, *emulate, "--", *bench]


def sweep_jobs(spec: SweepSpec, out_dir: Path) -> SweepJobs:
    """Every step and launch of the sweep with its full command line; runs and writes nothing."""
    out_dir = Path(out_dir).resolve()
    steps: dict[Path, Step] = {}
    jobs = []
    for launch in spec.launches():
        needs = []
        if launch.placement.needs_planning:
            needs.append(plan_step(spec, launch.placement.method, launch.topology, out_dir))
        if launch.routing.kind == "c2r" and launch.routing.collaborators is None:
            needs.append(profile_step(spec, out_dir))
        for step in needs:
            steps.setdefault(step.output, step)
        plan = next((str(s.output) for s in needs if s.kind == "plan"), launch.placement.plan_file)
        lists = next((str(s.output) for s in needs if s.kind == "profile"), None)
        config = spec.launch_config(launch, plan, lists)
        config_path = out_dir / "configs" / f"{launch.name}.yaml"
        json_path = out_dir / "raw" / f"{launch.name}.json"
        jobs.append(LaunchJob(launch, tuple(launch_argv(spec, launch, config_path, json_path)), config_path,
                              yaml.safe_dump(config.to_dict(), sort_keys=False), json_path, tuple(needs)))
    return SweepJobs(tuple(steps.values()), tuple(jobs))


def describe_jobs(spec: SweepSpec, jobs: SweepJobs) -> str:
    lines = [f"sweep {spec.name}: {spec.num_cells} cells in {len(jobs.launches)} bench launches, "
             f"{len(jobs.steps)} plan/profile steps"]
    lines += [f"{s.kind} {s.name}: {shlex.join(s.argv)}" for s in jobs.steps]
    lines += [f"launch {j.launch.name}: {shlex.join(j.argv)}" for j in jobs.launches]
    return "\n".join(lines)


# ---- provenance -------------------------------------------------------------------------------

def git_commit(repo: Path) -> tuple[str, Optional[bool]]:
    """(commit, dirty) of the checkout at `repo`; ("unknown", None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return "unknown", None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=30)
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "cpu"
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device}


# ---- running ----------------------------------------------------------------------------------

def _tail(path: Path) -> tuple[str, ...]:
    """The error lines of a stderr log (c2r-comm's `error:` lines, exceptions; each once, up to 5: under
    torchrun the last lines are its own summary, the ranks' errors come earlier), then its last lines.
    A progress bar's carriage-return frames count as their last frame."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ()
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip()]
    errors = list(dict.fromkeys(line for line in lines if ERROR_LINE.search(line)))[:5]
    return tuple(dict.fromkeys(errors + lines[-TAIL_LINES:]))


def _run(argv: Sequence[str], log_stem: Path, timeout_s: float) -> tuple[Optional[int], str]:
    """Run one command in its own process group (so a timeout stops torchrun's ranks too); returns
    (exit code or None, reason). stdout -> LOG.out, stderr -> LOG.err."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:  # names may hold dots
        try:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, start_new_session=True)
        except OSError as exc:
            return None, f"could not start: {exc}"
        try:
            code = proc.wait(timeout=timeout_s)
            return code, "" if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            _stop(proc)
            return None, f"timed out after {timeout_s:g} s (launch_timeout_s)"
        except KeyboardInterrupt:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (emulate then removes its namespaces), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _axes(spec: SweepSpec, job: LaunchJob, dispatcher: str) -> dict[str, Any]:
    launch = job.launch
    return {"name": spec.name, "launch": launch.name, "topology": str(launch.topology),
            "routing": launch.routing.label, "placement": launch.placement.label, "dispatcher": dispatcher,
            "emulate": spec.emulate, "inter_node_gbit": launch.rate_gbit, "intra_node_gbit": spec.intra_node_gbit,
            "overlap_degree": launch.overlap_degree, "iters": spec.base.run.iters,
            "warmup_iters": spec.base.run.warmup_iters, "config_file": str(job.config_path)}


def run_sweep(spec: SweepSpec, jobs: SweepJobs, out_dir: Path, repo: Path, show_progress: bool = True) -> SweepResult:
    """Run every step (unless its output exists), then every launch whose steps succeeded."""
    out_dir = Path(out_dir).resolve()
    logs = out_dir / "logs"
    commit, dirty = git_commit(repo)
    machine = machine_info()
    failed_steps: dict[Path, Failure] = {}
    failures: list[Failure] = []
    records: list[dict] = []
    bar = tqdm(total=len(jobs.steps) + len(jobs.launches), desc=f"sweep {spec.name}", unit="launch",
               disable=not show_progress, file=sys.stderr)
    with bar:
        for step in jobs.steps:
            bar.set_postfix_str(f"{step.kind} {step.name}")
            if not step.output.is_file():
                step.output.parent.mkdir(parents=True, exist_ok=True)  # `c2r-comm profile --out` needs it
                code, reason = _run(step.argv, logs / f"{step.kind}-{step.name}", spec.launch_timeout_s)
                if code != 0 or not step.output.is_file():
                    err = logs / f"{step.kind}-{step.name}.err"
                    failed_steps[step.output] = Failure(f"{step.kind} {step.name}", code, reason or "wrote no output",
                                                        _tail(err), str(err))
                    failures.append(failed_steps[step.output])
            bar.update(1)
        for job in jobs.launches:
            bar.set_postfix_str(job.launch.name)
            missing = [failed_steps[s.output].what for s in job.needs if s.output in failed_steps]
            if missing:
                failures.append(Failure(f"launch {job.launch.name}", None, f"skipped: {', '.join(missing)} failed",
                                        (), ""))
                bar.update(1)
                continue
            job.config_path.parent.mkdir(parents=True, exist_ok=True)
            job.config_path.write_text(job.config_yaml)
            job.json_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
            code, reason = _run(job.argv, logs / job.launch.name, spec.launch_timeout_s)
            err = logs / f"{job.launch.name}.err"
            if code == 0 and not job.json_path.is_file():
                code, reason = None, f"exit code 0 but no {job.json_path.name} was written"
            if code != 0:
                failures.append(Failure(f"launch {job.launch.name}", code, reason, _tail(err), str(err)))
            else:
                for rec in json.loads(job.json_path.read_text()):
                    rec.update(sweep=_axes(spec, job, rec["dispatcher"]), git_commit=commit, git_dirty=dirty,
                               machine=machine)
                    records.append(rec)
            bar.update(1)
    return SweepResult(tuple(records), tuple(failures))


# ---- reporting --------------------------------------------------------------------------------

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


def write_reports(spec: SweepSpec, result: SweepResult, out_dir: Path, repo: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = (result.records[0]["git_commit"], result.records[0]["git_dirty"]) if result.records \
        else git_commit(repo)
    doc = {"name": spec.name, "git_commit": commit, "git_dirty": dirty, "machine": machine_info(),
           "records": list(result.records), "failures": [asdict(f) for f in result.failures]}
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
    if spec.emulate and any(r.get("emulation") is None for r in result.records):
        md += ["\\* emulation was unavailable for this cell: it ran plainly over loopback, unshaped.", ""]
    md.append(format_sweep_table(result.records) if result.records else "(no cell completed)")
    if result.failures:
        md += ["", "## failures", "", format_failures(result.failures)]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
