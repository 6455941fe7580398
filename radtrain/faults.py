"""Fault injection for the reliability tests: a TEST HOOK, inert unless ``RADTRAIN_FAULT`` is set.

The fault suite (tests/test_faults.py) must kill or disturb a run at exact moments: inside an
optimizer step, inside an evaluation, inside a checkpoint write (after the tensors, before the
``COMPLETE`` manifest), between the two renames of the ``best/`` swap. Sleeping and then sending
a signal from outside would hit those moments only by luck, so the code calls :func:`hit` at
each of them and this module acts when the environment asks for it.

``RADTRAIN_FAULT`` is a comma-separated list of ``POINT:WHEN[:ACTION][@RANK]``:

- POINT: ``step`` (after the backward passes of an optimizer step, before the update),
  ``forward`` (before each micro-batch's forward pass in training),
  ``eval`` (after an evaluation's forward passes, before its metrics row is written),
  ``checkpoint-write`` (tensors and trainer_state.json written, manifest not yet),
  ``checkpoint-shard`` (every rank, as it starts writing its part of a checkpoint: with
  ``@RANK``, one rank's part fails while the others write theirs),
  ``export`` (new ``best.tmp`` complete, old ``best/`` moved to ``best.old``, not yet swapped),
  ``result-write`` (the main process, about to append a row to ``metrics.jsonl`` or
  ``train_log.jsonl``, or to write ``summary.json``),
  ``nan`` (makes the training loss non-finite: exercises the real skip path through backward).
- WHEN: ``N`` or ``N-M``. For ``step`` and ``nan`` it is the optimizer step number being
  computed (1-based, the same numbers as ``global_step`` after the step), so a resumed process
  means the same step; for the other points it counts the hits in this process (1 = the first).
- ACTION: ``kill`` (default: SIGKILL this process, nothing flushed or cleaned up, as an OOM
  killer or a node failure would), ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk does),
  ``oom`` (raise ``torch.OutOfMemoryError``, what the CUDA allocator raises when a batch does not
  fit), or a signal name ``SIGTERM|SIGINT|SIGUSR1|SIGUSR2`` (sent to this process: the real
  handler runs, as for a scheduler's preemption notice).
- RANK: only the process of that global rank (``$RANK``, 0 in a single process) acts.

Examples: ``RADTRAIN_FAULT=checkpoint-write:2``, ``RADTRAIN_FAULT=step:7``,
``RADTRAIN_FAULT=nan:5-6``, ``RADTRAIN_FAULT=step:6:SIGUSR2,export:1:enospc``,
``RADTRAIN_FAULT=forward:2:oom``.

Cost when unset: one dictionary lookup per call (a few calls per optimizer step).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass

ENV = "RADTRAIN_FAULT"
POINTS = ("step", "forward", "eval", "checkpoint-write", "checkpoint-shard", "export", "result-write", "nan")
ACTIONS = ("kill", "enospc", "oom", "SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# Points whose WHEN is an optimizer step number rather than a count of hits in this process.
STEP_NUMBERED = ("step", "nan")


@dataclass(frozen=True)
class Fault:
    point: str
    first: int
    last: int
    action: str
    rank: int | None = None

    def covers(self, number: int) -> bool:
        here = self.rank is None or self.rank == int(os.environ.get("RANK", "0") or 0)
        return here and self.first <= number <= self.last


def parse(spec: str) -> list[Fault]:
    """Parse a RADTRAIN_FAULT value; a typo raises instead of silently injecting nothing."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        body, at, rank = item.partition("@")
        if at and not rank.isdigit():
            raise ValueError(f"{ENV}: {item!r}: @RANK must be a process rank (0, 1, ...)")
        parts = body.split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS:
            raise ValueError(f"{ENV}: {item!r} is not POINT:WHEN[:ACTION] with POINT one of {POINTS}")
        action = parts[2] if len(parts) == 3 else "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r}: action must be one of {ACTIONS}")
        first, _, last = parts[1].partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"{ENV}: {item!r}: WHEN must be N or N-M") from None
        faults.append(Fault(parts[0], lo, hi, action, int(rank) if at else None))
    return faults


_parsed: dict[str, list[Fault]] = {}
_hits: Counter[str] = Counter()


def _active(point: str) -> list[Fault]:
    spec = os.environ.get(ENV)
    if not spec:
        return []
    if spec not in _parsed:
        _parsed[spec] = parse(spec)
    return [f for f in _parsed[spec] if f.point == point]


def reset() -> None:
    """Count hits from 1 again (tests that inject faults in their own process)."""
    _hits.clear()


def hit(point: str, step: int | None = None) -> None:
    """Called by the code at the moment named ``point``; acts only if RADTRAIN_FAULT asks."""
    faults = _active(point)
    if not faults:
        return
    if point in STEP_NUMBERED:
        number = int(step or 0)
    else:
        _hits[point] += 1
        number = _hits[point]
    for fault in faults:
        if fault.covers(number):
            _act(fault, number)


def poison_loss(loss, step: int):
    """The training loss, times NaN at the optimizer steps ``nan:N-M`` names (else unchanged)."""
    if any(f.covers(step) for f in _active("nan")):
        return loss * float("nan")
    return loss


def _act(fault: Fault, number: int) -> None:
    print(f"[radtrain] {ENV}: {fault.action} at {fault.point} #{number}", file=sys.stderr, flush=True)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {fault.point} #{number})")
    elif fault.action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"out of memory (injected by {ENV} at {fault.point} #{number})")
    else:
        os.kill(os.getpid(), getattr(signal, fault.action))
