"""Tokenized splits, cached on disk and shared across runs and phases.

A split is stored as one flat int32 array of token ids plus offsets: 60k captions take a few
megabytes and load in milliseconds. The cache key covers the tokenizer (its full JSON), the
maximum length and the exact texts, so a stale entry can never be picked up.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radtrain.io import replacing

TOKENIZE_CHUNK = 4096


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """radtrain's cache folder: data.cache_dir, else $RADTRAIN_CACHE, else ~/.cache/radtrain.
    Holds tokens/ (tokenized splits) and inductor/ (torch.compile's caches)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("RADTRAIN_CACHE", Path.home() / ".cache" / "radtrain")).expanduser()


@dataclass
class TokenizedSplit:
    """Token ids per caption (with special tokens), truncated to max_length, and its labels.

    Labels are kept sparse (each caption's label indices) and made multi-hot per batch: dense
    float32 targets of 60k captions x 9k CUIs are 2.2 GB on every rank, the sparse ones a few MB.
    """

    ids: np.ndarray  # int32, all captions concatenated
    offsets: np.ndarray  # int64, len = n + 1
    # Caption i's label indices are label_columns[label_offsets[i] : label_offsets[i + 1]].
    label_offsets: np.ndarray | None = None  # int64, len = n + 1
    label_columns: np.ndarray | None = None  # int32, ascending within a caption
    num_labels: int = 0
    targets_outside: np.ndarray | None = None  # int32 (n,): gold CUIs outside the label space (metrics only)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def has_targets(self) -> bool:
        return self.label_offsets is not None

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def set_labels(self, label_offsets: np.ndarray, label_columns: np.ndarray, num_labels: int) -> None:
        if len(label_offsets) != len(self.offsets):
            raise ValueError(f"labels for {len(label_offsets) - 1} captions, but the split has {len(self)}")
        if len(label_columns) and not 0 <= int(label_columns.min()) <= int(label_columns.max()) < num_labels:
            raise ValueError(f"label indices outside 0..{num_labels - 1}")
        # A Python int: the digest hashes its repr, and np.int64(5) is not 5 there.
        self.label_offsets, self.label_columns, self.num_labels = label_offsets, label_columns, int(num_labels)

    def targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 multi-hot targets (len(rows), num_labels) of these captions; rows=None: the
        whole split (n x num_labels dense: 2.2 GB at 60k x 9k, so for small splits and tests)."""
        if self.label_offsets is None or self.label_columns is None:
            raise ValueError("this split has no labels")
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"caption indices must lie in 0..{len(self) - 1} (collate maps filler rows, -1, to 0)")
        starts = self.label_offsets[rows]
        counts = self.label_offsets[rows + 1] - starts
        # Index of every (caption, label) pair in label_columns, caption after caption.
        take = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        dense = np.zeros((len(rows), self.num_labels), dtype=np.float32)
        dense[np.repeat(np.arange(len(rows)), counts), self.label_columns[take]] = 1.0
        return dense

    def digest(self) -> str:
        """Hash of what training reads: every caption's token ids, in order, and the targets.
        (Token ids cover the texts, the tokenizer and max_length; targets cover the label space.)

        The targets are hashed as the dense float32 matrix they become, in row chunks: the digest
        stays the one that checkpoints written before they were kept sparse recorded."""
        h = hashlib.sha256()
        for array in (self.ids, self.offsets):
            h.update(str((array.dtype.str, array.shape)).encode())
            h.update(np.ascontiguousarray(array).data)
        if self.has_targets:
            h.update(str(("<f4", (len(self), self.num_labels))).encode())
            chunk = max(1, (1 << 24) // max(1, 4 * self.num_labels))  # ~16 MB of targets at a time
            for start in range(0, len(self), chunk):
                h.update(self.targets(np.arange(start, min(start + chunk, len(self)))).data)
        return h.hexdigest()[:16]


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def tokenize_texts(tokenizer, texts: list[str], max_length: int, cache_dir: str | Path | None = None) -> TokenizedSplit:
    """Tokenize (or load from cache) with truncation to max_length; no padding here."""
    tokens_dir = cache_root(cache_dir) / "tokens"
    key = hashlib.sha256(
        f"{_tokenizer_digest(tokenizer)}|{max_length}|{_texts_digest(texts)}".encode()
    ).hexdigest()[:32]
    path = tokens_dir / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return TokenizedSplit(ids=data["ids"], offsets=data["offsets"])
        except (OSError, ValueError, KeyError):
            pass  # a torn cache file is rebuilt below
    pieces: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        encoded = tokenizer(
            texts[start : start + TOKENIZE_CHUNK], truncation=True, max_length=max_length, add_special_tokens=True
        )
        pieces.extend(encoded["input_ids"])
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(offsets[-1]))
    split = TokenizedSplit(ids=ids, offsets=offsets)
    try:
        tokens_dir.mkdir(parents=True, exist_ok=True)
        with replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, ids=ids, offsets=offsets)
    except OSError:
        pass  # caching is an optimisation; a read-only home must not fail the run
    return split
