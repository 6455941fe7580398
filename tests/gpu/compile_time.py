"""Cold-start compile time and step time: whole-model torch.compile vs layer by layer (what
``train.compile=true`` does, ``radtrain.models.compile_in_place``), on packed batches of real
captions. Each mode runs in a fresh process (Dynamo's caches are per process); a mode named twice
runs again with Inductor's cache filled by the first (the warm start of a requeued job).

    python tests/gpu/compile_time.py --data ../shared/data/roco_v1_radiology.jsonl --model scratch:base \
        --batch 512 --steps 5 --out compile_time.json

On a CPU it runs in fp32 with the block attention; on a GPU in bf16 with the varlen kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from radtrain import models
    from radtrain.bench import _Shared, _step_groups, build_trainer, preset_config

    device_precision = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = preset_config("user", None, [
        f"data.source={args.data}", f"model.name={args.model}", f"train.batch_size={args.batch}",
        "data.packing=on", f"train.precision={device_precision}", "data.min_label_count=10",
    ])
    work = Path(tempfile.mkdtemp(prefix="compile-time-"))
    shared = _Shared(cfg, "classify", work)
    trainer, model = build_trainer(cfg, shared, work / "run")
    if mode == "whole":
        model.compile(dynamic=True)
    elif mode == "layers":
        models.compile_in_place(model, dynamic=True)
    groups = _step_groups(trainer)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    trainer._step(*next(groups))  # compiles forward and backward
    sync()
    first = time.perf_counter() - t0
    trainer._step(*next(groups))  # another length: must not compile again
    sync()
    t1 = time.perf_counter()
    for _ in range(args.steps):
        trainer._step(*next(groups))
    sync()
    step_s = (time.perf_counter() - t1) / args.steps
    from torch._dynamo.utils import counters

    return {
        "mode": mode, "model": args.model, "batch": args.batch, "device": str(trainer.acc.device),
        "first_step_s": round(first, 2), "step_ms": round(1000 * step_s, 1),
        "graphs": int(counters["stats"]["unique_graphs"]), "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="scratch:base")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="eager,layers,whole")
    p.add_argument("--timeout", type=int, default=600, help="per mode")
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this mode in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)), flush=True)
        return
    rows = []
    # One fresh Inductor cache for this invocation: a mode's first run compiles from cold, and a
    # mode named twice (--modes eager,layers,layers) measures the warm start a filled cache gives
    # (radtrain keeps it in data.cache_dir/inductor: models.use_compile_cache).
    cache = Path(tempfile.mkdtemp(prefix="compile-time-inductor-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--data", args.data, "--model", args.model,
               "--batch", str(args.batch), "--steps", str(args.steps)]
        warm = mode != "eager" and any(cache.rglob("*.py"))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                "mode": mode, "error": done.stderr[-600:]}
        except subprocess.TimeoutExpired:
            row = {"mode": mode, "error": f"did not finish within {args.timeout} s"}
        row["inductor_cache"] = "warm" if warm else "cold"
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
