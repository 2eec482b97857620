"""The megatron-core peer (`c2r-comm bench --peers megatron`): megatron-core's MoELayer with its own
alltoall dispatcher computes what our layer computes for the same experts and routing (verified on
gloo ranks, not assumed), its bytes are the rows its dispatcher sent, and a missing megatron-core
fails before launch. Tests that run megatron-core are skipped where the optional extra is missing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from c2r_comm.bench import peers
from c2r_comm.bench.peers import MEGATRON_INSTALL, megatron_importable
from c2r_comm.cli import main

REPO = Path(__file__).resolve().parents[1]
needs_megatron = pytest.mark.skipif(
    not megatron_importable(),
    reason=f"megatron-core is not installed (optional extra for bench --peers megatron): {MEGATRON_INSTALL}")

W, E, D, F, T = 2, 6, 16, 24, 12  # 3 experts per rank


def _config(k, routing=None, shared=0):
    from c2r_comm.config import config_from_dict
    return config_from_dict({
        "model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": E, "top_k": k, "num_shared_experts": shared},
        "parallel": {"nodes": 1, "gpus_per_node": W},
        "routing": routing or {"kind": "topk", "renormalize": True, "aux_loss_weight": 0.0},
        "run": {"tokens_per_rank": T, "seed": 5, "warmup_iters": 1, "iters": 2},
    })


def _fixed_routing(rank, k):
    """Trace-like: k distinct experts per token, skewed per rank so counts per destination differ."""
    g = torch.Generator().manual_seed(40 + rank)
    bias = torch.zeros(E)
    bias[rank] = 2.0
    idx = torch.topk(torch.rand(T, E, generator=g) + bias, k, dim=1).indices
    return idx, torch.full(idx.shape, 1.0 / k)


def _run(fn, x, grad):
    xr = x.clone().requires_grad_()
    out, aux = fn(xr)
    ((out * grad).sum() + aux).backward()
    return out.detach(), xr.grad


def _expert_errors(ours, peer):
    """Weights and weight grads of each local expert: ours [gate; up] / down vs its fc1 / fc2."""
    err = {"weights": 0.0, "grad_w": 0.0}
    ex = ours.experts
    for j, mlp in enumerate(peer.moe.experts.local_experts):
        fc1 = (torch.cat([ex.w_gate_LDF[j].t(), ex.w_up_LDF[j].t()]), mlp.linear_fc1.weight)
        fc2 = (ex.w_down_LFD[j].t(), mlp.linear_fc2.weight)
        for mine, theirs in (fc1, fc2):
            err["weights"] = max(err["weights"], float((mine - theirs).abs().max()))
        g1 = torch.cat([ex.w_gate_LDF.grad[j].t(), ex.w_up_LDF.grad[j].t()])
        err["grad_w"] = max(err["grad_w"], float((g1 - mlp.linear_fc1.weight.grad).abs().max()),
                            float((ex.w_down_LFD.grad[j].t() - mlp.linear_fc2.weight.grad).abs().max()))
    return err


def _worker(rank, world):
    from c2r_comm.bench.megatron_peer import _recorder, build_megatron_peer, megatron_traffic
    from c2r_comm.groups import build_process_groups
    from c2r_comm.layer import build_moe_layer
    from c2r_comm.topology import Topology

    cpu = torch.device("cpu")
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    g = torch.Generator().manual_seed(7 + rank)
    x, grad = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    results = {}
    for k, shared in ((1, 0), (2, 0), (3, 1)):  # given routing (the trace's path); one with a shared expert
        config = _config(k, shared=shared)
        idx, w = _fixed_routing(rank, k)
        ours = build_moe_layer(config, groups, cpu, dispatcher="dedup")
        out_o, gx_o = _run(lambda xr: (lambda o: (o.out_TD, o.aux_loss))(ours.forward_routed(xr, idx, w)), x, grad)
        peer = build_megatron_peer(config, groups, cpu, (idx, w))
        rec = _recorder()
        rec.calls, rec.gathered_bytes = [], 0
        out_m, gx_m = _run(peer, x, grad)
        calls, gathered = rec.calls, rec.gathered_bytes
        rec.calls = None
        traffic = megatron_traffic(calls, gathered, T, groups, cpu)
        rows_to = torch.bincount(idx.reshape(-1) // (E // W), minlength=W)  # its rows: one per (token, expert)
        results[f"given k={k}"] = dict(
            out=float((out_o - out_m).abs().max()), grad_x=float((gx_o - gx_m).abs().max()),
            **_expert_errors(ours, peer), notes=traffic.notes, tokens=traffic.tokens,
            dispatch=traffic.dispatch.as_tuple(), combine=traffic.combine.as_tuple(), rows_to=rows_to.tolist(),
            n_calls=len(calls), gathered=gathered)
    for k, renorm in ((2, True), (3, True), (3, False)):  # its own TopKRouter with our gate weights
        config = _config(k, {"kind": "topk", "renormalize": renorm, "aux_loss_weight": 0.0})
        ours = build_moe_layer(config, groups, cpu, dispatcher="alltoall")
        out_o, gx_o = _run(lambda xr: (lambda o: (o.out_TD, o.aux_loss))(ours(xr)), x, grad)
        peer = build_megatron_peer(config, groups, cpu, None)
        out_m, gx_m = _run(peer, x, grad)
        results[f"router k={k} renormalize={renorm}"] = dict(
            out=float((out_o - out_m).abs().max()), grad_x=float((gx_o - gx_m).abs().max()),
            grad_router=float((ours.router.gate.weight.grad - peer.moe.router.weight.grad).abs().max()),
            **_expert_errors(ours, peer))
    good_idx, good_w = _fixed_routing(rank, 2)
    bad_idx = good_idx.clone()
    if rank == 1:
        bad_idx[3, 1] = bad_idx[3, 0]  # one token names one expert twice: megatron's routing map cannot
    refused = []
    for routing in ((bad_idx, good_w), (good_idx, good_w[:, :1] if rank == 1 else good_w)):  # then unfit weights
        try:
            build_megatron_peer(_config(2), groups, cpu, routing)
            refused.append(None)
        except Exception as exc:  # noqa: BLE001 (the test reads what was raised)
            refused.append(f"{type(exc).__name__}: {exc}")
    return results, refused


@needs_megatron
def test_megatron_layer_equals_ours_with_same_experts_and_routing():
    by_rank, refused = zip(*run_ranks(W, _worker, timeout_s=180))
    # Bad given routing on rank 1 only (an expert twice; weights of another shape, which torch itself
    # refuses): every rank raises before any data collective, naming rank 1.
    for case in range(2):
        got = [refused[r][case] for r in range(W)]
        assert all(r is not None and r.startswith("InputError") and "ranks [1]" in r for r in got), got
    assert "repeats an expert" in refused[1][0] and "repeats an expert" not in refused[0][0]
    rows_to = {k: [by_rank[r][f"given k={k}"]["rows_to"] for r in range(W)] for k in (1, 2, 3)}
    for rank, results in enumerate(by_rank):
        for case, r in results.items():
            where = f"rank {rank} {case}: {r}"
            assert r["weights"] == 0.0, where  # our expert weights, copied
            assert r["out"] < 1e-5 and r["grad_x"] < 1e-5 and r["grad_w"] < 1e-5, where
            if "grad_router" in r:  # the routing weights' gradient reaches the gate alike
                assert r["grad_router"] < 1e-5, where
        for k in (1, 2, 3):
            r = results[f"given k={k}"]
            n = r["notes"]
            assert n["routes"] == W * T * k and r["tokens"] == W * T and r["n_calls"] == 3
            assert r["gathered"] == E * 8  # the count all_gather: E int64 per rank
            # Rows per (sender, receiver), counted here from the routing: one row per (token, expert).
            local = sum(rows_to[k][s][s] for s in range(W))
            same = W * T * k - local
            pairs = sum(1 for s in range(W) for d in range(W) if s != d and rows_to[k][s][d])
            # A dispatch row is its token (D fp32) and its probability (one fp32): two collectives.
            assert r["dispatch"] == (local, same, 0, same * (D + 1) * 4, 0, 2 * pairs, 0), (r["dispatch"], rows_to)
            assert r["combine"] == (local, same, 0, same * D * 4, 0, pairs, 0)


TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"


def _bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "c2r_comm", "bench", "--topology", "1x2", "--tokens-per-rank", "32",
                           "--hidden-size", "16", "--ffn-hidden-size", "24", "--iters", "2", "--warmup-iters", "1",
                           "--dispatcher", "alltoall", "--peers", "megatron", "--json", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| megatron | contiguous |" in proc.stdout and "| alltoall |" in proc.stdout, proc.stdout
    return {r["dispatcher"]: r for r in json.loads(out.read_text())}


@needs_megatron
@pytest.mark.parametrize("routing", [
    pytest.param("trace", marks=pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces (beside the repo)")),
    "router"])
def test_bench_shows_megatron_as_a_row_with_our_routing(tmp_path, routing):
    """Through the CLI: with --trace its router is the trace's routing (GivenRouting), without it its own
    TopKRouter with our gate weights; either way it sends one row per (token, expert), exactly the rows
    our baseline alltoall sends (a different routing would move rows between ranks)."""
    k = 6 if routing == "trace" else 2
    extra = (["--trace", str(TRACE), "--layer", "12", "--prompts", "800:999"] if routing == "trace"
             else ["--num-experts", "4", "--top-k", "2"])
    records = _bench(tmp_path, *extra)
    mg, a2a = records["megatron"], records["alltoall"]
    assert mg["measurement"]["tokens"] == 2 * 32 and mg["config"]["peer"]["routes"] == 2 * 32 * k
    assert "differs" not in mg["routing"], mg["routing"]
    for field in ("rows_local", "rows_same_node"):
        assert mg["measurement"]["dispatch"][field] == a2a["measurement"]["dispatch"][field], field
    assert mg["measurement"]["forward"]["median_ms"] > 0 and mg["measurement"]["backward"]["median_ms"] > 0


def test_megatron_peer_in_capacity_mode_is_refused_before_launch(monkeypatch, capsys):
    """The peer runs dropless: beside rows that drop choices it would not compare like with like."""
    monkeypatch.setattr(peers, "megatron_importable", lambda: True)
    assert main(["bench", "--topology", "1x2", "--num-experts", "4", "--top-k", "2", "--capacity-factor", "1.0",
                 "--peers", "megatron"]) == 2
    assert "allowed no peers with routing.capacity_factor" in capsys.readouterr().err


def test_missing_megatron_fails_before_launch_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(peers, "megatron_importable", lambda: False)
    assert main(["bench", "--topology", "1x2", "--peers", "megatron"]) == 2
    err = capsys.readouterr().err
    assert "megatron-core is not importable" in err and "c2r-comm[megatron]" in err

