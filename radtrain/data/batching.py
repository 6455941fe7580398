"""Batch plans and collation.

The plan is computed from (seed, epoch) alone, so every rank derives the same global batches
without communication, and a resumed run can skip exactly the batches it already trained on.
Each global batch (``batch_size x world_size`` captions) is cut into one slice per rank: one
process with batch 8 and two processes with batch 4 see the same global batches, which is what
makes single- and multi-process runs comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from radtrain.data.tokens import TokenizedSplit

# Captions are shuffled, then sorted by length inside windows of this many global batches: enough
# to make batches nearly uniform in length, small enough to keep batches random across the epoch.
BUCKET_WINDOW = 64


def plan_epoch(
    lengths: np.ndarray, global_batch: int, seed: int, epoch: int, shuffle: bool = True, bucket: bool = True
) -> list[np.ndarray]:
    """Global batches (arrays of example indices) for one epoch."""
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if bucket:
        window = global_batch * BUCKET_WINDOW
        chunks = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            chunks.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        order = np.concatenate(chunks) if chunks else order
    batches = [order[i : i + global_batch] for i in range(0, n, global_batch)]
    if shuffle and bucket:
        # Sorting made neighbouring batches similar in length; shuffle their order back.
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of a global batch; shares differ by at most one caption."""
    bounds = np.linspace(0, len(batch), world_size + 1).round().astype(int)
    return batch[bounds[rank] : bounds[rank + 1]]


def eval_plan(n: int, lengths: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's evaluation batches.

    Batches are cut from the length-sorted captions the same way whatever the world size, and
    dealt round-robin to ranks, so a caption is always padded alongside the same neighbours: a
    run on 2 processes and ``radtrain evaluate`` on 1 compute the same logits. Every batch has
    ``batch_size`` rows (-1 marks filler) and every rank gets the same number of batches:
    ZeRO-3 gathers parameters inside forward, so a rank that skipped one would hang the others.
    """
    order = np.argsort(lengths, kind="stable")
    n_batches = max(1, -(-n // batch_size))
    n_batches = -(-n_batches // world_size) * world_size
    padded = np.full(n_batches * batch_size, -1, dtype=np.int64)
    padded[:n] = order
    batches = [padded[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    return batches[rank::world_size]


def padded_width(longest: int, pad_to_multiple_of: int = 1, pad_to_length: int | None = None) -> int:
    """The width ``collate`` pads a batch whose longest caption has ``longest`` tokens to."""
    if pad_to_length is not None:
        return max(pad_to_length, longest)
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def resolve_pad_multiple(setting: int | None, device_type: str) -> int:
    """data.pad_to_multiple_of, ``None`` resolved for the device the step runs on: 8 on a GPU,
    where every new shape redoes per-shape work (kernel choices, compiled graphs), and 1 on a CPU,
    where nothing is reused per shape and rounding widths up to 8 cost 7% of the captions/s of
    radtrain's default batches (docs/benchmarks.md)."""
    if setting is not None:
        return setting
    return 1 if device_type == "cpu" else 8


def packed_length(tokens: int, pad_to_multiple_of: int = 1) -> int:
    """The length ``packing.pack`` gives a packed row of ``tokens`` real tokens: a multiple of
    ``pad_to_multiple_of``, coarsened to about 1/64 of the row, so a run meets at most 64 lengths
    per doubling of the row (for a power-of-two multiple, as the defaults are; ~90 otherwise) and
    the filler stays under max(pad_to_multiple_of, tokens / 64).

    Why bound them: every new length is a new shape for each matrix product and compiled graph, so
    per-shape work (cuBLAS's kernel choice, Inductor's and CUDA graphs' per-shape code) is redone
    at every step of exactly packed rows and reused across steps of bounded ones. A matrix
    product's tiles (64-256 rows) compute up to the next tile boundary anyway, so the rounding costs
    the products little. ``pad_to_multiple_of=1`` packs exactly (docs/benchmarks.md)."""
    if pad_to_multiple_of <= 1 or tokens <= 0:
        return tokens
    coarse = 1 << max(tokens.bit_length() - 7, 0)
    step = pad_to_multiple_of * max(1, coarse // pad_to_multiple_of)
    return -(-tokens // step) * step


def collate(
    split: TokenizedSplit,
    indices: np.ndarray,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    pad_to_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch of captions. Index -1 marks a filler row (evaluation padding): it reuses
    caption 0 so shapes stay realistic, and ``index`` tells the gatherer to drop it."""
    real = np.where(indices < 0, 0, indices)
    rows = [split.row(int(i)) for i in real]
    width = padded_width(max(len(r) for r in rows), pad_to_multiple_of, pad_to_length)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = row
        attention[r, : len(row)] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "index": torch.from_numpy(indices.astype(np.int64)),
    }
    if split.has_targets:
        batch["labels"] = torch.from_numpy(split.targets(real))
    return batch
