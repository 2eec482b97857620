"""A private one-node Slurm cluster for the srun launch test: munged, slurmctld and slurmd on free
ports, every file under one directory, all stopped when the context exits (also on failure).

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (.ci/run installs them
when it may); `missing()` says what is absent so the test can skip with the reason.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

BINARIES = ("srun", "sinfo", "slurmctld", "slurmd", "munged")


def missing() -> Optional[str]:
    """Why a local cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs the tasks)"
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    return f"needs Slurm and munge ({', '.join(absent)} missing: apt-get install slurmctld slurmd slurm-client munge)" \
        if absent else None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextmanager
def local_slurm(workdir: Path, cpus: int = 2, start_timeout_s: float = 30.0) -> Iterator[dict]:
    """Yields the environment srun needs (SLURM_CONF) for a cluster of this host alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(exist_ok=True)
    key = workdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = workdir / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = workdir / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=c2rtest", f"SlurmctldHost={host}", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={workdir / 'state'}", f"SlurmdSpoolDir={workdir / 'spool'}",
        f"SlurmctldPidFile={workdir / 'slurmctld.pid'}", f"SlurmdPidFile={workdir / 'slurmd.pid'}",
        f"SlurmctldLogFile={workdir / 'slurmctld.log'}", f"SlurmdLogFile={workdir / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "MpiDefault=pmi2", "ReturnToService=2", "SchedulerType=sched/builtin",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids = [workdir / "slurmd.pid", workdir / "slurmctld.pid", workdir / "munged.pid"]
    try:
        subprocess.run([_which("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={workdir / 'munged.pid'}", f"--log-file={workdir / 'munged.log'}",
                        f"--seed-file={workdir / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon), "-f", str(conf)], check=True, capture_output=True, env=env, timeout=30)
        deadline = time.monotonic() + start_timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run([_which("sinfo"), "-h", "-o", "%t"], capture_output=True, text=True,
                                   env=env, timeout=10).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "".join(p.read_text()[-1500:] for p in (workdir / "slurmctld.log", workdir / "slurmd.log")
                           if p.exists())
            raise RuntimeError(f"local Slurm did not come up (node state {state!r}):\n{logs}")
        yield env
    finally:
        for pid_file in pids:
            _stop(pid_file)
