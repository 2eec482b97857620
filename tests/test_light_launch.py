"""The launching side of `c2r-comm bench`, `train-demo` and `emulate` checks its arguments and starts
the ranks without importing torch (about 3 s on a small machine): the ranks import theirs while
the launcher's own import (for the rendezvous store) runs beside them, not before them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "traces" / "deepseek_v2_lite_prefill_dev.npz"

# Runs in a fresh interpreter: each command up to the moment its first rank would start, where it
# records whether torch was imported by then, and starts nothing (bench and train-demo through the
# real run_local_ranks; emulate through its loopback fallback).
PROBE = """
import json, sys
from c2r_comm.bench import netns, rank_launcher
from c2r_comm.cli import emulate_cmd, main
seen = {}

class Started(Exception):
    pass

def at_start(*args, **kwargs):
    seen[current] = "torch" in sys.modules
    raise Started

def no_netns():
    raise netns.EmulationUnavailable("probe")

def plain_run(inner):
    seen[current] = "torch" in sys.modules
    return 0

rank_launcher._start = at_start
netns.check_available = no_netns
emulate_cmd._plain_run = plain_run
for current, args in json.loads(sys.argv[1]).items():
    try:
        main(args)
    except Started:
        pass
print(json.dumps(seen))
"""
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
                      "SLURM_PROCID")


def test_launchers_start_ranks_before_importing_torch(tmp_path):
    plan = tmp_path / "plan.json"
    from c2r_comm.plan import PlacementPlan, PlanFile
    from c2r_comm.topology import Topology
    PlanFile(Topology(1, 2), 4, {0: PlacementPlan((1, 0, 1, 0), 2), 1: PlacementPlan((0, 1, 1, 0), 2)},
             "test").save(plan)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    small = ["--num-experts", "4", "--top-k", "2"]
    argv = {"bench": ["bench", "--topology", "1x2", *small, "--plan", str(plan), "--json", str(tmp_path / "o.json")],
            "train-demo": ["train-demo", "--topology", "1x2", *small, "--text", str(text), "--plan", str(plan),
                           "--seq-len", "16"],
            "emulate": ["emulate", "--nodes", "2", "--gpus-per-node", "1", "--", "bench", *small]}
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}  # this process is no rank
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"bench": False, "train-demo": False, "emulate": False}, seen


def test_the_launcher_hosts_the_store_on_the_port_it_handed_out(tmp_path):
    """Ranks started before the store exists still meet there: a world of 2 through the real launch."""
    code = ("import sys; from c2r_comm.bench.rank_launcher import run_local_ranks; "
            "sys.exit(run_local_ranks([sys.executable, '-c', sys.argv[1]], 2))")
    rank = ("import os, torch.distributed as dist; "
            "dist.init_process_group('gloo'); "
            "t = __import__('torch').tensor([dist.get_rank() + 1.0]); dist.all_reduce(t); "
            "open(os.path.join(%r, 'rank' + os.environ['RANK']), 'w').write(str(float(t))); "
            "dist.destroy_process_group()" % str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code, rank], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["3.0", "3.0"]
