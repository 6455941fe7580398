"""Count the operators a training step dispatches: the kernel launches a GPU step waits on,
measured on any device.

At ROCO caption lengths an eager GPU step is launch-bound: on an H100 the step time followed the
number of kernels, not the FLOPs, and the GPU sat idle half of each step (docs/benchmarks.md).
Every ATen operator that computes something launches at least one kernel, so the operator count of
a step is a deterministic stand-in for its launches that a CPU run (and a test) can measure.
Views, aliases (``view``, ``transpose``, ``detach``...) and bare allocations (``empty``) launch
nothing and are not counted. Work
compiled by ``torch.compile`` runs Inductor's own fused kernels, which this does not see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operators that launch no kernel: aliases of their input (not flagged as views) and bare allocations.
_NO_KERNEL = {"detach", "_unsafe_view", "alias", "lift_fresh", "empty", "empty_like", "empty_strided"}
# Operators the host must wait for the device to finish before it can go on: a value read back
# (.item(), bool()), or an output whose size depends on the values (boolean-mask indexing is
# nonzero underneath). On a GPU each drains the queue of launched kernels mid-step.
_SYNCING = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount",
    "equal",
}


class OpCounter(TorchDispatchMode):
    """Counts the computing ATen operators dispatched while active (backward passes included),
    by operator name. With ``device_type`` ("cuda"), only operators that touch a tensor on such a
    device: the host's own work on CPU tensors (packing a batch, say) launches no kernel."""

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        """Operators among them that make the host wait for the device (see ``_SYNCING``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL and self._on_device(args, kwargs, out):
            self.counts[name] += 1
            if (
                name in _SYNCING
                or _boolean_index(name, args)
                or _sized_by_values(name, args, kwargs)
                or self._read_back(name, args, kwargs, out)
            ):
                self.syncs[name] += 1
        return out

    def _on_device(self, args, kwargs, out) -> bool:
        if self.device_type is None:
            return True
        leaves = tree_leaves((args, kwargs, out))
        return any(isinstance(x, torch.Tensor) and x.device.type == self.device_type for x in leaves)

    def _read_back(self, name: str, args, kwargs, out) -> bool:
        """A blocking copy from the device to the host (``.cpu()``, ``.tolist()``); on a CPU run
        there is no such device, so these can only be seen on the GPU itself."""
        if self.device_type is None or name not in ("_to_copy", "copy_"):
            return False
        if (kwargs or {}).get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]):
            return False
        source, target = (args[0], out) if name == "_to_copy" else (args[1], args[0])
        tensors = isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor)
        return tensors and source.device.type == self.device_type and target.device.type == "cpu"

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _boolean_index(name: str, args) -> bool:
    """``x[mask]`` (and its backward): indices that are a boolean tensor."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())


def _sized_by_values(name: str, args, kwargs) -> bool:
    """repeat_interleave with tensor repeats and no ``output_size``: its size is their sum."""
    if name != "repeat_interleave" or (kwargs or {}).get("output_size") is not None:
        return False
    repeats = args[1] if len(args) > 1 else args[0]  # (self, repeats) or (repeats,)
    return isinstance(repeats, torch.Tensor)


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Operators dispatched by ``fn()``, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


__all__ = ["OpCounter", "count_ops"]
