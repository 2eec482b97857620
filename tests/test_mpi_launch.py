"""`c2r-comm bench` under a real `mpiexec -n 2` (the mpi extra: mpi4py + the mpich wheel): ranks meet
through mpi4py with no MASTER_ADDR/PORT, and every count equals the torchrun launch's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
if not MPIEXEC.exists() and shutil.which("mpiexec"):
    MPIEXEC = Path(shutil.which("mpiexec"))

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="needs mpiexec: bash launch/setup_env.sh mpi")

ARGS = ["bench", "--config", str(REPO / "configs" / "cpu_demo.yaml"), "--topology", "2x1", "--iters", "2",
        "--warmup-iters", "1", "--tokens-per-rank", "48", "--hidden-size", "32", "--ffn-hidden-size", "48"]


def _records(path: Path) -> dict:
    return {r["dispatcher"]: (r["measurement"]["tokens"], r["measurement"]["dispatch"], r["measurement"]["combine"])
            for r in json.loads(path.read_text())}


def test_mpiexec_launch_counts_equal_torchrun_launch(tmp_path):
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    mpi_json, torchrun_json = tmp_path / "mpi.json", tmp_path / "torchrun.json"
    mpi = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "c2r_comm", *ARGS, "--json", str(mpi_json)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert mpi.returncode == 0, mpi.stdout + mpi.stderr
    assert "gloo on cpu" in mpi.stdout and mpi.stdout.count("c2r-comm bench: topology 2x1") == 1  # rank 0 prints
    plain = subprocess.run([sys.executable, "-m", "c2r_comm", *ARGS, "--json", str(torchrun_json)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=240)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    got, want = _records(mpi_json), _records(torchrun_json)
    assert set(got) == {"alltoall", "dedup", "hierarchical"} and got == want
