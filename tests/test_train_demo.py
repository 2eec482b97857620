"""`c2r-comm train-demo`: real ranks train a byte-level MoE LM on text; the dispatcher never changes
the losses; a run resumed from a checkpoint continues exactly; bad flags are refused before launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2r_comm.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--topology", "1x2", "--hidden-size", "32", "--ffn-hidden-size", "32", "--num-experts", "4", "--top-k", "2",
         "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch", "4", "--eval-every", "3", "--eval-batches", "2",
         "--lr", "0.01", "--dtype", "float64"]


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
                   "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "3")
    assert [(r["kind"], r["step"]) for r in a2a] == [(r["kind"], r["step"]) for r in dedup]
    for x, y in zip(a2a, dedup):  # the same math, summed in another order (float64)
        assert abs(x["loss"] - y["loss"]) < 1e-9, (x, y)
        assert x["load_cv"] == pytest.approx(y["load_cv"], abs=1e-9)
        assert x["gpus_per_token"] == pytest.approx(y["gpus_per_token"], abs=1e-9)
    # what each dispatcher sends: k copies per token for the baseline, one per distinct GPU for dedup
    assert all(r["copies_per_token"] == pytest.approx(2.0) for r in a2a)
    assert all(r["copies_per_token"] == pytest.approx(r["gpus_per_token"]) for r in dedup)
    train = [r["loss"] for r in dedup if r["kind"] == "train"]
    assert train[-1] < train[0] - 0.5, train  # it learns
    # the end's checkpoint in the folder, the one of step 3 (--checkpoint-every) beside it
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["rank0.pt", "rank1.pt", "run.json", "step3"]
    assert sorted(p.name for p in (tmp_path / "ck" / "step3").iterdir()) == ["rank0.pt", "rank1.pt", "run.json"]
    meta = json.loads((tmp_path / "ck" / "step3" / "run.json").read_text())
    assert meta["step"] == 3 and meta["shape"]["model.hidden_size"] == 32 and meta["shape"]["--layers"] == 2
    assert torch.load(tmp_path / "ck" / "step3" / "rank1.pt", weights_only=False)["step"] == 3
    assert torch.load(tmp_path / "ck" / "rank1.pt", weights_only=False)["step"] == 6
    # 3 more steps from step 3's checkpoint == the last 3 of the 6 steps straight
    resumed = _train(text, tmp_path / "resumed.jsonl", "--dispatcher", "dedup", "--steps", "3",
                     "--resume", str(tmp_path / "ck" / "step3"))
    tail = [r for r in dedup if r["step"] > 3]
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in tail]
    for x, y in zip(resumed, tail):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-12), (x, y)


def test_live_replanning_moves_experts_and_changes_no_loss(tmp_path, text):
    """--replan-every: the placement changes during training (experts and Adam state move), the
    losses do not (float64); a run resumed from a checkpoint continues on the placement it had
    re-planned to, so its next re-plan is the uninterrupted run's."""
    flags = ["--dispatcher", "dedup", "--steps", "6", "--num-experts", "8"]  # 1x2: four experts per rank
    plain = _train(text, tmp_path / "plain.jsonl", *flags)
    moved = _train(text, tmp_path / "moved.jsonl", *flags, "--replan-every", "2", "--checkpoint", str(tmp_path / "ck"),
                   "--checkpoint-every", "2")
    replans = [r for r in moved if r["kind"] == "replan"]
    assert [r["step"] for r in replans] == [2, 4, 6]
    contiguous = [e // 4 for e in range(8)]
    assert any(ranks != contiguous for r in replans for ranks in r["expert_to_rank"])  # experts did move
    plain_rows = [r for r in plain if r["kind"] != "replan"]
    moved_rows = [r for r in moved if r["kind"] != "replan"]
    assert [(r["kind"], r["step"]) for r in plain_rows] == [(r["kind"], r["step"]) for r in moved_rows]
    for x, y in zip(plain_rows, moved_rows):
        assert abs(x["loss"] - y["loss"]) < 1e-9, (x, y)
    # resumed at step 4 (after its re-plan): steps 5-6 and the re-plan at 6 as in the straight run
    assert replans[1]["expert_to_rank"] != [contiguous, contiguous]  # so the resume has to restore it
    resumed = _train(text, tmp_path / "resumed.jsonl", "--dispatcher", "dedup", "--steps", "2", "--num-experts", "8",
                     "--replan-every", "2", "--resume", str(tmp_path / "ck" / "step4"))
    tail = [r for r in moved if r["step"] > 4]
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in tail]
    for x, y in zip(resumed, tail):
        if x["kind"] == "replan":
            assert x["expert_to_rank"] == y["expert_to_rank"]
        else:  # the same placement: the same GPUs and copies per token, not only the same loss
            assert abs(x["loss"] - y["loss"]) < 1e-12, (x, y)
            assert x["gpus_per_token"] == y["gpus_per_token"] and x["copies_per_token"] == y["copies_per_token"]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps"),
    (["--seq-len", "0"], "--seq-len"),
    (["--lr", "0"], "--lr"),
    (["--text", "/nonexistent/text"], "no such file or folder"),
    (["--resume", "/nonexistent/ck"], "--resume"),
    (["--checkpoint-every", "2"], "--checkpoint-every"),
    (["--checkpoint-every", "-1", "--checkpoint", "ck"], "--checkpoint-every"),
    (["--heads", "3"], "--heads"),
])
def test_bad_flags_are_refused_before_any_rank_starts(capsys, no_launch, text, flags, words):
    assert main(["train-demo", "--text", str(text), *SMALL, *flags]) == 2
    assert words in capsys.readouterr().err


def _checkpoint_worker(rank, world, folder):
    import torch

    from c2r_comm.config import Config, with_overrides
    from c2r_comm.groups import build_process_groups
    from c2r_comm.plan import PlacementPlan
    from c2r_comm.topology import Topology
    from c2r_comm.train import checkpoint
    from c2r_comm.train.model import MoETransformerLM

    config = with_overrides(Config(), {"parallel.gpus_per_node": world, "model.hidden_size": 16,
                                       "model.ffn_hidden_size": 16, "model.num_experts": 4, "model.top_k": 2})
    groups = build_process_groups(Topology(1, world), 30)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(rank))
    a = MoETransformerLM(config, groups, torch.device("cpu"), 2, 2, 8)
    opt = torch.optim.AdamW(a.parameters(), lr=0.1)
    a(tokens).logits_BSV.sum().backward()
    opt.step()  # weights away from their initial values
    checkpoint.save(a, opt, 1, folder, rank, {})
    with torch.no_grad():
        want = a(tokens).logits_BSV
    # the same model under a placement that swaps the ranks' experts, restored from the checkpoint
    plan = PlacementPlan((1, 1, 0, 0), 2)
    plan_path = f"{folder}/plan.json"
    if rank == 0:
        from c2r_comm.plan import PlanFile
        PlanFile(Topology(1, world), 4, {0: plan, 1: plan}, "test").save(plan_path)
    torch.distributed.barrier()
    b = MoETransformerLM(with_overrides(config, {"placement.plan": plan_path}), groups, torch.device("cpu"), 2, 2, 8)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    step, same = checkpoint.load(b, opt_b, folder, rank, torch.device("cpu"))
    with torch.no_grad():
        got = b(tokens).logits_BSV
    # one more step on both: equal only if the optimizer moments moved with their experts
    for model, opt in ((a, opt), (b, opt_b)):
        opt.zero_grad()
        model(tokens).logits_BSV.sum().backward()
        for p in model.replicated_parameters():  # as train_step: replicated gradients summed over ranks
            torch.distributed.all_reduce(p.grad)
        opt.step()
    with torch.no_grad():
        after = float((b(tokens).logits_BSV - a(tokens).logits_BSV).abs().max())
    return step, same, b.moes[0].experts.global_ids, float((got - want).abs().max()), after


@pytest.mark.parametrize("flags, words", [
    (["--hidden-size", "64", "--heads", "2"], ["'model.hidden_size' = 64", "allowed 32, as the checkpoint"]),
    (["--layers", "1"], ["'--layers' = 1", "allowed 2"]),
    (["--seq-len", "32"], ["'--seq-len' = 32", "allowed 16"]),
    (["--num-experts", "8"], ["'model.num_experts' = 8", "allowed 4"]),
    (["--topology", "1x4"], ["'ranks (parallel.nodes x parallel.gpus_per_node)' = 4", "allowed 2",
                             "one file per rank"]),
    (["--config", "SHARED_YAML"], ["shared experts' FFN width", "= 32", "allowed 0"]),
])
def test_resume_with_another_model_is_refused_before_any_rank_starts(tmp_path, capsys, no_launch, text, flags,
                                                                      words):
    """The checkpoint's run.json (written by rank 0 beside the rank files) against this run's model."""
    from c2r_comm.config import Config, with_overrides
    from c2r_comm.train.checkpoint_meta import model_shape, write_meta

    saved = with_overrides(Config(), {"model.hidden_size": 32, "model.ffn_hidden_size": 32, "model.num_experts": 4,
                                      "model.top_k": 2, "parallel.nodes": 1, "parallel.gpus_per_node": 2})
    write_meta(tmp_path, model_shape(saved, 2, 16), 3)
    argv = ["train-demo", "--text", str(text), *SMALL, "--steps", "1", "--resume", str(tmp_path)]
    shared = tmp_path / "shared.yaml"  # one shared expert of the routed experts' FFN size (32)
    shared.write_text("model:\n  num_shared_experts: 1\n")
    assert main(argv + [str(shared) if f == "SHARED_YAML" else f for f in flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_checkpoint_resumes_under_another_placement(tmp_path):
    from ranks import run_ranks

    results = run_ranks(2, _checkpoint_worker, str(tmp_path))
    for rank, (step, same, ids, diff, after) in enumerate(results):
        assert step == 1 and not same
        assert ids == ((2, 3) if rank == 0 else (0, 1))
        assert diff < 1e-5, diff  # every expert restored under its new rank: the same outputs
        assert after < 1e-4, after  # and the same next step


def test_quality_variants_follow_the_issue():
    from c2r_comm.bench.quality import variants

    names = [v.name for v in variants(16, 4, "c.npz")]
    assert names == ["topk", "c2r_T15", "c2r_T8", "c2r_T4", "c2r_T3", "device_Nd1", "device_Nd2"]
    assert [v.name for v in variants(4, 2, "c.npz")] == ["topk", "c2r_T3", "c2r_T2", "c2r_T1", "device_Nd1",
                                                          "device_Nd2"]


def test_quality_check_end_to_end(tmp_path, text):
    """Pretrain, record routing, profile, plan, continue with two routers: a table and two plots."""
    out = tmp_path / "q"
    assert main(["c2r-quality", "--out", str(out), "--text", str(text), "--topology", "1x2", "--num-experts", "4",
                 "--top-k", "2", "--hidden-size", "16", "--ffn-hidden-size", "16", "--layers", "1", "--steps", "4",
                 "--eval-every", "2", "--seeds", "0", "--only", "topk,c2r_T1"]) == 0
    table = (out / "quality.md").read_text()
    assert "| topk | " in table and "| c2r_T1 | " in table and "1 seeds" in table
    assert (out / "c2r_quality_loss.png").stat().st_size > 0 and (out / "c2r_quality_tradeoff.png").is_file()
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("train-demo") and "--record-routing" in commands[0]
    assert commands[1].startswith("profile") and commands[2].startswith("plan")
    assert sum("--resume" in c for c in commands) == 2 and all("--plan" in c for c in commands[3:])
