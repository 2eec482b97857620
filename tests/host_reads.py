"""Find hidden host syncs on the CPU: every read of tensor data by the host, and every operator that
makes a CUDA stream wait for the host, inside a block of torch code.

A GPU stalls whenever the host needs a value computed on the device: `.item()`, `int(t)`,
`bool(t)`, `.tolist()`, `.numpy()`, and operators whose output size depends on the data
(`nonzero`, boolean-mask indexing, `unique`, `masked_select`, `bincount`, `repeat_interleave`
without `output_size`), and so does a copy of Python data to the device (`torch.tensor(...,
device=...)`: torch waits for a copy from pageable memory). On a CPU none of them costs
anything, so a test cannot see them by timing; this guard sees them by name. A dispatch is
allowed exactly one such read, the count exchange (`dispatch/comm.py::exchange_counts`): inside
it nothing is recorded, and what it returns is the host copy, so reads of that copy, and of
tensors computed from host tensors alone, are host work and fine (the guard follows that through
every operator).

    with HostReadGuard() as guard:
        ...
    assert not guard.violations, guard.violations

TorchDispatchMode is per thread: work on other threads (the CPU's exchange thread) is not seen,
except `.tolist()` / `.numpy()`, which are patched for every thread while the guard is active.
Blind spots on a CPU: `.cpu()` / `.to("cpu")` of device data returns the tensor itself there (its
later host use is flagged), and `.to(device)` of host data is no copy at all. On a GPU,
tests/test_cuda_layer.py runs CUDA's own sync detector over the layer instead.
"""
from __future__ import annotations

import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# op name (overload dropped) -> why it syncs a CUDA stream with the host
SYNCING_OPS = {
    "_local_scalar_dense": "item() / int() / float() / bool() of a tensor",
    "is_nonzero": "bool() of a tensor",
    "equal": "torch.equal returns a host bool",
    "nonzero": "output size depends on the data",
    "masked_select": "output size depends on the data",
    "unique": "output size depends on the data",
    "_unique": "output size depends on the data",
    "_unique2": "output size depends on the data",
    "unique_dim": "output size depends on the data",
    "unique_consecutive": "output size depends on the data",
    "bincount": "the CUDA kernel reads min and max on the host",
}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage object itself (kept alive), not its data pointer


class HostReadGuard(TorchDispatchMode):
    """Records `violations` (what, why, where) of host reads of device data in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self._host: set[int] = set()  # storages of host data: the count exchange's copy and what follows from it
        self._alive: list[torch.Tensor] = []  # keeps them allocated: a freed pointer must not mark device data as host
        self._paused = 0
        self._saved: dict[str, Any] = {}
        self.count_exchanges = 0  # count exchanges run in the block (a test can check the guard saw them)

    # ---- bookkeeping --------------------------------------------------------------------------
    def _where(self) -> str:
        frames = [f for f in traceback.extract_stack()[:-3] if "c2r_comm" in f.filename]
        return " <- ".join(f"{f.filename.split('c2r_comm/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))

    def _flag(self, what: str, why: str) -> None:
        self.violations.append(f"{what} ({why}) at {self._where() or '?'}")

    def _mark_host(self, t: torch.Tensor) -> None:
        self._host.add(_storage(t))
        self._alive.append(t)

    def _is_host(self, t: torch.Tensor) -> bool:
        return _storage(t) in self._host

    # ---- the mode ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        # lift_fresh: a tensor made from Python data (torch.tensor([...]), a list used as an index)
        all_host = name in ("lift_fresh", "lift_fresh_copy") or \
            (bool(tensors) and all(self._is_host(t) for t in tensors))
        if not self._paused and not all_host:
            if name in SYNCING_OPS:
                self._flag(f"aten.{name}", SYNCING_OPS[name])
            elif name in ("repeat_interleave",) and kwargs.get("output_size") is None:
                self._flag("aten.repeat_interleave without output_size", "output size depends on the data")
            elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
                    if i is not None):
                self._flag(f"aten.{name} with a boolean mask", "runs nonzero on the mask")
        out = func(*args, **kwargs)
        if not self._paused:
            for t in tree_flatten(out)[0]:  # in-place and out= results included
                if isinstance(t, torch.Tensor):
                    if all_host:
                        self._mark_host(t)
                    else:  # device data written into it: no longer host data
                        self._host.discard(_storage(t))
        return out

    # ---- host reads that do not go through the dispatcher --------------------------------------
    def _patched(self, method: str):
        orig = self._saved[method]
        guard = self

        def read(t: torch.Tensor, *a, **k):
            if not guard._paused and t.numel() and not guard._is_host(t):
                guard._flag(f"Tensor.{method}()", "copies device data to the host")
            return orig(t, *a, **k)
        return read

    def _patched_factory(self, name: str):
        orig = self._saved[name]
        guard = self

        def make(data, *a, **k):
            device = k.get("device")
            if not guard._paused and device is not None and not isinstance(data, torch.Tensor):
                guard._flag(f"torch.{name}(..., device=...)", "copies host data to the device and waits for it")
            return orig(data, *a, **k)
        return make

    def __enter__(self):
        import c2r_comm.dispatch.base as base

        for name in ("tensor", "as_tensor"):
            self._saved[name] = getattr(torch, name)
            setattr(torch, name, self._patched_factory(name))

        for method in ("tolist", "numpy"):
            self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._patched(method))
        self._saved["exchange_counts"] = orig = base.exchange_counts

        def exchange_counts(*a, **k):  # the one allowed host sync: its result is host data
            self.count_exchanges += 1
            self._paused += 1
            try:
                counts = orig(*a, **k)
            finally:
                self._paused -= 1
            for t in (counts.recv_WC, counts.sent_WC):
                self._mark_host(t)
            return counts
        base.exchange_counts = exchange_counts
        return super().__enter__()

    def __exit__(self, *exc):
        import c2r_comm.dispatch.base as base

        try:
            return super().__exit__(*exc)
        finally:
            base.exchange_counts = self._saved["exchange_counts"]
            for method in ("tolist", "numpy"):
                setattr(torch.Tensor, method, self._saved[method])
            for name in ("tensor", "as_tensor"):
                setattr(torch, name, self._saved[name])
