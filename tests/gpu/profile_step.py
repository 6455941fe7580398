"""Where does a training step's time go? Profile the real ``Trainer._step`` of one bench preset.

    python tests/gpu/profile_step.py --data captions.jsonl --model scratch:base train.batch_size=512

Builds the preset exactly as ``radtrain bench`` does (the user's overrides on radtrain's defaults),
runs ``--warmup`` steps, then profiles ``--steps`` steps with torch.profiler and prints: wall time
per step, the GPU's busy time per step (the union of its kernel intervals, so overlapping streams
are not counted twice) and the idle share, the top kernels/operators by device time and, on a
GPU, the top operators and CUDA runtime calls by host time. A GPU
that is idle a large share of the step is waiting on the host (kernel launches, collation, syncs);
one that is busy is limited by its kernels. Runs on a CPU too (then only host times are shown).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from radtrain.bench import PresetRun, _Shared, preset_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="scratch:base")
    parser.add_argument("--task", default="classify", choices=("classify", "mlm"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    overrides = [f"data.source={args.data}", f"model.name={args.model}", *args.overrides]
    cfg = preset_config("user", None, overrides)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="radtrain-profile-") as work:
        if cfg.data.cache_dir is None:
            cfg.data.cache_dir = str(Path(work) / "cache")
        shared = _Shared(cfg, args.task, Path(work))
        run = PresetRun("profiled", cfg, shared, Path(work))
        run.warm(args.warmup)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            run.run(args.steps)
            wall = time.perf_counter() - t0
    per_step = wall / args.steps
    print(f"settings: {run.row().settings}")
    print(f"wall per step: {1000 * per_step:.1f} ms (profiler overhead included)")
    if cuda:
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        busy = busy_seconds(kernels) / args.steps
        print(f"GPU busy per step: {1000 * busy:.1f} ms; idle {100 * (1 - busy / per_step):.0f}% of the step; "
              f"{len(kernels) / args.steps:.0f} kernels per step")
    averages = prof.key_averages()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    if cuda:  # the host's side of a launch-bound step: which operators and CUDA calls it waits on
        print("by host (self CPU) time:")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
