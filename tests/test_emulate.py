"""`c2r-comm emulate`: bad input refused before anything exists; an emulated run really sends its
cross-node bytes over the namespace links; everything is removed afterwards, also when the command
fails or the launcher is signalled. The emulated runs need root and `ip netns` (skipped otherwise)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import kill_rank_mid_run, processes_with

from c2r_comm.bench import netns
from c2r_comm.cli import main

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"
SMALL = ["--hidden-size", "64", "--ffn-hidden-size", "32", "--tokens-per-rank", "64", "--num-experts", "4",
         "--top-k", "2", "--iters", "2", "--warmup-iters", "1"]


def _can_emulate() -> str:
    try:
        netns.check_available()
    except netns.EmulationUnavailable as exc:
        return str(exc)
    return ""


needs_netns = pytest.mark.skipif(bool(_can_emulate()), reason=f"no emulation here: {_can_emulate()}")


def _emulate(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "c2r_comm", "emulate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)


def _ours() -> set[str]:
    return {ns for ns in netns.list_namespaces() if ns.startswith(netns.PREFIX)}


@pytest.mark.parametrize("flags, words", [
    (["--nodes", "2", "--gpus-per-node", "1", "--inter-node-gbit", "0", "--", "bench"], ["--inter-node-gbit", "> 0"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--inter-node-gbit", "-1", "--", "bench"], ["--inter-node-gbit"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--intra-node-gbit", "inf", "--", "bench"], ["--intra-node-gbit"]),
    (["--nodes", "0", "--gpus-per-node", "1", "--", "bench"], ["--nodes"]),
    (["--nodes", "2", "--gpus-per-node", "2", "--", "bench", "--topology", "1x4"], ["--topology", "2x2"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "plan"], ["command", "bench"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "bench", "--device", "cuda"], ["--device", "'cpu'"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "bench", "--dispatcher", "bogus"], ["--dispatcher", "bogus"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "bench", "--peers", "bogus"], ["--peers", "bogus"]),
    (["--nodes", "2", "--gpus-per-node", "2", "--", "bench", "--topology", "2x1"], ["--topology", "2x2"]),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "bench", "--plan", "/nonexistent/plan.json"], ["plan.json"]),
    pytest.param(["--nodes", "2", "--gpus-per-node", "1", "--", "bench", "--trace", str(TRACE), "--layer", "99"],
                 ["--layer", "99"], marks=pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/traces")),
])
def test_bad_input_refused_before_anything_is_created(flags, words, capsys, no_launch):
    """In process (no_launch: creating a namespace or starting a rank fails the test)."""
    before = _ours()
    assert main(["emulate", *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert _ours() == before


def test_bad_input_refused_by_the_command_itself():
    """The same end to end, once: the installed command's exit status and one-line message."""
    before = _ours()
    proc = _emulate("--nodes", "0", "--gpus-per-node", "1", "--", "bench", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "c2r-comm emulate: error: config field '--nodes' = 0 is invalid: allowed an integer 1..250"], proc.stderr
    assert _ours() == before


def test_tbf_rejects_non_positive_rates():
    with pytest.raises(ValueError, match="> 0"):
        netns.tbf_args(0.0)
    assert netns.tbf_args(0.2)[:3] == ["tbf", "rate", "200.000mbit"]


@needs_netns
def test_cross_node_bytes_cross_the_shaped_link(tmp_path):
    """2 nodes x 2 ranks at 1 Gbit/s: the node links carry at least every accounted cross-node
    byte of every iteration run, and nothing of the emulation is left afterwards."""
    out = tmp_path / "r.json"
    before = _ours()
    proc = _emulate("--nodes", "2", "--gpus-per-node", "2", "--inter-node-gbit", "1", "--", "bench", *SMALL,
                    "--num-experts", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["dispatcher"] for r in records} == {"alltoall", "dedup", "hierarchical"}
    em = records[0]["emulation"]
    assert em["inter_node_gbit"] == 1.0 and em["nodes"] == 2
    iterations = 3  # 1 warm-up + 2 timed, forward (accounted) + backward (not) each
    accounted = sum(r["measurement"]["dispatch"]["bytes_cross_node"] + r["measurement"]["combine"]["bytes_cross_node"]
                    for r in records) * iterations
    assert accounted > 0
    wire = sum(n["from_node"] for n in em["run_wire_bytes_per_node"])
    assert wire >= accounted, (wire, accounted)
    for r in records:  # the bench's own reading of its node links, timed iterations only
        m = r["measurement"]
        fwd = m["dispatch"]["bytes_cross_node"] + m["combine"]["bytes_cross_node"]
        assert fwd <= m["wire_bytes_sent"] <= 3 * fwd + 2e6, (r["dispatcher"], m["wire_bytes_sent"], fwd)
        assert m["wire_bytes_received"] >= fwd
    assert "MB sent by node" in proc.stdout
    assert _ours() == before


@needs_netns
def test_one_failing_rank_stops_the_others_and_leaves_nothing_behind():
    """Rank 1 of 4 dies (SIGKILL) mid-run: the launcher reports it (exit 128 + 9), stops the three
    others and removes the namespaces."""
    marker = f"--seed={os.getpid() % 100000 + 17}"
    before = _ours()
    proc = subprocess.Popen([sys.executable, "-m", "c2r_comm", "emulate", "--nodes", "2", "--gpus-per-node", "2",
                             "--", "bench", *SMALL, "--num-experts", "8", "--iters", "100000", marker], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = kill_rank_mid_run(proc, marker, rank=1)
    assert proc.returncode == 128 + 9, err[-2000:]
    assert "the run failed first on rank 1 (exit status 137)" in err
    assert "c2r-comm: rank 1 was killed by SIGKILL" in err
    # the survivors name the dead peer (their CommError lines, comm_failures.py)
    assert re.search(r"c2r-comm bench: rank \d: .*peer 1 reported nothing: its process \(pid \d+\) has exited", err), \
        err[-3000:]
    time.sleep(0.5)
    assert processes_with(marker) == []
    assert _ours() == before


@needs_netns
def test_shaped_link_bounds_the_exchange_time(tmp_path):
    """At 0.05 Gbit/s a forward pass cannot move its accounted cross-node bytes faster than the two
    node links carry them (a lower bound: it can only fail if the shaping does nothing)."""
    out = tmp_path / "r.json"
    rate_bytes_s = 0.05e9 / 8
    proc = _emulate("--nodes", "2", "--gpus-per-node", "1", "--inter-node-gbit", "0.05", "--", "bench",
                    "--hidden-size", "1024", "--ffn-hidden-size", "32", "--tokens-per-rank", "256", "--num-experts", "4",
                    "--top-k", "2", "--iters", "2", "--warmup-iters", "1", "--dispatcher", "dedup", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(out.read_text())[0]["measurement"]
    fwd_bytes = m["dispatch"]["bytes_cross_node"] + m["combine"]["bytes_cross_node"]
    assert fwd_bytes > 1e6
    assert m["forward"]["median_ms"] / 1e3 >= 0.8 * fwd_bytes / (2 * rate_bytes_s)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_stops_ranks_and_removes_namespaces(sig):
    marker = f"--seed={os.getpid() % 100000 + int(sig)}"
    before = _ours()
    proc = subprocess.Popen([sys.executable, "-m", "c2r_comm", "emulate", "--nodes", "2", "--gpus-per-node", "1",
                             "--", "bench", *SMALL, "--iters", "100000", marker], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(processes_with(marker)) < 3 and time.monotonic() < deadline:  # launcher + 2 ranks
            time.sleep(0.5)
        assert len(processes_with(marker)) >= 3, "ranks never started"
        time.sleep(3)
        proc.send_signal(sig)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + int(sig), proc.stderr.read()[-2000:]
    time.sleep(0.5)
    assert processes_with(marker) == []
    assert _ours() == before


@needs_netns
def test_sigkilled_launcher_ranks_die_and_next_run_removes_its_namespaces():
    marker = f"--seed={os.getpid() % 100000 + 40}"
    proc = subprocess.Popen([sys.executable, "-m", "c2r_comm", "emulate", "--nodes", "2", "--gpus-per-node", "1",
                             "--", "bench", *SMALL, "--iters", "100000", marker], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(processes_with(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    assert processes_with(marker) == []  # parent-death signal
    left = {ns for ns in _ours() if ns.startswith(f"{netns.PREFIX}{proc.pid}-")}
    assert left  # a SIGKILLed process cannot clean up ...
    assert set(netns.remove_stale()) >= left  # ... the next run does
    assert not {ns for ns in _ours() if ns.startswith(f"{netns.PREFIX}{proc.pid}-")}
