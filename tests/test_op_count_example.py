"""examples/dispatch_op_count.py: counts the operators of every phase of every dispatcher."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_op_count_example_reports_every_phase_of_every_dispatcher():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "dispatch_op_count.py"), "--tokens", "8",
                           "--hidden", "16", "--experts", "8", "--top-k", "2", "--iters", "3"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")
            and not line.startswith("| dispatcher")}
    assert set(rows) == {"alltoall", "dedup", "hierarchical"}, done.stdout
    for name, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        counts = [int(re.match(r"(\d+) \(", c).group(1)) for c in cells]
        assert len(counts) == 6 and all(n > 0 for n in counts[:5]) and counts[5] == sum(counts[:5]), (name, cells)
