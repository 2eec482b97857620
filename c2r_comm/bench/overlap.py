"""`c2r-comm bench --overlap-degree C|auto`: how much of the smaller of exchange and experts the
pipelined layer hides, measured in one run.

Per dispatcher, on the same tokens and routing:
  exchange  the exchange phases timed alone (layout, count exchange, send, combine; and in backward
            the combine's and the dispatch's reverse exchanges): `bench --phases`, summed
  experts   the experts' forward + backward timed alone (same run of phases)
  serial    the layer's fwd+bwd with schedule.overlap_degree 1
  overlapped  the same with C chunks (auto: decided on the first warm-up forward)
  efficiency  (serial - overlapped) / min(exchange, experts): 1 = the smaller side fully hidden;
            n/a (JSON null) at C = 1, where the overlapped layer is the serial one timed again
  peak MB   of the serial and the overlapped layer's timed steps, measured apart, the serial layer
            deleted first (CUDA: tensors allocated; CPU: the process's peak RSS, which can carry
            memory the allocator kept from the serial run), so a user sees what the chunks cost
The target of the overlap issue: overlapped <= 1.15 x max(exchange, experts) and serial /
overlapped >= 1.25.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from c2r_comm.bench.measure import Measurement
from c2r_comm.bench.phases import BACKWARD_PHASES, FORWARD_PHASES, PhaseTimes
from c2r_comm.config import OVERLAP_AUTO

EXCHANGE_FORWARD = tuple(p for p in FORWARD_PHASES if p not in ("router", "experts"))
EXCHANGE_BACKWARD = tuple(p for p in BACKWARD_PHASES if p != "experts")


@dataclass(frozen=True)
class OverlapResult:
    degree: int  # the chunks the overlapped layer ran with (auto: what it picked)
    requested: Union[int, str]
    exchange_ms: float
    experts_ms: float
    serial_ms: float
    overlapped_ms: float
    # forward and backward medians of each, to see which half the pipeline shortened
    serial_fwd_bwd_ms: tuple[float, float] = (0.0, 0.0)
    overlapped_fwd_bwd_ms: tuple[float, float] = (0.0, 0.0)
    serial_peak_mb: float = 0.0
    overlapped_peak_mb: float = 0.0

    @classmethod
    def of(cls, phases: PhaseTimes, serial: Measurement, overlapped: Measurement, degree: int,
           requested: Union[int, str]) -> "OverlapResult":
        exchange = sum(phases.forward[p].median_ms for p in EXCHANGE_FORWARD) + \
            sum(phases.backward[p].median_ms for p in EXCHANGE_BACKWARD)
        experts = phases.forward["experts"].median_ms + phases.backward["experts"].median_ms
        return cls(degree, requested, exchange, experts, serial.total.median_ms, overlapped.total.median_ms,
                   (serial.forward.median_ms, serial.backward.median_ms),
                   (overlapped.forward.median_ms, overlapped.backward.median_ms),
                   serial.peak_memory_mb, overlapped.peak_memory_mb)

    @property
    def efficiency(self) -> Optional[float]:
        """None at C = 1 (auto may pick it): nothing overlaps, the two timings are the serial layer twice."""
        smaller = min(self.exchange_ms, self.experts_ms)
        if self.degree == 1:
            return None
        return (self.serial_ms - self.overlapped_ms) / smaller if smaller > 0 else 0.0

    @property
    def speedup(self) -> float:
        return self.serial_ms / self.overlapped_ms if self.overlapped_ms > 0 else 0.0

    @property
    def vs_max(self) -> float:
        """overlapped / max(exchange, experts): 1.0 is a perfect pipeline."""
        bigger = max(self.exchange_ms, self.experts_ms)
        return self.overlapped_ms / bigger if bigger > 0 else 0.0


def format_overlap(rows: list[tuple[str, OverlapResult]]) -> str:
    out = ["overlap (ms, fwd+bwd medians; exchange and experts each timed alone in the same run):",
           "| dispatcher | C | exchange | experts | serial (fwd+bwd) | overlapped (fwd+bwd) | serial/overlapped "
           "| overlapped/max | efficiency | peak MB serial / overlapped |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        c = f"{r.degree} (auto)" if r.requested == OVERLAP_AUTO else str(r.degree)
        out.append(f"| {name} | {c} | {r.exchange_ms:.1f} | {r.experts_ms:.1f} | {r.serial_ms:.1f} "
                   f"({r.serial_fwd_bwd_ms[0]:.1f}+{r.serial_fwd_bwd_ms[1]:.1f}) | {r.overlapped_ms:.1f} "
                   f"({r.overlapped_fwd_bwd_ms[0]:.1f}+{r.overlapped_fwd_bwd_ms[1]:.1f}) | {r.speedup:.2f} "
                   f"| {r.vs_max:.2f} "
                   f"| {'n/a (C = 1)' if r.efficiency is None else f'{r.efficiency:.2f}'} "
                   f"| {r.serial_peak_mb:.1f} / {r.overlapped_peak_mb:.1f} |")
    return "\n".join(out)
