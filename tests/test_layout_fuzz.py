"""Fuzzed routings: the layout functions against brute force (hypothesis), and a seeded sweep of
random small MoE cases through every dispatcher on a 2x2 gloo world against the reference."""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import Case, run_cases
from ranks import run_ranks

from c2r_comm.dispatch.layout import expand_to_slots, group_layout


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
def test_group_layout_is_one_row_per_distinct_token_group(case):
    idx_TK, group_of_expert, G = case
    layout = group_layout(idx_TK, group_of_expert, G)
    want = sorted({(int(group_of_expert[e]), t) for t, row in enumerate(idx_TK.tolist()) for e in row})
    got = list(zip(layout.group_of_row_R.tolist(), layout.token_of_row_R.tolist()))
    assert got == want  # distinct pairs, ordered by group then token
    for r, (g, t) in enumerate(got):
        assert layout.member_RK[r].tolist() == [int(group_of_expert[e]) == g for e in idx_TK[t].tolist()]
    assert layout.counts_G.tolist() == [sum(1 for gg, _ in want if gg == g) for g in range(G)]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(0, 15), st.integers(1, 6), st.integers(1, 5), st.data())
def test_expand_to_slots_groups_every_valid_choice_once(rows, k, num_local, data):
    slot_RK = torch.tensor([[data.draw(st.integers(-1, num_local - 1)) for _ in range(k)] for _ in range(rows)],
                           dtype=torch.int16).reshape(rows, k)
    exp = expand_to_slots(slot_RK, num_local)
    flat = slot_RK.reshape(-1).long()
    chosen = exp.choice_of_pair_P.tolist()
    assert sorted(chosen) == [i for i, s in enumerate(flat.tolist()) if s >= 0]  # each valid choice once
    slots = flat[exp.choice_of_pair_P].tolist()
    assert slots == sorted(slots)  # grouped by local expert
    assert exp.row_of_pair_P.tolist() == [c // k for c in chosen]
    assert list(exp.tokens_per_expert) == [slots.count(s) for s in range(num_local)]


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
