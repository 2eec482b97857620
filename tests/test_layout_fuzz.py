"""Fuzzed routings: the layout functions against brute force (hypothesis), and a seeded sweep of
random small MoE cases through every dispatcher on a 2x2 gloo world against the reference."""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import Case, run_cases
from ranks import run_ranks

from c2r_comm.dispatch.layout import distinct_counts, group_rows, pairs_by_slot


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 12))
    k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(0, 20))
    num_groups = draw(st.integers(1, 5))
    rows = [draw(st.permutations(range(num_experts)))[:k] for _ in range(tokens)]
    group_of_expert = [draw(st.integers(0, num_groups - 1)) for _ in range(num_experts)]
    return torch.tensor(rows, dtype=torch.long).reshape(tokens, k), torch.tensor(group_of_expert), num_groups


@settings(max_examples=150, deadline=None, derandomize=True)
@given(routings())
def test_group_rows_is_one_row_per_distinct_token_group(case):
    idx_TK, group_of_expert, G = case
    group_TK = group_of_expert[idx_TK]
    layout = group_rows(group_TK, G)
    want = sorted({(int(group_of_expert[e]), t) for t, row in enumerate(idx_TK.tolist()) for e in row})
    n = int(layout.counts_G.sum())
    assert n == len(want) and layout.group_of_row_R.shape[0] == idx_TK.numel()  # padded to T*K
    got = list(zip(layout.group_of_row_R[:n].tolist(), layout.token_of_row_R[:n].tolist()))
    assert got == want  # distinct pairs, ordered by group then token
    for r, (g, t) in enumerate(got):
        assert layout.member_RK[r].tolist() == [int(group_of_expert[e]) == g for e in idx_TK[t].tolist()]
    assert not layout.member_RK[n:].any()  # sentinel rows are nobody's
    assert layout.counts_G.tolist() == [sum(1 for gg, _ in want if gg == g) for g in range(G)]
    assert distinct_counts(group_TK, G).tolist() == layout.counts_G.tolist()


@settings(max_examples=100, deadline=None, derandomize=True)
@given(routings(), st.data())
def test_group_rows_skips_invalid_choices(case, data):
    idx_TK, group_of_expert, G = case
    valid = torch.tensor([[data.draw(st.booleans()) for _ in range(idx_TK.shape[1])] for _ in range(idx_TK.shape[0])],
                         dtype=torch.bool).reshape(idx_TK.shape)
    group_TK = group_of_expert[idx_TK]
    layout = group_rows(group_TK, G, valid_TK=valid)
    want = sorted({(int(group_TK[t, k]), t) for t in range(idx_TK.shape[0]) for k in range(idx_TK.shape[1])
                   if valid[t, k]})
    n = int(layout.counts_G.sum())
    assert list(zip(layout.group_of_row_R[:n].tolist(), layout.token_of_row_R[:n].tolist())) == want
    for r, (g, t) in enumerate(want):
        assert layout.member_RK[r].tolist() == [bool(valid[t, k]) and int(group_TK[t, k]) == g
                                                for k in range(idx_TK.shape[1])]
    assert distinct_counts(group_TK, G, valid).tolist() == layout.counts_G.tolist()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(0, 15), st.integers(1, 6), st.integers(1, 5), st.data())
def test_pairs_by_slot_groups_every_valid_choice_once(rows, k, num_local, data):
    slot_RK = torch.tensor([[data.draw(st.integers(-1, num_local)) for _ in range(k)] for _ in range(rows)],
                           dtype=torch.int16).reshape(rows, k)  # -1 and num_local: not here
    flat = slot_RK.reshape(-1).long()
    valid = [i for i, s in enumerate(flat.tolist()) if 0 <= s < num_local]
    exp = pairs_by_slot(slot_RK, num_local, len(valid))
    chosen = exp.choice_of_pair_P.tolist()
    assert sorted(chosen) == valid  # each valid choice once
    slots = flat[exp.choice_of_pair_P].tolist()
    assert slots == sorted(slots)  # grouped by local expert
    assert exp.row_of_pair_P.tolist() == [c // k for c in chosen]


def _random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        E = rng.choice([4, 8, 12])
        cases.append(Case(
            dispatcher=("alltoall", "dedup", "hierarchical")[i % 3], nodes=2, gpus_per_node=2, num_experts=E,
            top_k=rng.randint(1, E), hidden=4, ffn=6, tokens=tuple(rng.randint(0, 7) for _ in range(4)),
            plan=rng.choice(["contiguous", "random"]), routing=rng.choice(["random", "subset", "random"]),
            seed=rng.randint(0, 10_000)))
    return cases


def test_random_small_cases_match_reference_on_2x2():
    cases = _random_cases(24, seed=2026)
    for rank, results in enumerate(run_ranks(4, run_cases, cases)):
        for case, res in zip(cases, results):
            assert all(v <= 1e-10 for v in res["err"].values()), (rank, case, res["err"])
