"""RowSum: the CSR structure built from the layout (group_rows' rows by token, pairs_by_slot's pairs
by row, alltoall's rows by token) sums exactly what index_add_ sums, on random routings, and passes
torch's CSR invariant check (sorted, distinct columns per row: what cuSPARSE requires); its autograd
gathers gradients back. CSR is forced on the CPU here (float64): the CPU kernel would accept
unsorted columns, so the invariant check is what guards the GPU path."""
from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from c2r_comm.dispatch.layout import group_rows, pairs_by_slot
from c2r_comm.dispatch.row_sum import RowSum


def _index_add(index, n, src):
    return src.new_zeros((n,) + tuple(src.shape[1:])).index_add_(0, index, src)


def _check_csr(rs: RowSum) -> None:
    """The CSR cuSPARSE gets: torch's invariant check (column indices sorted and distinct per row)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        torch.sparse_csr_tensor(rs.crow_N1, rs.col_S, torch.ones(rs.col_S.shape[0], dtype=torch.float64),
                                size=(rs.num_out, rs.index_S.shape[0]), check_invariants=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.integers(1, 6), st.integers(1, 9), st.booleans(), st.integers(0, 2**31 - 1))
def test_rows_by_token_sum_like_index_add(T, K, G, with_valid, seed):
    g = torch.Generator().manual_seed(seed)
    group_TK = torch.randint(0, G, (T, K), generator=g)
    valid_TK = torch.rand(T, K, generator=g) < 0.7 if with_valid else None
    rows = group_rows(group_TK, G, valid_TK)
    R = int(rows.counts_G.sum())
    src = torch.randn(R, 3, dtype=torch.float64, generator=g)
    index = rows.token_of_row_R[:R]
    csr = RowSum.build(index, T, torch.float64, rows.row_by_token_R[:R], rows.rows_per_token_T, use_csr=True)
    if csr.uses_csr:
        _check_csr(csr)
    assert torch.equal(rows.rows_per_token_T, torch.bincount(index, minlength=T))
    torch.testing.assert_close(csr.sum(src), _index_add(index, T, src), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 30), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pairs_by_row_sum_like_index_add(R, K, L, seed):
    g = torch.Generator().manual_seed(seed)
    slot_RK = torch.randint(-1, L + 1, (R, K), generator=g)  # -1 and L: choices that live elsewhere
    P = int(((slot_RK >= 0) & (slot_RK < L)).sum())
    pairs = pairs_by_slot(slot_RK, L, P)
    src = torch.randn(P, 4, dtype=torch.float64, generator=g)
    rs = RowSum.build(pairs.row_of_pair_P, R, torch.float64, pairs.pair_by_row_P, pairs.pairs_per_row_R,
                      use_csr=True)
    if rs.uses_csr:
        _check_csr(rs)
    got = rs.sum(src)
    torch.testing.assert_close(got, _index_add(pairs.row_of_pair_P, R, src), rtol=0, atol=1e-12)
    # pairs_by_row lists every pair once, rows in order
    assert sorted(pairs.pair_by_row_P.tolist()) == list(range(P))
    rows_in_order = pairs.row_of_pair_P[pairs.pair_by_row_P]
    assert bool((rows_in_order[1:] >= rows_in_order[:-1]).all())


def test_alltoall_token_sum_structure():
    from c2r_comm.dispatch.alltoall import AllToAllPlan
    g = torch.Generator().manual_seed(3)
    T, K = 9, 3
    order = torch.argsort(torch.rand(T * K, generator=g))
    plan = AllToAllPlan("alltoall", 0, 1, T, 4, K, (), torch.zeros(1, 1, dtype=torch.int64), None, None, (),
                        order, torch.div(order, K, rounding_mode="floor"))
    rs = plan.token_sum(T * K, torch.float64, use_csr=True)
    src = torch.randn(T * K, 2, dtype=torch.float64, generator=g)
    assert rs.uses_csr
    _check_csr(rs)
    torch.testing.assert_close(rs.sum(src), _index_add(plan.token_of_row_R, T, src))
    # dropped choices (capacity mode) sort last and are not sent: only the first `rows` rows sum
    rows = T * K - 5
    rs = plan.token_sum(rows, torch.float64, use_csr=True)
    assert rs.uses_csr
    _check_csr(rs)
    torch.testing.assert_close(rs.sum(src[:rows]), _index_add(plan.token_of_row_R[:rows], T, src[:rows]))


def test_sorting_build_autograd_and_empty_sums():
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 5, (12,), generator=g)
    src = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for use_csr in (False, True):
        rs = RowSum.build(index, 7, torch.float64, use_csr=use_csr)
        assert rs.uses_csr == use_csr
        if use_csr:
            _check_csr(rs)
        out = rs(src)
        torch.testing.assert_close(out, _index_add(index, 7, src.detach()))
        grad = torch.randn(7, 3, dtype=torch.float64, generator=g)
        (gs,) = torch.autograd.grad((out * grad).sum(), src)
        torch.testing.assert_close(gs, grad[index])
        out_view = torch.full((7, 8), 5.0, dtype=torch.float64)[:, 2:5]
        rs.sum_into(out_view, src.detach())
        torch.testing.assert_close(out_view, _index_add(index, 7, src.detach()))
    empty = RowSum.build(torch.zeros(0, dtype=torch.int64), 4, torch.float64, use_csr=True)
    assert torch.equal(empty.sum(torch.zeros(0, 3, dtype=torch.float64)), torch.zeros(4, 3, dtype=torch.float64))
