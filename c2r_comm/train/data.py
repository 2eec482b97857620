"""Byte-level language-model data for the training demo: text files as uint8 tokens (vocabulary 256).

Each file's first `1 - holdout` is training text and its last `holdout` is held out for validation,
so every file contributes to both and no window crosses the split. Batches are random windows drawn
from a generator seeded by (seed, step, rank): every rank reads its own tokens, and a run resumed
from a checkpoint at step s draws exactly what the uninterrupted run drew from step s on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # batch() imports it: a launcher checks the text without importing torch
    import torch

VOCAB = 256


def text_files(path: str | Path) -> list[Path]:
    """The text file itself, or every *.txt in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if files:
            return files
        raise ValueError(f"--text {path}: the folder holds no *.txt file")
    raise ValueError(f"--text {path}: no such file or folder (allowed a text file or a folder of *.txt)")


@dataclass(frozen=True)
class ByteCorpus:
    train: tuple[np.ndarray, ...]  # uint8 per file
    valid: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    @staticmethod
    def load(path: str | Path, seq_len: int, holdout: float = 0.1) -> "ByteCorpus":
        if not 0 < holdout < 1:
            raise ValueError(f"holdout {holdout}: allowed a fraction in (0, 1)")
        train, valid, names = [], [], []
        for f in text_files(path):
            data = np.frombuffer(f.read_bytes(), dtype=np.uint8)
            cut = int(len(data) * (1 - holdout))
            if cut <= seq_len + 1 or len(data) - cut <= seq_len + 1:
                continue  # too short for a window on both sides of the split
            train.append(data[:cut])
            valid.append(data[cut:])
            names.append(f.name)
        if not train:
            raise ValueError(f"--text {path}: no file is long enough for windows of {seq_len + 1} bytes on both "
                             f"sides of the {holdout:.0%} hold-out")
        return ByteCorpus(tuple(train), tuple(valid), tuple(names))

    @property
    def train_bytes(self) -> int:
        return sum(len(t) for t in self.train)

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int, step: int,
              rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [batch, seq_len]: random windows, files weighted by length."""
        if split not in ("train", "valid"):
            raise ValueError(f"split {split!r}: allowed 'train' or 'valid'")
        parts: Sequence[np.ndarray] = self.train if split == "train" else self.valid
        rng = np.random.default_rng([seed, step, rank, 0 if split == "train" else 1])
        sizes = np.array([len(p) - seq_len - 1 for p in parts], dtype=np.float64)
        which = rng.choice(len(parts), size=batch_size, p=sizes / sizes.sum())
        starts = [rng.integers(0, len(parts[f]) - seq_len - 1) for f in which]
        windows = np.stack([parts[f][s:s + seq_len + 1] for f, s in zip(which, starts)]).astype(np.int64)
        import torch
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
