"""What radtrain's packed attention forward saves against transformers' own, in one process.

    python tests/gpu/packed_forward.py --data captions.jsonl --model scratch:base train.batch_size=512

Builds the same preset twice (the user's overrides on radtrain's defaults, packing on), gives one
of them transformers' ModernBertAttention forward back (``packing.use_stock_attention_forward``),
and runs both on the same batches from the same weights, interleaved in rounds: captions/s,
operators per step (the kernel launches, ``radtrain.opcount``), peak memory, final loss (equal:
the maths is the same). Runs on a GPU (the varlen kernel) or a CPU (block attention).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from radtrain import packing
    from radtrain.bench import PresetRun, _Shared, format_table, preset_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="scratch:base")
    parser.add_argument("--task", default="classify", choices=("classify", "mlm"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    overrides = [f"data.source={args.data}", f"model.name={args.model}", "data.packing=on", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="radtrain-packed-forward-") as work:
        cfgs = {name: preset_config("user", None, overrides) for name in ("radtrain", "transformers")}
        for cfg in cfgs.values():
            cfg.data.cache_dir = cfg.data.cache_dir or str(Path(work) / "cache")
        shared = _Shared(cfgs["radtrain"], args.task, Path(work))
        runs = [PresetRun(name, cfg, shared, Path(work)) for name, cfg in cfgs.items()]
        changed = packing.use_stock_attention_forward(runs[1].trainer.acc.unwrap_model(runs[1].trainer.model))
        assert changed > 0, "the radtrain run had no packed attention forward to take away"
        for run in runs:
            run.attempt("warm", args.warmup)
        for r in range(args.rounds):
            for run in runs:
                run.attempt("run", args.steps // args.rounds + (1 if r < args.steps % args.rounds else 0))
        for run in runs:
            run.count_ops(1)
        rows = [run.row() for run in runs]
    print(format_table(rows))
    ours, stock = rows
    if ours.captions_per_s and stock.captions_per_s:
        # Peak memory only from CUDA's allocator: a CPU's resident-set peak is not per preset.
        peak = (f"peak {ours.peak_memory_bytes / 2**20:.0f}/{stock.peak_memory_bytes / 2**20:.0f} MiB, "
                if "cuda" in ours.memory_method else "")
        print(f"radtrain's forward: {ours.captions_per_s / stock.captions_per_s:.3f}x the captions/s, "
              f"{ours.ops_per_step}/{stock.ops_per_step} operators per step, {peak}"
              f"final loss {ours.final_loss:.6f}/{stock.final_loss:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
