"""A minimal progress bar on stderr (no dependency); silent when disabled (e.g. non-zero ranks)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class ProgressBar:
    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 24):
        self.label, self.total, self.enabled, self.width = label, total, enabled, width
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(self.total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                         f"{time.perf_counter() - self.start:.1f}s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def progress(items: Iterable[T], total: int, label: str, enabled: bool = True) -> Iterator[T]:
    bar = ProgressBar(label, total, enabled)
    for i, item in enumerate(items):
        bar.update(i)
        yield item
    bar.update(total)
