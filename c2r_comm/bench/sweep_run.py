"""Run a SweepSpec: plan/profile steps, then one subprocess per bench launch; collect the records
(sweep_report.py writes sweep.json and sweep.md from them).

Output directory layout (everything a sweep writes):
    plans/     plan JSONs (`c2r-comm plan`), cached: a rerun with the same inputs reuses them
    profiles/  collaborator stats (`c2r-comm profile`) for c2r routings without a lists file, cached
    configs/   the bench config YAML of each launch
    raw/       each launch's bench JSON;  logs/  each step's and launch's stdout and stderr
    sweep.json, sweep.md   the report (sweep_report.py)

Plans and profiles are cached by everything that decides them: the command line (method, topology,
layer, prompt ranges), the planner's default options, and the trace file's size and mtime.
A launch that fails (exit code, timeout, no JSON or an unreadable one) is reported with its last
stderr lines and the sweep goes on; its (launch, dispatcher) cells are listed as missing, and the
caller exits non-zero when any failed. SIGINT, SIGTERM and SIGHUP stop the running launch's process
group (SIGTERM, then SIGKILL after a grace period) and raise rank_launcher.Interrupted out of
run_sweep.
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
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from tqdm import tqdm

from c2r_comm.bench.rank_launcher import install_signal_handlers, restore_signal_handlers, signals_blocked
from c2r_comm.bench.sweep_spec import Launch, SweepSpec
from c2r_comm.placement.planners import PlannerOptions

C2R = (sys.executable, "-m", "c2r_comm")
TAIL_LINES = 10
ERROR_LINE = re.compile(r"^c2r-comm [\w-]+: error:|^\w+(Error|Exception)\b")
STOP_GRACE_S = 30.0  # after SIGTERM, before SIGKILL: emulate removes its namespaces, bench stops its ranks
LAUNCH_TAG = "C2R_SWEEP_LAUNCH"  # in the environment of every process a launch starts, whatever its group


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
    missing: tuple[tuple[str, str], ...] = ()  # (launch name, dispatcher) of every cell without a record


# ---- command lines (pure) ---------------------------------------------------------------------

def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def _cache_key(argv: Sequence[str], trace_path: str, *settings: Any) -> str:
    """What decides a plan or profile: its command line (without --out), other settings it depends on,
    and the trace file as it is now (size, mtime), so a regenerated trace or a changed setting misses."""
    stat = os.stat(trace_path)
    return _digest(list(argv), stat.st_size, stat.st_mtime_ns, *settings)


def plan_step(spec: SweepSpec, method: str, topology, out_dir: Path) -> Step:
    t = spec.trace
    cmd = ["plan", "--trace", t.path, "--topology", str(topology), "--method", method, "--layers", str(t.layer),
           "--no-png"]
    cmd += ["--fit-prompts", t.fit_prompts] if t.fit_prompts else []
    cmd += ["--eval-prompts", t.eval_prompts] if t.eval_prompts else []
    key = _cache_key(cmd, t.path, asdict(PlannerOptions()))  # the planner's defaults decide the rest
    out = out_dir / "plans" / f"{method}_{topology}_layer{t.layer}_{key}.json"
    return Step("plan", (*C2R, *cmd, "--out", str(out)), out)


def profile_step(spec: SweepSpec, out_dir: Path) -> Step:
    t = spec.trace
    cmd = ["profile", "--trace", t.path, "--layers", str(t.layer), "--topology", "1x1"]
    cmd += ["--prompts", t.fit_prompts] if t.fit_prompts else []
    out = out_dir / "profiles" / f"collaborators_layer{t.layer}_{_cache_key(cmd, t.path)}.npz"
    return Step("profile", (*C2R, *cmd, "--out", str(out)), out)


def launch_argv(spec: SweepSpec, launch: Launch, config_path: Path, json_path: Path) -> list[str]:
    """`c2r-comm bench ...` for the launch; under `c2r-comm emulate` when the sweep emulates nodes."""
    bench = ["bench", "--config", str(config_path), "--topology", str(launch.topology),
             "--dispatcher", ",".join(launch.dispatchers), "--json", str(json_path)]
    if launch.routing.kind == "trace":  # the trace's layer (a plan's layer is placement.layer in the config)
        bench += ["--layer", str(spec.base.placement.layer), "--trace", spec.trace.path]
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
    """Run one command in its own process group, every process it starts tagged (LAUNCH_TAG) so that a
    stop finds them all; returns (exit code or None, reason). stdout -> LOG.out, stderr -> LOG.err.
    Whatever ends the wait early (the timeout, a stop signal, an error) stops them all first."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:  # names may hold dots
        try:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, start_new_session=True,
                                    env={**os.environ, LAUNCH_TAG: tag})
        except OSError as exc:
            return None, f"could not start: {exc}"
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc, tag)
            return None, f"timed out after {timeout_s:g} s (launch_timeout_s)"
        except BaseException:
            _stop(proc, tag)
            raise
        return code, "" if code == 0 else f"exit code {code}"


def _tagged(tag: str) -> dict[int, int]:
    """pid -> process group of every live process with LAUNCH_TAG=tag in its environment (Linux /proc;
    a zombie's environment reads empty)."""
    needle = f"\0{LAUNCH_TAG}={tag}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in b"\0" + (entry / "environ").read_bytes():
                found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _signal(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(proc: subprocess.Popen, tag: str, grace_s: float = STOP_GRACE_S) -> None:
    """Stop every process of a launch: SIGTERM its process group (bench and emulate then stop their
    ranks, which run in sessions of their own, and emulate removes its namespaces); once no process
    of the group is left, SIGTERM the tagged ones that outlived it (a launcher stopped while starting
    its ranks); after grace_s, SIGKILL whatever is left. Stop signals are held back meanwhile."""
    with signals_blocked():
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline, told = time.monotonic() + grace_s, set()
        while (left := _tagged(tag)) and time.monotonic() < deadline:
            if proc.pid not in left.values():  # the group is gone: nothing else stops these
                _signal(set(left) - told, signal.SIGTERM)
                told |= set(left)
            time.sleep(0.1)
        _signal(_tagged(tag), signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # safe: proc is not reaped yet, so its pid is not reused
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def _stop_signals_raise():
    """While running: SIGINT/SIGTERM/SIGHUP raise Interrupted (main thread only), then the previous
    handlers are back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = install_signal_handlers()
    try:
        yield
    finally:
        restore_signal_handlers(previous)


def read_launch_records(job: LaunchJob) -> list[dict]:
    """bench's JSON of one launch: a list of records of the launch's dispatchers (else ValueError;
    OSError when it cannot be read)."""
    records = json.loads(job.json_path.read_text())
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and r.get("dispatcher") in job.launch.dispatchers and isinstance(
                r.get("measurement"), dict) for r in records):
        raise ValueError(f"not a list of bench records of the dispatchers {list(job.launch.dispatchers)}")
    return records


def _launch_outcome(job: LaunchJob, code: Optional[int], reason: str,
                    err: Path) -> tuple[list[dict], Optional[Failure]]:
    """The launch's records, and its Failure: a non-zero exit, a timeout, no JSON or an unreadable one,
    or dispatchers without a record (the cells of those are missing from the sweep)."""
    what = f"launch {job.launch.name}"
    if code != 0:
        return [], Failure(what, code, reason, _tail(err), str(err))
    try:
        records = read_launch_records(job)
    except FileNotFoundError:
        return [], Failure(what, None, f"exit code 0 but no {job.json_path.name} was written", _tail(err), str(err))
    except (OSError, ValueError) as exc:
        return [], Failure(what, 0, f"unreadable {job.json_path}: {exc}", _tail(err), str(err))
    lacking = [d for d in job.launch.dispatchers if d not in {r["dispatcher"] for r in records}]
    if lacking:
        return records, Failure(what, 0, f"{job.json_path.name} holds no record of {', '.join(lacking)}",
                                _tail(err), str(err))
    return records, None


def _axes(spec: SweepSpec, job: LaunchJob, dispatcher: str) -> dict[str, Any]:
    launch = job.launch
    return {"name": spec.name, "launch": launch.name, "topology": str(launch.topology),
            "routing": launch.routing.label, "placement": launch.placement.label, "dispatcher": dispatcher,
            "emulate": spec.emulate, "inter_node_gbit": launch.rate_gbit, "intra_node_gbit": spec.intra_node_gbit,
            "overlap_degree": launch.overlap_degree, "iters": spec.base.run.iters,
            "warmup_iters": spec.base.run.warmup_iters, "config_file": str(job.config_path)}


def run_sweep(spec: SweepSpec, jobs: SweepJobs, out_dir: Path, repo: Path, show_progress: bool = True) -> SweepResult:
    """Run every step (unless its output exists), then every launch whose steps succeeded.
    A stop signal stops the running launch and raises Interrupted."""
    out_dir = Path(out_dir).resolve()
    logs = out_dir / "logs"
    commit, dirty = git_commit(repo)
    machine = machine_info()
    failed_steps: dict[Path, Failure] = {}
    failures: list[Failure] = []
    records: list[dict] = []
    missing: list[tuple[str, str]] = []
    bar = tqdm(total=len(jobs.steps) + len(jobs.launches), desc=f"sweep {spec.name}", unit="launch",
               disable=not show_progress, file=sys.stderr)
    with bar, _stop_signals_raise():
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
            failed_needs = [failed_steps[s.output].what for s in job.needs if s.output in failed_steps]
            if failed_needs:
                failures.append(Failure(f"launch {job.launch.name}", None,
                                        f"skipped: {', '.join(failed_needs)} failed", (), ""))
                missing += [(job.launch.name, d) for d in job.launch.dispatchers]
                bar.update(1)
                continue
            job.config_path.parent.mkdir(parents=True, exist_ok=True)
            job.config_path.write_text(job.config_yaml)
            job.json_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
            code, reason = _run(job.argv, logs / job.launch.name, spec.launch_timeout_s)
            got, failure = _launch_outcome(job, code, reason, logs / f"{job.launch.name}.err")
            failures += [failure] if failure else []
            for rec in got:
                rec.update(sweep=_axes(spec, job, rec["dispatcher"]), git_commit=commit, git_dirty=dirty,
                           machine=machine)
                records.append(rec)
            done = {rec["dispatcher"] for rec in got}
            missing += [(job.launch.name, d) for d in job.launch.dispatchers if d not in done]
            bar.update(1)
    return SweepResult(tuple(records), tuple(failures), tuple(missing))
