"""Packed rows: a token row, its routing weights and its slot ids travel as one message per peer.

A `RowFormat` lays named fields side by side in one uint8 row, largest item size first so every
field sits at an offset its dtype can be viewed at; the row is padded to the largest item size.
Views of a packed buffer are zero-copy (`Tensor.view(dtype)` + a column slice), so packing is
one gather per field straight into the send buffer and unpacking costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import torch


VECTOR_ALIGN = 16  # bytes: the widest vector load/store GPU copy kernels use


@dataclass(frozen=True)
class RowFormat:
    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    widths: tuple[int, ...]  # elements per row
    offsets: tuple[int, ...]  # byte offset of each field
    row_bytes: int

    @classmethod
    def of(cls, **fields: tuple[torch.dtype, int]) -> "RowFormat":
        """RowFormat.of(x=(torch.bfloat16, D), w=(torch.float32, K), slot=(torch.int16, K)).

        Fields of 16 bytes or more start at 16-byte offsets and such rows are padded to 16 bytes,
        so each row of a wide field is 16-byte aligned: GPU copies and gathers of the token field
        then run vectorised (unaligned 4,132-byte rows gathered 2.7x slower on an H200).
        Formats are made once per distinct field list (every dispatch asks for the same few)."""
        return cls._format_of(tuple(fields.items()))

    @classmethod
    @lru_cache(maxsize=256)
    def _format_of(cls, field_items: tuple[tuple[str, tuple[torch.dtype, int]], ...]) -> "RowFormat":
        fields = dict(field_items)
        order = sorted(fields, key=lambda n: -fields[n][0].itemsize)  # stable: ties keep call order
        offsets, at, align = [], 0, 1
        for n in order:
            size = fields[n][0].itemsize * fields[n][1]
            field_align = VECTOR_ALIGN if size >= VECTOR_ALIGN else fields[n][0].itemsize
            at = -(-at // field_align) * field_align
            offsets.append(at)
            at += size
            align = max(align, field_align)
        row_bytes = -(-at // align) * align
        return cls(tuple(order), tuple(fields[n][0] for n in order), tuple(fields[n][1] for n in order),
                   tuple(offsets), row_bytes)

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=device)

    def view(self, buf_RB: torch.Tensor, name: str) -> torch.Tensor:
        """[rows, width] view of field `name` inside a packed uint8 buffer (no copy)."""
        i = self.names.index(name)
        dtype, width, size = self.dtypes[i], self.widths[i], self.dtypes[i].itemsize
        start = self.offsets[i] // size
        return buf_RB.view(dtype)[:, start:start + width]

    def views(self, buf_RB: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.view(buf_RB, n) for n in self.names}

    def pack(self, rows: int, device: torch.device,
             sources: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """A new buffer of `rows` rows. A field given as (src, index) holds src.index_select(0, index),
        gathered straight into place (no intermediate copy); one given as a tensor is copied in."""
        return self.pack_into(self.empty(rows, device), sources)

    def pack_into(self, buf: torch.Tensor, sources: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """pack() into an existing [rows, row_bytes] uint8 buffer (or a narrow of one)."""
        with torch.no_grad():
            for name, src in sources.items():
                if isinstance(src, tuple):
                    torch.index_select(src[0].detach(), 0, src[1], out=self.view(buf, name))
                else:
                    self.view(buf, name).copy_(src)
        return buf

    def pack_rows(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A new buffer from whole [rows, width] tensors (gradients on their way back)."""
        rows = next(iter(tensors.values())).shape[0]
        buf = self.empty(rows, next(iter(tensors.values())).device)
        with torch.no_grad():
            for name, t in tensors.items():
                self.view(buf, name).copy_(t)
        return buf
