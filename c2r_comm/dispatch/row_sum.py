"""Sums of rows by destination: out[i] = sum of src[j] over every j with index[j] == i.

Dispatch and combine reduce rows in four places: expert outputs into one partial per received row
(combine), expert-input gradients into one per received row (dispatch backward), returned rows
into their tokens (combine's last step and dispatch backward's scatter). `index_add_` does it with
one atomic add per element, which on a GPU is several times slower than moving the bytes (bf16,
16,384 x 6 rows of 2,048 on an H200: 1.68 ms against 0.29 ms for the same sum as a sparse x dense
product; docs/benchmarks.md). A `RowSum` holds the sum's structure, built once per dispatch
without a host sync, and runs it as a CSR sparse x dense product where the device has one (CUDA),
else as `index_add_` (CPU, where it is fast and needs no structure). The CSR's column order is
the source rows sorted by destination, ascending within each (cuSPARSE's CSR rule): a caller that
knows each destination's sources passes that order (`sources_by_destination`: one small sort per
destination), else `RowSum.build` sorts all sources once (stable, so ascending within each).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

CSR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def csr_sum_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether row sums run as CSR x dense products: on CUDA (cuSPARSE SpMM), for float dtypes.
    Elsewhere index_add_ is as fast and needs no structure."""
    return torch.device(device).type == "cuda" and dtype in CSR_DTYPES


def sources_by_destination(source_DK: torch.Tensor, valid_DK: torch.Tensor, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR order of a sum whose destination d gathers the sources source_DK[d, k] where valid_DK:
    (the sources in destination order, ascending within each destination; sources per destination).

    One small sort per destination row (k entries: a batched sort, no global sort of the sources)
    makes the column indices ascending within each row, as cuSPARSE requires of CSR. No host sync:
    `num_sources` is a host bound (at least the number of valid entries: from the count exchange, or
    the padded T*K of a layout); the valid entries fill the first places of the result.
    """
    big = torch.iinfo(torch.int64).max
    ordered_DK = torch.sort(torch.where(valid_DK, source_DK, big), dim=1).values  # valid first, ascending
    keep = (ordered_DK != big).reshape(-1)
    place = torch.where(keep, torch.cumsum(keep, 0) - 1, num_sources)  # num_sources: a dump slot
    by_dest = torch.zeros(num_sources + 1, dtype=torch.int64, device=source_DK.device).scatter_(
        0, place, torch.where(keep, ordered_DK.reshape(-1), 0))[:num_sources]
    return by_dest, valid_DK.sum(1)


@dataclass(frozen=True)
class RowSum:
    """The structure of one row sum: num_out destinations, one per source row (index_S)."""

    index_S: torch.Tensor  # int64 [S]: destination of each source row
    num_out: int
    crow_N1: Optional[torch.Tensor] = None  # int64 [num_out + 1]: CSR row offsets (None: index_add_)
    col_S: Optional[torch.Tensor] = None  # int64 [S]: source rows sorted by destination (stable)

    @classmethod
    def build(cls, index_S: torch.Tensor, num_out: int, dtype: torch.dtype, by_dest_S: Optional[torch.Tensor] = None,
              per_dest_N: Optional[torch.Tensor] = None, use_csr: Optional[bool] = None) -> "RowSum":
        """index_S: destinations. by_dest_S / per_dest_N: the source rows in destination order and
        the rows per destination, when the caller has them (else one sort and one count here).
        by_dest_S must list each destination's sources in ascending order (CSR column order).
        use_csr: None picks by device and dtype (csr_sum_available); True forces it (tests)."""
        index_S = index_S.long()
        if use_csr is None:
            use_csr = csr_sum_available(index_S.device, dtype)
        if not use_csr or index_S.numel() == 0 or num_out == 0:
            return cls(index_S, num_out)
        if by_dest_S is None:
            by_dest_S = torch.sort(index_S, stable=True).indices
        if per_dest_N is None:
            per_dest_N = torch.zeros(num_out, dtype=torch.int64, device=index_S.device).index_add_(
                0, index_S, torch.ones_like(index_S))
        crow = torch.zeros(num_out + 1, dtype=torch.int64, device=index_S.device)
        torch.cumsum(per_dest_N, 0, out=crow[1:])
        return cls(index_S, num_out, crow, by_dest_S.long())

    @property
    def uses_csr(self) -> bool:
        return self.crow_N1 is not None

    def sum(self, src_SD: torch.Tensor) -> torch.Tensor:
        """[num_out, *] sums, outside autograd (gradients on their way back)."""
        if src_SD.shape[0] != self.index_S.shape[0]:
            raise ValueError(f"RowSum over {self.index_S.shape[0]} rows given {src_SD.shape[0]}")
        width = 1
        for n in src_SD.shape[1:]:
            width *= n
        flat = src_SD.reshape(src_SD.shape[0], width)
        if not self.uses_csr:
            out = flat.new_zeros(self.num_out, flat.shape[1]).index_add_(0, self.index_S, flat)
        else:
            ones = torch.ones(self.col_S.shape[0], dtype=flat.dtype, device=flat.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
                warnings.simplefilter("ignore")
                m = torch.sparse_csr_tensor(self.crow_N1, self.col_S, ones, size=(self.num_out, flat.shape[0]),
                                            check_invariants=False)
            out = m @ flat.contiguous()
        return out.reshape((self.num_out,) + tuple(src_SD.shape[1:]))

    def sum_into(self, out_ND: torch.Tensor, src_SD: torch.Tensor) -> torch.Tensor:
        """Write the sums into `out_ND` (e.g. a field view of a packed send buffer), outside autograd."""
        with torch.no_grad():
            if self.uses_csr:
                return out_ND.copy_(self.sum(src_SD))
            return out_ND.zero_().index_add_(0, self.index_S, src_SD)

    def __call__(self, src_SD: torch.Tensor) -> torch.Tensor:
        """The same sum inside autograd: its backward gathers grad rows by index_S."""
        return _RowSumFn.apply(src_SD, self)


class _RowSumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_SD: torch.Tensor, row_sum: RowSum) -> torch.Tensor:
        ctx.row_sum = row_sum
        return row_sum.sum(src_SD)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        return grad_ND.index_select(0, ctx.row_sum.index_S), None
