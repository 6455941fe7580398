"""What the label space costs at ROCOv2 scale and beyond, per rank: building the training targets
(and the checkpoint's data digest over them), collating a batch, and tuning the decision
thresholds on a validation set. No model: these are the steps whose cost grows with
captions x labels.

    python tests/scale/label_scale.py --train 60000 --validation 10000 --labels 2000,9000 \
        --baseline-rev 8282d30 --out docs/bench/cpu_label_scale.json

``--baseline-rev`` also times the same steps with that git revision's ``thresholds.py`` and
``tokens.py`` (loaded from git into this process: the same data, the same run), so the rows
compare the two implementations under the same machine load.

Labels are synthetic CUIs drawn Zipf-like (a few frequent, most rare), 1 + Poisson(4) per caption
as ROCO's are; validation probabilities are sigmoid outputs of a weak model (positives a little
higher). Memory is tracemalloc's peak (numpy reports its buffers to it), so it counts exactly
what these steps allocate, not the interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def synthetic_labels(n: int, num_labels: int, rng: np.random.Generator) -> list[list[str]]:
    weights = 1.0 / np.arange(1, num_labels + 1) ** 0.9
    weights /= weights.sum()
    counts = 1 + rng.poisson(4, size=n)
    drawn = rng.choice(num_labels, size=int(counts.sum()), p=weights)
    labels, start = [], 0
    for k in counts:
        labels.append(sorted({f"C{c:07d}" for c in drawn[start : start + k]}))
        start += k
    return labels


def measured(fn):
    tracemalloc.start()
    begin = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - begin
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def module_at(rev: str, path: str, name: str):
    """``path`` (a module of this repository) as it was at git revision ``rev``, imported as ``name``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True)
    folder = Path(tempfile.mkdtemp(prefix="label_scale_"))
    (folder / f"{name}.py").write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(n_train: int, n_val: int, num_labels: int, baseline_rev: str | None, seed: int = 0) -> list[dict]:
    from radtrain import thresholds
    from radtrain.data import tokens
    from radtrain.data.batching import collate
    from radtrain.data.labels import LabelSpace

    rng = np.random.default_rng(seed)
    train_labels = synthetic_labels(n_train, num_labels, rng)
    val_labels = synthetic_labels(n_val, num_labels, rng)
    space = LabelSpace.fit(train_labels)
    lengths = rng.integers(8, 120, size=n_train)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(5, 30000, size=int(offsets[-1])).astype(np.int32)
    truth = space.encode(val_labels).astype(bool)
    logits = rng.normal(-4.0, 1.5, size=truth.shape).astype(np.float32) + 3.0 * truth
    probs = 1.0 / (1.0 + np.exp(-logits))
    del logits
    order = rng.permutation(n_train)[: 8 * 200]

    def current_split():
        split = tokens.TokenizedSplit(ids=ids, offsets=offsets)
        split.set_labels(*space.encode_sparse(train_labels, split_name="train"), num_labels=len(space))
        return split

    implementations = [("current", current_split, thresholds.tune_thresholds)]
    if baseline_rev:
        old_tokens = module_at(baseline_rev, "radtrain/data/tokens.py", "baseline_tokens")
        old_thresholds = module_at(baseline_rev, "radtrain/thresholds.py", "baseline_thresholds")

        def baseline_split():  # dense float32 targets, as that revision kept them
            split = old_tokens.TokenizedSplit(ids=ids, offsets=offsets)
            split.targets = space.encode(train_labels, split_name="train")
            return split

        implementations.insert(0, (baseline_rev, baseline_split, old_thresholds.tune_thresholds))

    rows = []
    for name, make_split, tune in implementations:
        def build(make_split=make_split):
            split = make_split()
            return split, split.digest()  # the checkpoint manager's data digest hashes the targets

        (split, digest), build_s, build_peak = measured(build)
        if name == "current":

            def collate_batches(split=split):
                for start in range(0, len(order), 8):
                    collate(split, order[start : start + 8], pad_id=0)

            _, collate_s, _ = measured(collate_batches)
        del split
        result, tune_s, tune_peak = measured(lambda tune=tune: tune(probs, truth, space.cuis, min_support=5))
        rows.append({
            "implementation": name,
            "train_captions": n_train,
            "validation_captions": n_val,
            "labels": len(space),
            "targets_and_digest_s": round(build_s, 3),
            "targets_and_digest_peak_bytes": build_peak,
            "data_digest": digest,
            "collate_ms_per_batch_of_8": round(1000 * collate_s / (len(order) / 8), 3) if name == "current" else None,
            "tune_thresholds_s": round(tune_s, 3),
            "tune_thresholds_peak_bytes": tune_peak,
            "global_threshold": result["global"],
            "per_label_thresholds_sha256": hashlib.sha256(
                json.dumps(result["per_label"], sort_keys=True).encode()
            ).hexdigest()[:16],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60000)
    parser.add_argument("--validation", type=int, default=10000)
    parser.add_argument("--labels", default="2000,9000", help="comma-separated label-space sizes")
    parser.add_argument("--baseline-rev", help="also time this git revision's implementation, in the same run")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [row for n in args.labels.split(",") for row in run(args.train, args.validation, int(n), args.baseline_rev)]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
