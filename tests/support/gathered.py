"""The bytes of gathered parameters alive during an FSDP step on sim, for tests that bound
them: every tensor an all-gather returns on device 0, its views and the copies made of it
(a parameter cut out of its unit's flat buffer), each followed until torch frees it.

    with gathered_bytes(mesh) as tracker:
        loss_fn().backward()
    tracker.peak, tracker.live
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torchmesh as tm

_COPIES = {torch.ops.aten.cat, torch.ops.aten.clone, torch.ops.aten._to_copy, torch.ops.aten.copy_}


class GatheredBytes(TorchDispatchMode):
    """Live bytes of the tracked tensors' storages, and their peak. A storage is live while
    some tensor object viewing it is (torch keeps a tensor's Python object while C++,
    autograd included, still holds the tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage -> live tensor objects viewing it
        self.nbytes: dict[int, int] = {}
        self.live = self.peak = 0

    def track(self, t: torch.Tensor, new: bool) -> None:
        key = t.untyped_storage()._cdata
        if new and key not in self.refs:
            self.refs[key], self.nbytes[key] = 0, t.untyped_storage().nbytes()
            self.live += self.nbytes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if torch.is_tensor(t) and t.untyped_storage()._cdata in self.refs
        }
        if inputs:
            for t in tree_flatten(out)[0]:
                if not torch.is_tensor(t):
                    continue
                if t.untyped_storage()._cdata in inputs:  # a view (or an in-place result)
                    self.track(t, new=False)
                elif func.overloadpacket in _COPIES:  # a copy of gathered parameters
                    self.track(t, new=True)
        return out


@contextmanager
def gathered_bytes(mesh: tm.Mesh) -> Iterator[GatheredBytes]:
    """Track, inside the block, the gathered parameters of `mesh` (a sim mesh)."""
    tracker = GatheredBytes()
    impl = mesh.impl
    gather = impl.all_gather

    def tracked_gather(ts, axis, dim, sizes=None):
        out = gather(ts, axis, dim, sizes)
        tracker.track(out[0], new=True)
        return out

    impl.all_gather = tracked_gather  # the instance's: prefetched (async) gathers call it too
    try:
        with tracker:
            yield tracker
    finally:
        del impl.all_gather
