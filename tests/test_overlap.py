"""The pipelined layer (schedule/pipeline.py): C in {1, 2, 4} chunks give the serial layer's outputs
and every gradient (float64), with every dispatcher, on 2 and 4 ranks and 2x2 for hierarchical;
with uneven and zero token counts across ranks, chunks that are empty on some ranks, and a shared
expert. Also: a chunk's handle refuses another chunk's expert rows, and `auto` picks the degree."""
from __future__ import annotations

import pytest
import torch
from moe_cases import Case, make_plan, rank_inputs
from ranks import run_ranks

from c2r_comm.dispatch import build_dispatcher
from c2r_comm.experts import GroupedExperts, SharedExpert
from c2r_comm.groups import build_process_groups
from c2r_comm.layer import MoELayer
from c2r_comm.schedule import choose_overlap_degree
from c2r_comm.topology import Topology


def _layer(case: Case, rank: int, groups, degree, shared: bool) -> MoELayer:
    plan = make_plan(case)
    disp = build_dispatcher(case.dispatcher, plan, groups, case.hidden)
    experts = GroupedExperts.for_rank(plan, rank, case.hidden, case.ffn, case.seed, dtype=torch.float64)
    shared_expert = SharedExpert(case.hidden, 5, case.seed, torch.float64) if shared else None
    return MoELayer(None, disp, experts, shared_expert, overlap_degree=degree)


def _step(layer: MoELayer, case: Case, rank: int):
    x, idx, w, grad = rank_inputs(case, rank)
    x.requires_grad_(), w.requires_grad_()
    out = layer.forward_routed(x, idx, w)
    (out.out_TD * grad).sum().backward()
    params = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return [out.out_TD.detach(), x.grad, w.grad] + params, len(out.handles)


def worker(rank: int, world: int, cases: list[Case], degrees: list[int]) -> list[float]:
    errors = []
    for case in cases:
        groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=60)
        for shared in (False, True):
            serial, _ = _step(_layer(case, rank, groups, 1, shared), case, rank)
            for degree in degrees:
                got, chunks = _step(_layer(case, rank, groups, degree, shared), case, rank)
                assert chunks == degree
                errors.append(max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(got, serial)))
    return errors


CASES_2 = [Case(d, tokens=t, seed=s) for d in ("alltoall", "dedup")
           for s, t in ((0, (9, 5)), (1, (0, 6)), (2, (3, 1)))] + \
    [Case("hierarchical", nodes=2, gpus_per_node=1, tokens=(7, 2), seed=6)]


def test_pipelined_equals_serial_on_2_ranks():
    for errs in run_ranks(2, worker, CASES_2, [2, 4], timeout_s=240):
        assert max(errs) < 1e-10, errs


def test_pipelined_equals_serial_on_4_ranks_and_2x2_hierarchical():
    cases = [Case("dedup", gpus_per_node=4, tokens=(7, 0, 2, 5), plan="random", seed=3),
             Case("alltoall", gpus_per_node=4, tokens=(4, 4, 1, 6), seed=4),
             Case("hierarchical", nodes=2, gpus_per_node=2, tokens=(6, 3, 0, 5), plan="random", seed=5)]
    for errs in run_ranks(4, worker, cases, [2, 4], timeout_s=240):
        assert max(errs) < 1e-10, errs


def _wrong_handle_worker(rank: int, world: int) -> str:
    case = Case("dedup", tokens=(8, 3) if rank == 0 else (2, 6))
    groups = build_process_groups(Topology(1, 2), timeout_s=60)
    layer = _layer(case, rank, groups, 2, shared=False)
    disp = layer.dispatcher
    x, idx, w, _ = rank_inputs(case, rank)
    routes = [disp.exchange_counts(disp.layout(xc, ic, wc)) for xc, ic, wc in
              zip(x.tensor_split(2), idx.tensor_split(2), w.tensor_split(2))]
    batches = [disp.send(xc, wc, r).wait() for xc, wc, r in zip(x.tensor_split(2), w.tensor_split(2), routes)]
    (b0, h0), (b1, h1) = batches
    if b0.x_PD.shape[0] == b1.x_PD.shape[0]:
        return "same row count"  # not the case for these inputs (asserted by the caller)
    try:
        disp.combine_start(b1.x_PD, h0)
    except ValueError as exc:
        return f"refused: {exc}"
    return "accepted"


def test_a_chunks_handle_refuses_another_chunks_rows():
    for res in run_ranks(2, _wrong_handle_worker):
        assert res.startswith("refused"), res


@pytest.mark.parametrize("exchange_s,experts_s,rows,want", [
    (0.001, 1.0, 0, 1), (1.0, 0.001, 0, 1), (0.0, 0.0, 0, 1), (0.001, 1.0, 1000, 1),  # one side negligible
    (0.2, 1.0, 0, 2), (1.0, 1.0, 0, 2), (1.0, 0.6, 0, 2), (1.0, 0.6, 127, 2),  # experts on the critical path
    (1.0, 0.6, 128, 4), (1.0, 1.0, 703, 4),  # ... with chunks of 32 rows per expert or more at C = 4
    (0.2, 1.0, 190, 2), (0.9, 1.0, 703, 2),  # the experts longer than the exchange: not measured, C = 2
    (1.0, 0.5, 0, 4), (1.0, 0.3, 12, 4)])  # link-bound
def test_auto_rule(exchange_s, experts_s, rows, want):
    assert choose_overlap_degree(exchange_s, experts_s, rows) == want


def _auto_worker(rank: int, world: int) -> tuple[int, int, int]:
    case = Case("dedup", tokens=(6, 4))
    groups = build_process_groups(Topology(1, 2), timeout_s=60)
    layer = _layer(case, rank, groups, "auto", shared=False)
    assert layer.overlap_degree is None
    _, chunks_first = _step(layer, case, rank)
    decided = layer.overlap_degree
    _, chunks_next = _step(layer, case, rank)
    return decided, chunks_first, chunks_next


def test_auto_decides_on_the_first_forward_and_every_rank_agrees():
    results = run_ranks(2, _auto_worker)
    assert results[0][0] == results[1][0] and results[0][0] in (1, 2, 4)
    assert all(r[1] == 1 and r[2] == r[0] for r in results)


def _fake_timer_worker(rank: int, world: int, exchange_s: list[float], experts_s: float,
                       busy_share: float, rows_per_chunk: float = 0.0) -> tuple[int, float, float, float]:
    """rows_per_chunk > 0: the rule's rows threshold (auto.ROWS_PER_EXPERT_CHUNK) in this rank's process."""
    from c2r_comm.schedule import agree_overlap_degree, auto, timed_serial_forward
    if rows_per_chunk > 0:
        auto.ROWS_PER_EXPERT_CHUNK = rows_per_chunk
    case = Case("dedup", tokens=(5, 5))
    groups = build_process_groups(Topology(1, 2), timeout_s=60)
    layer = _layer(case, rank, groups, 1, shared=False)
    x, idx, w, _ = rank_inputs(case, rank)
    half = exchange_s[rank] / 2  # dispatch and combine each take half of this rank's exchange time
    ticks = iter([0.0, half, half + experts_s, 2 * half + experts_s])
    # machine (idle, total) ticks: the cores are busy `busy_share` of the exchange
    cpu = iter([(0.0, 0.0), (50.0 * (1 - busy_share), 50.0), (50.0 * (1 - busy_share), 50.0),
                (100.0 * (1 - busy_share), 100.0)])
    timing = timed_serial_forward(layer.dispatcher, layer.experts, None, x, idx, w, timer=lambda: next(ticks),
                                  cpu_ticks=lambda: next(cpu))
    choice = agree_overlap_degree(timing, groups.ep)
    return choice.degree, choice.exchange_s, timing.rows_per_expert, choice.rows_per_expert


# forward times; the rule sees the step estimate (2 x exchange, 3 x experts = 3.0 s): 6.0 >= 2 x 3.0 -> 4
@pytest.mark.parametrize("exchange_s,busy_share,want", [
    ([0.001, 0.002], 0.0, 1), ([0.01, 0.3], 0.0, 2), ([0.9, 3.0], 0.0, 4),
    ([0.9, 1.6], 0.97, 1)])  # CPU experts: an exchange while the cores are busy is nothing to hide
def test_auto_agrees_on_the_slowest_ranks_exchange(exchange_s, busy_share, want):
    results = run_ranks(2, _fake_timer_worker, exchange_s, 1.0, busy_share)
    fewest_rows = min(r[2] for r in results)  # each rank's rows per local expert, from its handle
    assert fewest_rows > 0 and results[0][2] != results[1][2]  # the two ranks got different rows
    for degree, e, _, agreed_rows in results:
        assert degree == want and e == pytest.approx(max(exchange_s)) and agreed_rows == fewest_rows


def test_auto_decides_rows_on_the_rank_with_the_fewest():
    """Exchange estimate 3.2 s against experts 3.0 s: the rows per local expert decide. With the
    threshold at the larger rank's rows, only the fewest rows (agreed over ranks) give C = 2 on
    both ranks; at the smaller rank's rows both pick C = 4."""
    rows = [r[2] for r in run_ranks(2, _fake_timer_worker, [0.9, 1.6], 1.0, 0.0)]
    assert rows[0] != rows[1]
    for threshold_rows, want in ((max(rows), 2), (min(rows), 4)):
        results = run_ranks(2, _fake_timer_worker, [0.9, 1.6], 1.0, 0.0, threshold_rows / 4)
        assert [r[0] for r in results] == [want, want], (threshold_rows, results)


def _inline_worker(rank: int, world: int, cases: list[Case], x_grad: bool = True, w_grad: bool = True) -> list[float]:
    """The split backward (no exchange thread: every exchange started, then waited on; the GPU
    order) gives the serial results too; x_grad / w_grad: whether the tokens and the routing
    weights require grad (neither: the dispatch is not cut, only the combine)."""
    from c2r_comm.schedule import ChunkPipeline
    errors = []
    for case in cases:
        groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=60)
        results = []
        for degree in (1, 3):
            layer = _layer(case, rank, groups, 1, shared=True)
            x, idx, w, grad = rank_inputs(case, rank)
            x.requires_grad_(x_grad), w.requires_grad_(w_grad)
            pipeline = ChunkPipeline(layer.dispatcher, layer.experts, layer.shared_expert, degree,
                                     exchange_thread=False if degree > 1 else None)
            run = pipeline(x, idx, w)
            if degree > 1:  # the split path ran: cut combines, and dispatches where their inputs need grads
                assert all(ch.combine_tape.links and bool(ch.dispatch_tape.links) == (x_grad or w_grad)
                           for ch in run.chunks)
            (run.out_TD * grad).sum().backward()
            results.append([run.out_TD.detach(), x.grad, w.grad] + [p.grad for p in layer.parameters()])
        serial, got = results
        assert [g is None for g in got] == [s is None for s in serial]
        errors.append(max(float((a - b).abs().max()) if a is not None and a.numel() else 0.0
                          for a, b in zip(got, serial)))
    return errors


def test_pipeline_without_exchange_thread_equals_serial():
    cases = [Case("dedup", tokens=(8, 3), seed=7), Case("alltoall", tokens=(0, 7), seed=9),
             Case("dedup", tokens=(11, 0), seed=10),
             Case("hierarchical", nodes=2, gpus_per_node=1, tokens=(4, 9), seed=8)]
    for errs in run_ranks(2, _inline_worker, cases):
        assert max(errs) < 1e-10, errs


def _configured_split_worker(rank: int, world: int, case: Case) -> tuple[float, int]:
    """schedule.backward_exchanges reaches the pipeline: "split" on the CPU runs the split backward
    (every communicating piece through transport.backward_through: 2 per chunk)."""
    from c2r_comm.schedule import pipeline
    groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=60)
    serial, _ = _step(_layer(case, rank, groups, 1, shared=False), case, rank)
    calls, through = [], pipeline.backward_through
    pipeline.backward_through = lambda *a: (calls.append(1), through(*a))[1]
    try:
        layer = _layer(case, rank, groups, 2, shared=False)
        layer = MoELayer(None, layer.dispatcher, layer.experts, None, 2, backward_exchanges="split")
        got, _ = _step(layer, case, rank)
    finally:
        pipeline.backward_through = through
    return max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(got, serial)), len(calls)


def test_backward_exchanges_split_from_the_layer():
    for err, calls in run_ranks(2, _configured_split_worker, Case("dedup", tokens=(7, 4), seed=17)):
        assert err < 1e-10 and calls == 4  # 2 chunks x (combine back, dispatch back)
    with pytest.raises(ValueError, match="backward_exchanges"):
        MoELayer(None, None, None, backward_exchanges="threads")


def test_split_backward_without_token_or_weight_gradients():
    cases = [Case("dedup", tokens=(6, 4), seed=14), Case("hierarchical", nodes=2, gpus_per_node=1, tokens=(3, 8), seed=15)]
    for x_grad, w_grad in ((False, True), (False, False)):
        for errs in run_ranks(2, _inline_worker, cases, x_grad, w_grad):
            assert max(errs) < 1e-10, (x_grad, w_grad, errs)


def test_pipeline_without_exchange_thread_equals_serial_on_2x2_hierarchical():
    cases = [Case("hierarchical", nodes=2, gpus_per_node=2, tokens=(6, 0, 9, 4), seed=11),
             Case("dedup", gpus_per_node=4, tokens=(5, 8, 1, 7), seed=12)]
    for errs in run_ranks(4, _inline_worker, cases, timeout_s=240):
        assert max(errs) < 1e-10, errs


def _order_worker(rank: int, world: int, case: Case) -> list[tuple]:
    """What the split backward does, in order: exchange starts (combine's / dispatch's backward, by
    chunk) and the end of each chunk's expert backward."""
    from c2r_comm.dispatch.transport import Exchange
    from c2r_comm.schedule import ChunkPipeline
    groups = build_process_groups(Topology(case.nodes, case.gpus_per_node), timeout_s=60)
    layer = _layer(case, rank, groups, 1, shared=False)
    x, idx, w, grad = rank_inputs(case, rank)
    x.requires_grad_(), w.requires_grad_()
    run = ChunkPipeline(layer.dispatcher, layer.experts, None, 3, exchange_thread=False)(x, idx, w)
    events, start = [], Exchange.start

    def logged_start(ex, send, recv):
        if ex.backward:
            what = "combine backward" if ex.returning else "dispatch backward"
            events.append((what, ex.site.chunk) if ex.stage == "all2all" else (what, ex.site.chunk, ex.stage))
        return start(ex, send, recv)

    flush = type(run.weight_grads).flush

    def logged_flush(wg):
        events.append(("weight gradients",))
        return flush(wg)

    Exchange.start, type(run.weight_grads).flush = logged_start, logged_flush
    try:
        for c, ch in enumerate(run.chunks):
            ch.expert_x_leaf.register_hook(lambda g, c=c: events.append(("experts backward", c)))
            ch.x_leaf.register_hook(lambda g, c=c: events.append(("input gradient", c)))
        (run.out_TD * grad).sum().backward()
    finally:
        Exchange.start, type(run.weight_grads).flush = start, flush
    return events


def test_split_backward_starts_each_exchange_before_the_experts_it_can_hide_behind():
    """Every chunk's gradient dispatch (combine's backward) is in flight before chunk 0's experts
    run backward, and chunk c's dispatch backward before chunk c+1's experts: the order that lets a
    GPU overlap them (a start only queues the collective). The weight gradients run after the last
    dispatch backward started and before any is waited on (its input gradient arrives).
    Hierarchical: the cross-node stage of every chunk's combine backward up front, its intra-node
    stage when the chunk is waited on; a dispatch backward's cross-node stage right after its
    intra-node one, whose rows' gradients reach the inputs then."""
    last = [("weight gradients",)] + [("input gradient", c) for c in range(3)]
    for events in run_ranks(2, _order_worker, Case("dedup", tokens=(9, 6), seed=13)):
        assert events == [("combine backward", 0), ("combine backward", 1), ("combine backward", 2),
                          ("experts backward", 0), ("dispatch backward", 0),
                          ("experts backward", 1), ("dispatch backward", 1),
                          ("experts backward", 2), ("dispatch backward", 2)] + last, events
    want = [("combine backward", c, "cross-node") for c in range(3)]
    for c in range(3):
        want += [("combine backward", c, "intra-node"), ("experts backward", c),  # advance(): the node-local
                 ("dispatch backward", c, "intra-node"), ("input gradient", c),  # rows' gradients land at once
                 ("dispatch backward", c, "cross-node")]
    want += last
    for events in run_ranks(2, _order_worker, Case("hierarchical", nodes=2, gpus_per_node=1, tokens=(7, 5), seed=16)):
        assert events == want, events
