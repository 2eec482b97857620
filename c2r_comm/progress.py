"""A minimal progress bar on stderr (no dependency); silent when disabled (e.g. non-zero ranks)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str, enabled: bool = True, width: int = 24) -> Iterator[T]:
    start = time.perf_counter()
    stream = sys.stderr
    for i, item in enumerate(items):
        if enabled:
            done = int(width * i / max(total, 1))
            stream.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{total}")
            stream.flush()
        yield item
    if enabled:
        stream.write(f"\r{label} [{'#' * width}] {total}/{total} {time.perf_counter() - start:.1f}s\n")
        stream.flush()
