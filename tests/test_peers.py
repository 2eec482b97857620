"""The DeepSpeed peer (`c2r-comm bench --peers deepspeed`): its layer computes what ours computes for the
same experts and routing (verified on gloo ranks, not assumed), its all2all bytes are what it sends
(padding included), and bad --peers values fail before launch. Tests that run DeepSpeed are skipped where
the optional extra is not installed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from c2r_comm.bench import peers
from c2r_comm.bench.peers import DEEPSPEED_INSTALL, deepspeed_importable
from c2r_comm.cli import main

REPO = Path(__file__).resolve().parents[1]
needs_deepspeed = pytest.mark.skipif(
    not deepspeed_importable(),
    reason=f"deepspeed is not installed (optional extra for bench --peers deepspeed): {DEEPSPEED_INSTALL}")

W, E, D, F, T = 2, 6, 16, 24, 12  # 3 experts per rank


def _config(k, routing=None):
    from c2r_comm.config import config_from_dict
    return config_from_dict({
        "model": {"hidden_size": D, "ffn_hidden_size": F, "num_experts": E, "top_k": k},
        "parallel": {"nodes": 1, "gpus_per_node": W},
        "routing": routing or {"kind": "topk", "renormalize": True, "aux_loss_weight": 0.01},
        "run": {"tokens_per_rank": T, "seed": 5, "warmup_iters": 1, "iters": 2},
    })


def _fixed_routing(rank, k):
    """Trace-like: k distinct experts per token, skewed per rank so expert counts (and padding) differ;
    weights 1/k like the bench's trace rows."""
    g = torch.Generator().manual_seed(40 + rank)
    bias = torch.zeros(E)
    bias[rank] = 2.0  # rank 0 favours expert 0, rank 1 expert 1
    idx = torch.topk(torch.rand(T, E, generator=g) + bias, k, dim=1).indices
    return idx, torch.full(idx.shape, 1.0 / k)


def _run(module_fn, x, grad):
    xr = x.clone().requires_grad_()
    out, aux = module_fn(xr)
    ((out * grad).sum() + aux).backward()
    return out.detach(), aux.detach(), xr.grad


def _errors(ours, peer, out_o, out_d, gx_o, gx_d):
    """Max abs differences: output, input grad, and each local expert's weights and weight grads."""
    err = {"out": float((out_o - out_d).abs().max()), "grad_x": float((gx_o - gx_d).abs().max()),
           "weights": 0.0, "grad_w": 0.0}
    ds = peer.moe.deepspeed_moe.experts.deepspeed_experts
    for j, e in enumerate(ds):
        for mine, theirs in ((ours.experts.w_gate_LDF, e.w_gate_DF), (ours.experts.w_up_LDF, e.w_up_DF),
                             (ours.experts.w_down_LFD, e.w_down_FD)):
            err["weights"] = max(err["weights"], float((mine[j] - theirs).abs().max()))
            err["grad_w"] = max(err["grad_w"], float((mine.grad[j] - theirs.grad).abs().max()))
    return err


def _worker(rank, world):
    import torch.distributed as dist

    from c2r_comm.bench.deepspeed_peer import build_deepspeed_peer
    from c2r_comm.bench.deepspeed_traffic import deepspeed_traffic, sharded_moe_recorder
    from c2r_comm.groups import build_process_groups
    from c2r_comm.layer import build_moe_layer
    from c2r_comm.topology import Topology

    cpu = torch.device("cpu")
    groups = build_process_groups(Topology(1, world), timeout_s=60)
    g = torch.Generator().manual_seed(7 + rank)
    x, grad = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    results = {}
    for k in (1, 2, 3):  # top1gating, top2gating, topkgating
        config = _config(k)
        idx, w = _fixed_routing(rank, k)
        ours = build_moe_layer(config, groups, cpu, dispatcher="dedup")
        out_o, _, gx_o = _run(lambda xr: (lambda o: (o.out_TD, o.aux_loss))(ours.forward_routed(xr, idx, w)), x, grad)
        peer = build_deepspeed_peer(config, groups, cpu, (idx, w))
        rec = sharded_moe_recorder()
        rec.calls = calls = []
        xr = x.clone().requires_grad_()
        out_d, aux_d = peer(xr)
        n_fwd = len(calls)
        ((out_d * grad).sum() + aux_d).backward()
        rec.calls = None
        traffic = deepspeed_traffic(peer, calls[:n_fwd], calls[n_fwd:], T, groups, cpu)
        # Its dropless capacity, independently: the largest count of any expert on any rank.
        cap = torch.bincount(idx.reshape(-1), minlength=E).max().reshape(1)
        dist.all_reduce(cap, op=dist.ReduceOp.MAX)
        results[f"given k={k}"] = dict(
            err=_errors(ours, peer, out_o, out_d.detach(), gx_o, xr.grad), aux=float(aux_d),
            capacity=int(cap), notes=traffic.notes, tokens=traffic.tokens,
            dispatch=traffic.dispatch.as_tuple(), combine=traffic.combine.as_tuple(),
            calls=[(c.op, c.shape) for c in calls])
    for k in (2, 3):  # no routing given: its own gate with our router's gate weights
        # top2gating's l_aux counts first choices only (differs from ours): no aux loss for k = 2
        config = _config(k, {"kind": "topk", "renormalize": True, "aux_loss_weight": 0.01 if k == 3 else 0.0})
        ours = build_moe_layer(config, groups, cpu, dispatcher="alltoall")
        out_o, aux_o, gx_o = _run(lambda xr: (lambda o: (o.out_TD, o.aux_loss))(ours(xr)), x, grad)
        peer = build_deepspeed_peer(config, groups, cpu, None)
        out_d, aux_d, gx_d = _run(peer, x, grad)
        results[f"router k={k}"] = dict(err=_errors(ours, peer, out_o, out_d, gx_o, gx_d),
                                        aux_ours=float(aux_o), aux_ds=float(aux_d))
    bad_idx, bad_w = _fixed_routing(rank, 2)
    if rank == 1:
        bad_idx[3, 1] = bad_idx[3, 0]  # one token names one expert twice: its gate cannot express it
    try:
        build_deepspeed_peer(_config(2), groups, cpu, (bad_idx, bad_w))
        refused = None
    except Exception as exc:  # noqa: BLE001 (the test reads what was raised)
        refused = f"{type(exc).__name__}: {exc}"
    return results, refused


@needs_deepspeed
def test_deepspeed_layer_equals_ours_with_same_experts_and_routing():
    # fresh ranks: DeepSpeed caches its process groups, which a pooled call would destroy afterwards
    by_rank, refused = zip(*run_ranks(W, _worker, timeout_s=120, fresh=True))
    # Bad given routing on rank 1 only: every rank raises before any data collective, naming rank 1.
    assert all(r is not None and r.startswith("InputError") and "ranks [1]" in r for r in refused), refused
    assert "repeats an expert" in refused[1] and "repeats an expert" not in refused[0]
    for rank, results in enumerate(by_rank):
        for case, r in results.items():
            err = r["err"]
            where = f"rank {rank} {case}: {err}"
            assert err["weights"] == 0.0, where  # our expert weights, copied
            assert err["out"] < 1e-5 and err["grad_x"] < 1e-5 and err["grad_w"] < 1e-5, where
        for k in (1, 2, 3):
            r = results[f"given k={k}"]
            C, L = r["capacity"], E // W
            n = r["notes"]
            assert n["capacity_per_expert"] == C and n["routes"] == W * T * k
            assert n["all2all_rows_per_iteration"] == W * E * C  # padding rows counted: they are sent
            assert n["padding_factor"] == pytest.approx(E * C / (T * k))
            assert n["all_reduce_forward_per_rank"] == 1 and n["all_to_all_backward"] == 2
            assert r["tokens"] == W * T and r["aux"] == 0.0
            # The two forward all2alls, as sizes it was given: [E, C, D] each (equal split, L*C rows per rank).
            a2a = [s for op, s in r["calls"] if op == "all_to_all_single"]
            assert a2a[:2] == [(E, C, D), (E, C, D)], r["calls"]
            rows_local, rows_same, rows_cross, b_same, b_cross, m_same, m_cross = r["dispatch"]
            assert (rows_local, rows_same, rows_cross) == (W * L * C, W * (W - 1) * L * C, 0)
            assert (b_same, b_cross, m_same, m_cross) == (rows_same * D * 4, 0, W * (W - 1), 0)
            assert r["combine"] == r["dispatch"]
        # Same router weights, plain top-k: topkgating's l_aux is our load-balancing loss.
        r = results["router k=3"]
        assert r["aux_ds"] == pytest.approx(r["aux_ours"], rel=1e-5)


@needs_deepspeed
def test_bench_shows_deepspeed_as_a_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "c2r_comm", "bench", "--topology", "1x2", "--num-experts", "4",
                           "--top-k", "2", "--tokens-per-rank", "32", "--hidden-size", "16", "--ffn-hidden-size", "24",
                           "--iters", "2", "--warmup-iters", "1", "--dispatcher", "dedup", "--peers", "deepspeed",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| deepspeed | contiguous |" in proc.stdout and "| dedup |" in proc.stdout, proc.stdout
    records = {r["dispatcher"]: r for r in json.loads(out.read_text())}
    ds = records["deepspeed"]
    C = ds["config"]["peer"]["capacity_per_expert"]
    assert ds["measurement"]["tokens"] == 2 * 32 and ds["config"]["peer"]["routes"] == 2 * 32 * 2
    d = ds["measurement"]["dispatch"]
    assert d["rows_local"] + d["rows_same_node"] == 2 * 4 * C and d["bytes_same_node"] == d["rows_same_node"] * 16 * 4
    assert ds["routing"] == records["dedup"]["routing"]  # same gate weights, plain top-k: same routing
    assert ds["measurement"]["forward"]["median_ms"] > 0 and ds["measurement"]["backward"]["median_ms"] > 0


def test_unknown_peer_fails_before_launch(capsys):
    assert main(["bench", "--topology", "1x2", "--peers", "megablocks"]) == 2
    err = capsys.readouterr().err
    assert "--peers" in err and "allowed ['deepspeed', 'megatron']" in err


def test_missing_deepspeed_fails_before_launch_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(peers, "deepspeed_importable", lambda: False)
    assert main(["bench", "--topology", "1x2", "--peers", "deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed is not importable" in err and "DS_BUILD_OPS=0" in err and "c2r-comm[peers]" in err


def test_no_peers_by_default_and_names_deduplicated(monkeypatch):
    assert peers.peer_names(None) == [] and peers.peer_names("") == []
    monkeypatch.setattr(peers, "deepspeed_importable", lambda: True)
    assert peers.peer_names("deepspeed, deepspeed") == ["deepspeed"]
