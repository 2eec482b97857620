"""The C2R quality check (issue 12 item 6) at small scale: does constraining routing cost quality?
(`c2r-comm c2r-quality`; like sweeps, it runs c2r-comm commands as subprocesses.)

1. pretrain the demo model with top-k routing, checkpoint it and record its routing on training text;
2. profile the collaboration of that routing (`c2r-comm profile`) and plan a placement from it
   (`c2r-comm plan --method hypergraph`);
3. continue from the checkpoint under the planned placement for the same number of steps with
   (a) top-k, (b) C2R at each Top-T, (c) the device-constrained router at each N_d, once per seed
   (seeds change the order of the training windows);
4. report held-out loss, load CV and E[distinct GPUs per token] under the planned placement (mean
   and standard deviation over seeds), loss curves and the loss vs GPUs/token trade-off.

Every run is a `c2r-comm` command line (train-demo, profile, plan), written to DIR/commands.txt.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # train-demo routing flags


def variants(num_experts: int, top_k: int, collaborators: str) -> list[Variant]:
    """top-k; C2R at T in {E-1, E/2, E/4, k-1} (distinct, >= max(1, k-1)); device-constrained N_d in {1, 2}."""
    out = [Variant("topk", ("--routing", "topk"))]
    ts = []
    for t in (num_experts - 1, num_experts // 2, num_experts // 4, top_k - 1):
        if max(1, top_k - 1) <= t <= num_experts - 1 and t not in ts:
            ts.append(t)
    out += [Variant(f"c2r_T{t}", ("--routing", "c2r", "--top-t", str(t), "--collaborators", collaborators))
            for t in ts]
    out += [Variant(f"device_Nd{n}", ("--routing", "device_constrained", "--max-groups", str(n))) for n in (1, 2)]
    return out


class CommandFailed(RuntimeError):
    """A c2r-comm command of the experiment exited non-zero."""


def run_command(argv: Sequence[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(" ".join(argv) + "\n")
    done = subprocess.run([sys.executable, "-m", "c2r_comm", *argv], capture_output=True, text=True)
    if done.returncode:
        raise CommandFailed(f"c2r-comm {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class VariantResult:
    name: str
    seeds: tuple[int, ...]
    valid_loss: tuple[float, ...]  # final held-out loss per seed
    load_cv: tuple[float, ...]
    gpus_per_token: tuple[float, ...]
    curve: tuple[tuple[int, float], ...]  # (step, mean held-out loss over seeds)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# two-sided 95 % quantiles of Student's t for n - 1 degrees of freedom (n = seeds, up to 10)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_difference(r: VariantResult, base: VariantResult) -> tuple[float, float]:
    """Mean over seeds of (loss - base loss) on the same seed (the same training and held-out text)
    and the half-width of its 95 % confidence interval (Student's t); NaN width with one seed."""
    if r.seeds != base.seeds:
        raise ValueError(f"{r.name} ran seeds {r.seeds}, {base.name} ran {base.seeds}: pair them on the same seeds")
    diffs = [a - b for a, b in zip(r.valid_loss, base.valid_loss)]
    mean, sd = _mean_std(diffs)
    n = len(diffs)
    return mean, (T_975.get(n - 1, 1.96) * sd / n ** 0.5 if n > 1 else float("nan"))


def summarize(name: str, seeds: Sequence[int], logs: Sequence[list[dict]]) -> VariantResult:
    valid = [[r for r in log if r["kind"] == "valid"] for log in logs]
    last = [v[-1] for v in valid]
    steps = [r["step"] for r in valid[0]]
    curve = tuple((s, statistics.fmean(v[i]["loss"] for v in valid)) for i, s in enumerate(steps))
    return VariantResult(name, tuple(seeds), tuple(r["loss"] for r in last), tuple(r["load_cv"] for r in last),
                         tuple(r["gpus_per_token"] for r in last), curve)


def format_table(results: Sequence[VariantResult], pretrain_loss: float) -> str:
    base = next(r for r in results if r.name == "topk")
    lines = [f"Held-out loss after pretraining (top-k): {pretrain_loss:.4f}. Mean ± standard deviation over "
             f"{len(base.seeds)} seeds; 'vs top-k': mean of the per-seed differences (same training and held-out "
             "text per seed) ± the half-width of its 95 % confidence interval (Student's t).", "",
             "| routing | held-out loss | vs top-k | load CV | E[GPUs/token] |", "|---|---|---|---|---|"]
    for r in results:
        delta, half = paired_difference(r, base)
        (loss, loss_sd), (cv, cv_sd), (gpus, gpus_sd) = (_mean_std(r.valid_loss), _mean_std(r.load_cv),
                                                         _mean_std(r.gpus_per_token))
        vs = "—" if r is base else f"{delta:+.4f} ± {half:.4f}"
        lines.append(f"| {r.name} | {loss:.4f} ± {loss_sd:.4f} | {vs} | {cv:.3f} ± {cv_sd:.3f} | "
                     f"{gpus:.3f} ± {gpus_sd:.3f} |")
    return "\n".join(lines)


def plot(results: Sequence[VariantResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, xlabel: str, ylabel: str, name: str) -> Path:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        return out_dir / name

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], marker="o", ms=3, label=r.name)
    curves = save(fig, ax, "training step (continued from the top-k checkpoint)",
                  "held-out loss (nats per byte), mean over seeds", "c2r_quality_loss.png")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results:
        (x, xe), (y, ye) = _mean_std(r.gpus_per_token), _mean_std(r.valid_loss)
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=r.name)
    trade = save(fig, ax, "E[distinct GPUs per token] under the planned placement",
                 "final held-out loss (mean ± std over seeds)", "c2r_quality_tradeoff.png")
    return [curves, trade]
