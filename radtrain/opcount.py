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


class OpCounter(TorchDispatchMode):
    """Counts the computing ATen operators dispatched while active (backward passes included),
    by operator name. With ``device_type`` ("cuda"), only operators that touch a tensor on such a
    device: the host's own work on CPU tensors (packing a batch, say) launches no kernel."""

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL and self._on_device(args, kwargs, out):
            self.counts[func.overloadpacket.__name__] += 1
        return out

    def _on_device(self, args, kwargs, out) -> bool:
        if self.device_type is None:
            return True
        leaves = tree_leaves((args, kwargs, out))
        return any(isinstance(x, torch.Tensor) and x.device.type == self.device_type for x in leaves)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Operators dispatched by ``fn()``, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


__all__ = ["OpCounter", "count_ops"]
