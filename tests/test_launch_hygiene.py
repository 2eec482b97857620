"""bench's own launch leaves nothing running: SIGTERM, SIGINT or SIGKILL to the `c2r-comm bench`
process ends every rank within seconds (issue 14, defect 1)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import processes_with

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses prctl")


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_bench_leaves_no_process(tmp_path, signum):
    marker = str(tmp_path / f"hygiene-{signum.name}.json")  # in the argv of the launcher and every rank
    cmd = [sys.executable, "-m", "c2r_comm", "bench", "--config", str(REPO / "configs" / "cpu_demo.yaml"),
           "--topology", "1x2", "--iters", "100000", "--warmup-iters", "0", "--tokens-per-rank", "16",
           "--hidden-size", "16", "--ffn-hidden-size", "16", "--dispatcher", "dedup", "--json", marker]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # the launcher and its 2 ranks are up
        assert _wait_for(lambda: len(processes_with(marker)) >= 3, 120), processes_with(marker)
        time.sleep(2)  # ranks inside the timed loop
        launcher.send_signal(signum)
        launcher.wait(timeout=30)
        assert _wait_for(lambda: not processes_with(marker), 15), f"left running: {processes_with(marker)}"
        if signum != signal.SIGKILL:
            assert launcher.returncode == 128 + signum
    finally:
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
