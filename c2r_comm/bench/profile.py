"""`c2r-comm bench --profile DIR`: a torch.profiler trace of a few forward + backward steps.

Per dispatcher and rank it writes `DIR/<dispatcher>_rank<r>.txt` (operators sorted by their own
device time on CUDA, CPU time elsewhere: where a step's time goes, kernel by kernel) and
`DIR/<dispatcher>_rank<r>.json` (a Chrome / Perfetto trace: what overlaps and what waits).
Runs after the timed iterations, so profiling overhead never enters the reported times.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from c2r_comm.bench.timing import sync
from c2r_comm.layer import MoELayer


def profile_layer(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor,
                  routing: Optional[tuple[torch.Tensor, torch.Tensor]], steps: int, out_dir: str | Path,
                  name: str, rank: int, row_limit: int = 40) -> Path:
    """Profile `steps` forward + backward steps (after one untimed step); returns the table's path."""
    device = x_TD.device
    cuda = device.type == "cuda"

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x = x_TD.detach().requires_grad_()
        out = layer(x) if routing is None else layer.forward_routed(x, *routing)
        ((out.out_TD * grad_TD).sum() + out.aux_loss).backward()

    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    path = out / f"{name}_rank{rank}.txt"
    path.write_text(f"{name}, rank {rank}, {steps} forward+backward steps on {device}, sorted by {sort_by}\n{table}\n")
    prof.export_chrome_trace(str(out / f"{name}_rank{rank}.json"))
    return path
