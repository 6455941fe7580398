"""GPU benchmark: ModernBERT-large shape (random init) on one GPU, plain vs DeepSpeed ZeRO-2 vs ZeRO-3.

Not a pytest module (pytest collects test_*.py only): a script for a machine with CUDA. It runs the
real thing a user runs - ``accelerate launch --config_file accelerate_configs/<mode>.yaml
--num_processes 1 -m radtrain classify`` with ``model.name=scratch:large`` - once per mode, and
reports the peak GPU memory (``torch.cuda.max_memory_allocated``, whole run: training, the final
evaluation and the export) and the training throughput radtrain itself measures (summary.json:
captions/s over the training steps only, including the first, slower ones).

    python tests/gpu/bench_zero.py --out bench_zero.json            # plain, zero2, zero3
    python tests/gpu/bench_zero.py --modes zero3_offload --steps 60   # + CPU offload (compiles cpu_adam)

Data: the shared ROCO captions (../shared/data/roco_v1_radiology.jsonl) when present, else
radtrain's synthetic captions, whose lengths are ROCO-like (about 20 words). On one GPU ZeRO shards
nothing: the numbers show DeepSpeed's own cost and memory layout (bf16 weights + fp32 master copy),
not the per-GPU savings with N GPUs (docs/deepspeed.md computes those).
Without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROCO = REPO.parent / "shared" / "data" / "roco_v1_radiology.jsonl"
MODES = {
    "plain": "single_gpu.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "zero3_offload": "deepspeed_zero3_offload.yaml",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(work: Path, given: str | None) -> tuple[str, str]:
    if given:
        return given, f"{Path(given).name} (--data)"
    if ROCO.is_file():
        return str(ROCO), "ROCO v1 radiology captions (shared/data)"
    from radtrain.data.synthetic import write_dataset

    out = write_dataset(work / "synthetic", n_train=8000, n_validation=500, n_test=500, seed=0)
    return str(out), "radtrain synthetic captions (ROCO-like lengths)"


def worker(run_dir: str, overrides: list[str]) -> None:
    """Inside accelerate launch: one radtrain classify run, then its peak memory and throughput."""
    import torch

    from radtrain.config import load_config
    from radtrain.phase import run_phase

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = run_phase(load_config(None, [*overrides, f"output_dir={run_dir}"]), "classify")
    result = {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "captions_per_s": summary["throughput"]["captions_per_s"],
        "real_tokens_per_s": summary["throughput"]["real_tokens_per_s"],
        "steps": summary["global_steps"],
        "global_batch": summary["train"]["global_batch"],
        "mean_caption_tokens": summary["train"]["mean_caption_tokens"],
        "wall_s": time.perf_counter() - started,
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print("BENCH_RESULT " + json.dumps(result), flush=True)


def versions() -> dict[str, str]:
    import accelerate
    import deepspeed
    import torch
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="plain,zero2,zero3", help=f"comma-separated, from {sorted(MODES)}")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32, help="train.batch_size (per GPU)")
    parser.add_argument("--data", help="captions (default: ../shared/data/roco_v1_radiology.jsonl, else synthetic)")
    parser.add_argument("--work", default="/tmp/radtrain_bench_zero")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per mode before it is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        worker(args.run_dir, rest)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench_zero: no CUDA device here; this benchmark needs one GPU (H100/H200)", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source, data_name = _data(work, args.data)
    overrides = [
        f"data.source={source}",
        "model.name=scratch:large",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        "train.lr=1e-4",
        "train.warmup_ratio=0.05",
        "train.precision=bf16",
        "train.save_total_limit=1",
        "data.max_length=256",
        "data.pad_to_multiple_of=32",
        # Packing asked for explicitly, so the modes differ by DeepSpeed alone. (packing=auto packs under
        # DeepSpeed too: accelerate reads bf16 from the JSON, which radtrain fills from train.precision;
        # checked on CPU ZeRO-2: accelerator.mixed_precision == "bf16" on both ranks.)
        "data.packing=on",
        "data.max_eval_samples=512",
        "data.min_label_count=5",
    ]
    env = dict(os.environ, RADTRAIN_PROGRESS="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("RADTRAIN_CACHE", str(work / "cache"))
    results = {"versions": versions(), "data": data_name, "settings": overrides, "modes": {}}
    for mode in args.modes.split(","):
        run_dir = work / f"run_{mode}"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / MODES[mode]),
            "--num_processes", "1", "--main_process_port", str(_free_port()),
            str(Path(__file__).resolve()), "--worker", "--run-dir", str(run_dir), *overrides,
        ]  # fmt: skip
        started = time.perf_counter()
        # Its own process group: on a timeout the launcher AND its workers go (an orphaned worker
        # would hold GPU memory through the next mode's measurement).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        # ...which the step's `timeout` (SIGTERM to bench_gpu.sh's process group) no longer reaches:
        # take the launcher's group down with this process, or it trains on through the next step.
        signal.signal(signal.SIGTERM, lambda signum, frame, pgid=proc.pid: _end_with_group(pgid, signum))
        try:
            out, _ = proc.communicate(timeout=args.timeout)
            line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                results["modes"][mode] = {"error": f"rc {proc.returncode}", "tail": out[-3000:]}
            else:
                results["modes"][mode] = json.loads(line.split(" ", 1)[1])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            results["modes"][mode] = {"error": f"timeout after {args.timeout} s", "tail": (out or "")[-3000:]}
        results["modes"][mode]["launch_s"] = round(time.perf_counter() - started, 1)
        print(mode, json.dumps(results["modes"][mode])[:400], flush=True)
        if args.out:  # after every mode: a lease that ends early still returns what was measured
            Path(args.out).write_text(json.dumps(results, indent=1))

    print(f"\n{results['versions']}\ndata: {data_name}; {' '.join(overrides[1:])}\n")
    print("| mode | peak allocated (GiB) | peak reserved (GiB) | captions/s | tokens/s |")
    print("|---|---|---|---|---|")
    for mode, r in results["modes"].items():
        if "error" in r:
            print(f"| {mode} | failed: {r['error']} | | | |")
        else:
            print(f"| {mode} | {r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | "
                  f"{r['captions_per_s']:.0f} | {r['real_tokens_per_s']:.0f} |")
    return 0 if all("error" not in r for r in results["modes"].values()) else 1


def _end_with_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    sys.exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
