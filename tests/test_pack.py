"""Packed rows: every field of every dtype mix survives pack -> bytes -> view, aligned, zero-copy."""
from __future__ import annotations

import pytest
import torch

from c2r_comm.dispatch.pack import RowFormat

MIXES = [(torch.float32, torch.float32, torch.int16), (torch.bfloat16, torch.float32, torch.int16),
         (torch.float16, torch.float32, torch.int32), (torch.float64, torch.float64, torch.int16),
         (torch.bfloat16, torch.bfloat16, torch.int16)]


@pytest.mark.parametrize("x_dtype,w_dtype,id_dtype", MIXES)
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_pack_then_view_round_trips(x_dtype, w_dtype, id_dtype, rows):
    D, K, T = 5, 3, 9  # odd sizes: offsets must still be aligned for every field's dtype
    g = torch.Generator().manual_seed(rows)
    x_TD = torch.randn(T, D, generator=g).to(x_dtype)
    w_TK = torch.rand(T, K, generator=g).to(w_dtype)
    ids_RK = torch.randint(-1, 100, (rows, K), generator=g).to(id_dtype)
    token_R = torch.randint(0, T, (rows,), generator=g)
    fmt = RowFormat.of(x=(x_dtype, D), w=(w_dtype, K), id=(id_dtype, K))
    size = max(t.element_size() for t in (x_TD, w_TK, ids_RK))
    assert fmt.row_bytes % size == 0 and fmt.row_bytes >= D * x_TD.element_size() + K * (
        w_TK.element_size() + ids_RK.element_size())
    buf = fmt.pack(rows, torch.device("cpu"), {"x": (x_TD, token_R), "w": (w_TK, token_R), "id": ids_RK})
    assert buf.dtype == torch.uint8 and buf.shape == (rows, fmt.row_bytes)
    views = fmt.views(buf)
    assert torch.equal(views["x"], x_TD[token_R]) and torch.equal(views["w"], w_TK[token_R])
    assert torch.equal(views["id"], ids_RK)
    assert all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in views.values())  # views


def test_wide_fields_sit_on_16_byte_offsets_in_16_byte_rows():
    """GPU copies of the token field run vectorised only on 16-byte aligned rows."""
    for x_dtype, D in ((torch.bfloat16, 2048), (torch.float32, 5), (torch.float16, 7)):
        fmt = RowFormat.of(x=(x_dtype, D), w=(torch.float32, 6), id=(torch.int16, 6))
        for name, dtype, width, offset in zip(fmt.names, fmt.dtypes, fmt.widths, fmt.offsets):
            size = torch.empty(0, dtype=dtype).element_size()
            assert offset % (16 if size * width >= 16 else size) == 0, (name, offset)
        assert fmt.row_bytes % 16 == 0
    assert RowFormat.of(x=(torch.bfloat16, 2048), w=(torch.float32, 6), id=(torch.int16, 6)).row_bytes == 4144
