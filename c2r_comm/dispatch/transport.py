"""Asynchronous data exchanges with host-known counts, and their autograd link.

An `Exchange` is one stage's data movement once the count exchange has told every rank every
count: an all_to_all_single over a group, or sparse point-to-point messages to chosen peers (only
non-empty ones are posted, so no rank waits on a message that never comes). `start()` issues it
with `async_op=True` and returns the work handles: on gloo a background thread moves the bytes;
on NCCL the process group runs it on its own communication stream after an event from the
current stream, keeps the tensors on the Work until `wait()`, and `wait()` makes the current
stream wait on the collective's event. `Pending` keeps every buffer of an exchange alive until it
is waited on, so call `wait()` on the stream that called `send()` (the buffers are then only used
in stream order).

Contracts for several exchanges in flight (micro-batches): every rank issues the same phases in
the same order — layouts and count exchanges, sends, waits, combines — because a count exchange
is a blocking collective on the same group as the data, and the hierarchical dispatcher's
`wait()` issues its second stage itself. Backward then runs the reverse exchanges in the autograd
engine's order, which is the same on every rank as long as every rank builds the same graph (the
same inputs require grad and the loss depends on every MoE output).

Autograd: forward data moves outside autograd (packed bytes); once it has arrived, `link()`
connects the received tensors to the tensors they were packed from with one Function per stage,
whose backward runs the reverse exchange (counts swapped) of the packed gradients. One Function
issues one exchange, in the same order on every rank, in forward and in backward, so several
exchanges in flight (micro-batches, chunks) cannot cross each other.

A pipelined layer cuts the graph at its links instead (`link(..., tape=LinkTape())`): backward
then stops at what arrived, and `backward_through` runs each link's reverse exchange as start and
wait in the caller's program order (again the same on every rank), so other work can run while
it moves.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from c2r_comm.comm_failures import CommSite, GuardedWork, guard

T = TypeVar("T")


@dataclass(frozen=True)
class Exchange:
    """Rows in peer blocks: send_counts[i] rows to group rank peers[i], recv_counts[i] from it."""

    group: Any
    peers: tuple[int, ...]  # group ranks; for all2all every rank of the group in order
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    sparse: bool  # True: point-to-point to non-empty peers only; False: one all_to_all_single
    # Sparse only: the same ranks as `group` in a second group. Sends to higher group ranks go on
    # `group`, to lower ones on `reverse_group` (receives mirror it), so the two directions of a
    # pair never share a connection (see groups.ProcessGroups.ep_reverse).
    reverse_group: Any = None
    # What a failure names (comm_failures.CommSite: layer, chunk; phase "dispatch"), this exchange's
    # stage, whether it is the return trip of a dispatch exchange (combine) and whether it runs in
    # backward. The full site is built only when a collective fails.
    site: CommSite = CommSite()
    stage: Optional[str] = None
    returning: bool = False
    backward: bool = False

    @property
    def rows_sent(self) -> int:
        return sum(self.send_counts)

    @property
    def rows_received(self) -> int:
        return sum(self.recv_counts)

    def reversed(self, for_backward: bool = False) -> "Exchange":
        """The same pairs with counts swapped: combine's return of a dispatch exchange (and vice
        versa), or with for_backward the gradient exchange of this one (same phase, backward)."""
        return Exchange(self.group, self.peers, self.recv_counts, self.send_counts, self.sparse, self.reverse_group,
                        self.site, self.stage, self.returning if for_backward else not self.returning,
                        self.backward or for_backward)

    def failure_site(self) -> CommSite:
        phase = self.site.phase
        if self.returning:
            phase = {"dispatch": "combine", "combine": "dispatch"}.get(phase, phase)
        return self.site.at(phase=phase, direction="backward" if self.backward else "forward", stage=self.stage,
                            group=self.group, group_peers=self.peers)

    def start(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Issue the exchange of send (rows in peer blocks) into recv; returns work handles whose
        wait() raises comm_failures.CommError naming this exchange's site and peers."""
        with guard(self.failure_site):
            return [GuardedWork(w, self.failure_site) for w in self._start(send, recv)]

    def _start(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        if not self.sparse:
            work = dist.all_to_all_single(recv, send, list(self.recv_counts), list(self.send_counts),
                                          group=self.group, async_op=True)
            return [work]
        me = dist.get_rank(self.group)
        up, down = self.group, self.reverse_group if self.reverse_group is not None else self.group
        ops: dict[int, list] = {id(up): [], id(down): []}  # one batch per group (a batch is one group's)
        s_off, r_off = 0, 0
        for group_peer, ns, nr in zip(self.peers, self.send_counts, self.recv_counts):
            peer = dist.get_global_rank(self.group, group_peer)  # P2POp's peer is global (torch >= 2.4)
            if ns:  # to a higher rank on `up`; the peer receives it there (from a lower rank)
                g = up if me < group_peer else down
                ops[id(g)].append(dist.P2POp(dist.isend, send.narrow(0, s_off, ns), peer, group=g))
            if nr:
                g = up if group_peer < me else down
                ops[id(g)].append(dist.P2POp(dist.irecv, recv.narrow(0, r_off, nr), peer, group=g))
            s_off, r_off = s_off + ns, r_off + nr
        # batch_isend_irecv refuses an empty list
        return [w for batch in ops.values() if batch for w in dist.batch_isend_irecv(batch)]

    def run(self, send: torch.Tensor, recv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blocking exchange; allocates recv like `send` when not given."""
        if recv is None:
            recv = send.new_empty((self.rows_received,) + tuple(send.shape[1:]))
        for work in self.start(send, recv):
            work.wait()
        return recv


class Pending(Generic[T]):
    """An exchange in flight. `wait()` waits for its work handles, then runs the post-processing
    and returns its result; at most once.

    A multi-stage exchange (hierarchical combine: the node-local return, then the cross-node one)
    gives `then=True`: its post-processing starts the next stage and returns that stage's Pending.
    `wait()` follows the chain to the end; `advance()` only waits for the current stage and issues
    the next one, so a scheduler can put the next (slow) stage in flight early and compute while it
    moves. For a single-stage Pending `advance()` does nothing.

    On CUDA, wait on the stream that was current at the start (the pipeline starts and waits inside
    one autograd node, so it does): NCCL's wait makes the current stream wait for the collective and
    then drops its hold on the buffers, which the caching allocator hands out again on the stream
    that allocated them; waiting from another stream would let that one reuse them too early."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], Any], buffers: Sequence[torch.Tensor] = (),
                 then: bool = False):
        self._works, self._finish, self._buffers, self._then = list(works), finish, tuple(buffers), then
        self._done = False

    def advance(self) -> "Pending[T]":
        """Wait for the current stage and issue the next; no-op on the last stage."""
        if self._then and not self._done:
            nxt = self._take()
            self._works, self._finish, self._buffers, self._then = nxt._works, nxt._finish, nxt._buffers, nxt._then
            self._done = False
        return self

    def wait(self) -> T:
        result = self._take()
        while isinstance(result, Pending):
            result = result.wait()
        return result

    def _take(self) -> Any:
        if self._done:
            raise RuntimeError("Pending.wait() was already called; an exchange's result is returned once")
        for work in self._works:
            work.wait()
        self._done = True
        result = self._finish()
        self._works, self._finish, self._buffers = [], None, ()
        return result


@dataclass(frozen=True)
class Link:
    """How gradients of received tensors go back: pack them, run `exchange` reversed, then
    `scatter` turns the returned rows (the sender's order) into gradients of the inputs.
    It holds no received tensor: an output kept on the autograd node would form a reference
    cycle (tensor -> node -> tensor) that keeps whole receive buffers alive until Python's GC."""

    exchange: Exchange
    pack_grads: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]  # grads of outputs -> [rows, *] buffer
    scatter: Callable[[torch.Tensor], tuple[Optional[torch.Tensor], ...]]  # returned buffer -> input grads


class _Arrived(torch.autograd.Function):
    """outputs = what an exchange delivered, as a function of what was packed (the inputs)."""

    @staticmethod
    def forward(ctx, link: Link, outputs: tuple[torch.Tensor, ...], *inputs):
        ctx.link = link
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        link: Link = ctx.link
        buf = link.pack_grads(tuple(g.contiguous() for g in grads))
        back = link.exchange.reversed(for_backward=True).run(buf)
        return (None, None, *link.scatter(back))


def link(exchange: Exchange, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
         pack_grads: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
         scatter: Callable[[torch.Tensor], tuple[Optional[torch.Tensor], ...]],
         tape: Optional["LinkTape"] = None) -> tuple[torch.Tensor, ...]:
    """Attach arrived `outputs` to the autograd graph of `inputs` (see module doc). With a tape
    the graph is cut here instead: backward stops at the outputs, whose gradients the tape's link
    keeps, and the tape records the link with an empty proxy of its inputs, for `backward_through`
    (a backward split into start and wait)."""
    lk = Link(exchange, pack_grads, scatter)
    if tape is None or not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return _Arrived.apply(lk, tuple(outputs), *inputs)
    cut = CutLink(lk, tuple((o.shape, o.dtype, o.device) for o in outputs), len(inputs))
    cut.inputs_proxy = _InputsProxy.apply(cut, *inputs)
    tape.links.append(cut)
    return _Cut.apply(cut, tuple(outputs), tape.anchor(outputs[0].device))


class CutLink:
    """A link cut out of the autograd graph. It holds no tensor of the forward: its inputs through
    an empty proxy (whose backward hands them the scattered gradients), and, between the local
    backward and the start of its exchange, the gradients that arrived at its outputs."""

    def __init__(self, link_: Link, output_meta: tuple, num_inputs: int):
        self.link, self.num_inputs = link_, num_inputs
        self.output_meta = output_meta  # (shape, dtype, device) of each output: zeros when none got a gradient
        self.grads: Optional[tuple[torch.Tensor, ...]] = None  # arrived at the outputs (summed)
        self.started = False  # the reverse exchange has taken the gradients
        self.inputs_proxy: Optional[torch.Tensor] = None  # empty; its grad_fn leads to the inputs
        self.input_grads: Optional[tuple[Optional[torch.Tensor], ...]] = None  # for the proxy's backward

    def take_grads(self) -> tuple[torch.Tensor, ...]:
        grads, self.grads, self.started = self.grads, None, True
        if grads is None:  # the local backward did not reach this link: zero gradients (the exchange still runs)
            grads = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in self.output_meta)
        return grads

    def backward_into_inputs(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """Continue the backward from the link's inputs with these gradients (the scatter's)."""
        if len(grads) != self.num_inputs:
            raise RuntimeError(f"a link's scatter returned {len(grads)} gradients for {self.num_inputs} inputs")
        self.input_grads = tuple(grads)
        proxy, self.inputs_proxy = self.inputs_proxy, None
        torch.autograd.backward([proxy], [torch.empty_like(proxy)])


class _InputsProxy(torch.autograd.Function):
    """An empty tensor standing for a cut link's inputs (no storage held): its backward returns the
    gradients the link's scatter produced (CutLink.input_grads). Works on every torch the package
    supports, unlike backward from GradientEdges (torch >= 2.7)."""

    @staticmethod
    def forward(ctx, cut: CutLink, *inputs):
        # weak: the CutLink holds this node through its proxy (a strong reference back would be a
        # cycle that keeps the inputs' graph alive until Python's GC when backward never runs)
        ctx.cut = weakref.ref(cut)
        return inputs[0].new_empty(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _):
        cut: CutLink = ctx.cut()  # alive: backward_into_inputs is running on it
        grads, cut.input_grads = cut.input_grads, None
        return (None,) + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:]))


class _Cut(torch.autograd.Function):
    """outputs = what an exchange delivered, hung on an empty anchor leaf instead of the packed
    inputs: backward keeps their gradients on the CutLink and stops there."""

    @staticmethod
    def forward(ctx, cut: CutLink, outputs: tuple[torch.Tensor, ...], anchor: torch.Tensor):
        ctx.cut = cut
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cut: CutLink = ctx.cut
        if cut.started:
            raise RuntimeError("a gradient reached a cut link after its reverse exchange had started: pieces were "
                               "run backward out of order (or one tape was shared by two pieces)")
        # Separate backward calls can reach one cut (the hierarchical combine's node-local partials
        # feed the token sums directly and through the cross-node return): gradients add up.
        cut.grads = tuple(g.contiguous() for g in grads) if cut.grads is None else \
            tuple(a + b for a, b in zip(cut.grads, grads))
        return None, None, None


class LinkTape:
    """The links of one dispatch or one combine (a piece of a pipelined layer), in forward order.
    Pass one to `Dispatcher.send` / `combine_start` to cut the piece's graph at its exchanges."""

    def __init__(self) -> None:
        self.links: list[CutLink] = []
        self._anchors: dict[torch.device, torch.Tensor] = {}

    def anchor(self, device: torch.device) -> torch.Tensor:
        """An empty leaf that requires grad (no storage): what cut outputs hang on."""
        if device not in self._anchors:
            self._anchors[device] = torch.empty(0, device=device, requires_grad=True)
        return self._anchors[device]


def backward_through(tape: LinkTape, roots: Sequence[Optional[torch.Tensor]],
                     grads: Sequence[Optional[torch.Tensor]]) -> Pending[None]:
    """Backward of a piece cut at its links, split into start and wait: runs the local backward
    from `roots` (with `grads`) to the last link's outputs, packs their gradients and *starts*
    that link's reverse exchange. `wait()` waits for it, scatters the returned rows into the
    link's inputs and continues backward through the earlier links (each started and waited in
    turn). Several pieces' exchanges can so be in flight while other work runs; the exchanges
    start in program order, the same on every rank. A tape without links (no input needed a
    gradient) gives a Pending with nothing to wait for."""
    backward_from(roots, grads)
    if not tape.links:
        return Pending([], lambda: None)
    return _start_link_backward(tape.links, len(tape.links) - 1)


def backward_from(roots: Sequence[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> None:
    """autograd.backward over the roots that are part of a graph and got a gradient (others carry none)."""
    pairs = [(r, g) for r, g in zip(roots, grads) if r is not None and g is not None and r.requires_grad]
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])


def _start_link_backward(links: Sequence[CutLink], i: int) -> Pending[None]:
    cut = links[i]
    send = cut.link.pack_grads(cut.take_grads())  # the packed buffer holds the gradients now
    ex = cut.link.exchange.reversed(for_backward=True)
    recv = send.new_empty((ex.rows_received,) + tuple(send.shape[1:]))
    works = ex.start(send, recv)

    def finish() -> Optional[Pending[None]]:
        cut.backward_into_inputs(cut.link.scatter(recv))
        return _start_link_backward(links, i - 1) if i > 0 else None

    return Pending(works, finish, (send, recv), then=i > 0)
