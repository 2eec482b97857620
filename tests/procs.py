"""Find this test's processes by a marker in their command line, read their environment (/proc),
and read a child's output while it runs."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def processes_with(marker: str) -> list[int]:
    """Pids of every process whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def environment_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


class StreamReader:
    """Collect a child's pipe (e.g. stderr) as it comes, in chunks: a progress bar redraws with \\r
    and never ends a line, so readline() would wait for it."""

    def __init__(self, pipe):
        self.chunks: list[str] = []
        self._thread = threading.Thread(target=lambda: self.chunks.extend(
            c.decode(errors="replace") for c in iter(lambda: os.read(pipe.fileno(), 4096), b"")), daemon=True)
        self._thread.start()

    def wait_for_progress(self, timeout_s: float) -> bool:
        """Until a tqdm rate (rank 0 in the timed loop) shows up; False after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any("it/s" in c or "s/it" in c for c in self.chunks):
                return True
            time.sleep(0.2)
        return False

    def text(self, join_timeout_s: float = 10) -> str:
        """Everything read (waits for the pipe to close, at most join_timeout_s)."""
        self._thread.join(timeout=join_timeout_s)
        return "".join(self.chunks)


def kill_rank_mid_run(launcher, marker: str, rank: int, timeout_s: float = 120) -> str:
    """SIGKILL rank `rank` of a run started with stderr=PIPE once rank 0's progress bar shows (every
    rank in the timed loop); wait for the launcher; return its stderr. The launcher is killed if it
    outlives this."""
    stderr = StreamReader(launcher.stderr)
    try:
        stderr.wait_for_progress(timeout_s)
        pids = [p for p in processes_with(marker) if p != launcher.pid and environment_of(p).get("RANK") == str(rank)]
        assert pids, f"rank {rank} never reached the timed loop:\n" + "".join(stderr.chunks)
        os.kill(pids[0], signal.SIGKILL)
        launcher.wait(timeout=60)
        return stderr.text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
