"""`c2r-comm train-demo`: real ranks train a byte-level MoE LM on text; the dispatcher never changes
the losses; a run resumed from a checkpoint continues exactly; bad flags are refused before launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from c2r_comm.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--topology", "1x2", "--hidden-size", "32", "--ffn-hidden-size", "32", "--num-experts", "4", "--top-k", "2",
         "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch", "4", "--eval-every", "3", "--eval-batches", "2",
         "--lr", "0.01"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Real text: the shared corpus if present (first 200 kB of each file), else this repo's docs."""
    out = tmp_path_factory.mktemp("text")
    shared = REPO.parent / "shared" / "text"
    sources = sorted(shared.glob("*.txt")) if shared.is_dir() else sorted((REPO / "docs").glob("*.md"))
    for src in sources:
        (out / (src.stem + ".txt")).write_bytes(src.read_bytes()[:200_000])
    return out


def _train(text: Path, log: Path, *flags: str) -> list[dict]:
    cmd = [sys.executable, "-m", "c2r_comm", "train-demo", "--text", str(text), *SMALL, "--log", str(log), *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps/s" in done.stdout, done.stdout
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_dispatchers_give_the_same_losses_and_resume_continues_exactly(tmp_path, text):
    a2a = _train(text, tmp_path / "a2a.jsonl", "--dispatcher", "alltoall", "--steps", "6")
    dedup = _train(text, tmp_path / "dedup.jsonl", "--dispatcher", "dedup", "--steps", "6",
                   "--checkpoint", str(tmp_path / "ck6"))
    assert [(r["kind"], r["step"]) for r in a2a] == [(r["kind"], r["step"]) for r in dedup]
    for x, y in zip(a2a, dedup):  # the same math, summed in another order (fp32)
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
        assert x["load_cv"] == pytest.approx(y["load_cv"], abs=1e-9)
        assert x["gpus_per_token"] == pytest.approx(y["gpus_per_token"], abs=1e-9)
    # what each dispatcher sends: k copies per token for the baseline, one per distinct GPU for dedup
    assert all(r["copies_per_token"] == pytest.approx(2.0) for r in a2a)
    assert all(r["copies_per_token"] == pytest.approx(r["gpus_per_token"]) for r in dedup)
    train = [r["loss"] for r in dedup if r["kind"] == "train"]
    assert train[-1] < train[0] - 0.5, train  # it learns
    assert sorted(p.name for p in (tmp_path / "ck6").iterdir()) == ["rank0.pt", "rank1.pt"]
    # 3 steps, checkpoint, 3 more from the checkpoint == 6 steps straight
    _train(text, tmp_path / "first.jsonl", "--dispatcher", "dedup", "--steps", "3", "--checkpoint", str(tmp_path / "ck3"))
    resumed = _train(text, tmp_path / "resumed.jsonl", "--dispatcher", "dedup", "--steps", "3",
                     "--resume", str(tmp_path / "ck3"))
    tail = [r for r in dedup if r["step"] > 3]
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in tail]
    for x, y in zip(resumed, tail):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps"),
    (["--seq-len", "0"], "--seq-len"),
    (["--lr", "0"], "--lr"),
    (["--text", "/nonexistent/text"], "no such file or folder"),
    (["--resume", "/nonexistent/ck"], "--resume"),
    (["--heads", "3"], "--heads"),
])
def test_bad_flags_are_refused_before_any_rank_starts(capsys, text, flags, words):
    assert main(["train-demo", "--text", str(text), *SMALL, *flags]) == 2
    assert words in capsys.readouterr().err
