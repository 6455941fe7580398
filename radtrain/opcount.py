"""Count the operators a training step dispatches: the kernel launches a GPU step waits on,
measured on any device.

At ROCO caption lengths an eager GPU step is launch-bound: on an H100 the step time followed the
number of kernels, not the FLOPs, and the GPU sat idle half of each step (docs/benchmarks.md).
Every ATen operator that computes something launches at least one kernel, so the operator count of
a step is a deterministic stand-in for its launches that a CPU run (and a test) can measure.
Views and aliases (``view``, ``transpose``, ``detach``...) launch nothing and are not counted. Work
compiled by ``torch.compile`` runs Inductor's own fused kernels, which this does not see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# Operators that return an alias of their input without computing (not flagged as views).
_ALIASES = {"detach", "_unsafe_view", "alias", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the computing ATen operators dispatched while active (backward passes included),
    by operator name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _ALIASES:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Operators dispatched by ``fn()``, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


__all__ = ["OpCounter", "count_ops"]
