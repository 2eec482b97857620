"""One rank of a fault-injection run (tests/test_faults.py); started by torchrun or by the product's
own local launcher (rank_launcher.run_local_ranks), never imported by pytest.

Every rank runs a few forward + backward steps of a small MoE layer. On the victim rank, the
chosen exchange (phase dispatch|combine, direction forward|backward) of step 1 is replaced by the
fault before it posts anything: SIGKILL to itself, or a sleep past the process groups' timeout.
A surviving rank that gets a CommError writes it to MARKER.rank<r>.json and exits with
EXIT_COMM_ERROR; any other outcome is reported as such, so the test sees what happened.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

from c2r_comm.bootstrap import init_distributed, report_to_launcher, shutdown
from c2r_comm.comm_failures import EXIT_COMM_ERROR, CommError
from c2r_comm.config import Config, with_overrides
from c2r_comm.dispatch.transport import Exchange
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import build_moe_layer
from c2r_comm.topology import Topology

STEPS, FAULT_STEP = 3, 1


def _arm(rank: int, args: argparse.Namespace, step: list[int]) -> None:
    """Make the victim's chosen exchange of step FAULT_STEP fail (test-side patch of Exchange.start)."""
    original = Exchange.start

    def start(self, send, recv):
        site = self.failure_site()  # what a failure here would name: phase, direction, stage
        if rank == args.victim and step[0] == FAULT_STEP and site.phase == args.phase \
                and site.direction == args.direction and (args.stage is None or site.stage == args.stage):
            if args.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(args.stall_s)
        return original(self, send, recv)

    Exchange.start = start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=["kill", "stall"], required=True)
    p.add_argument("--victim", type=int, required=True)
    p.add_argument("--phase", choices=["dispatch", "combine"], required=True)
    p.add_argument("--direction", choices=["forward", "backward"], required=True)
    p.add_argument("--stage", default=None, help="only this stage's exchange (e.g. cross-node)")
    p.add_argument("--dispatcher", default="dedup")
    p.add_argument("--topology", default="1x4")
    p.add_argument("--overlap-degree", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--stall-s", type=float, default=60.0)
    p.add_argument("--marker", required=True,
                   help="path prefix: each rank writes MARKER.rank<r>.json (the test also finds the run's processes by it)")
    args = p.parse_args()
    nodes, gpus = (int(v) for v in args.topology.split("x"))
    torch.set_num_threads(1)
    ctx = init_distributed(args.timeout_s, "cpu")
    step = [0]
    _arm(ctx.rank, args, step)
    config = with_overrides(Config(), {"parallel.nodes": nodes, "parallel.gpus_per_node": gpus,
                                       "model.hidden_size": 16, "model.ffn_hidden_size": 16, "model.num_experts": 8,
                                       "model.top_k": 2, "run.timeout_s": args.timeout_s,
                                       "schedule.overlap_degree": args.overlap_degree})
    started = time.monotonic()
    try:
        groups = build_process_groups(Topology(nodes, gpus), args.timeout_s)
        layer = build_moe_layer(config, groups, torch.device("cpu"), dispatcher=args.dispatcher)
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(ctx.rank), requires_grad=True)
        for step[0] in range(STEPS):
            started = time.monotonic()
            layer(x).out_TD.sum().backward()
    except CommError as exc:
        _report(args.marker, ctx.rank, {"rank": ctx.rank, "error": str(exc), "after_s": time.monotonic() - started})
        report_to_launcher(exc)
        return EXIT_COMM_ERROR
    finally:
        shutdown()
    _report(args.marker, ctx.rank, {"rank": ctx.rank, "error": None})
    return 0


def _report(marker: str, rank: int, record: dict) -> None:
    with open(f"{marker}.rank{rank}.json", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.exit(main())
