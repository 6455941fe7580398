"""Run plots (PNG, Agg backend: no display needed) and the end-of-run per-epoch table.

Everything here reads what the run already wrote (``metrics.jsonl``, ``train_log.jsonl``,
``per_label_validation.json``), so plots can be redrawn for a finished or resumed run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radtrain.io import write_json

PLOTS_DIR = "plots"
PER_LABEL_FILE = "per_label_validation.json"

# (column title, key in the row, format). Missing keys print as "-": an MLM run has no F1.
_LOSS_COLUMNS = (
    ("epoch", "epoch", "{:.2f}"),
    ("step", "step", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("val loss", "loss", "{:.4f}"),
)
CLASSIFY_COLUMNS = (
    *_LOSS_COLUMNS,
    ("P micro", "precision_micro", "{:.4f}"),
    ("R micro", "recall_micro", "{:.4f}"),
    ("F1 micro", "f1", "{:.4f}"),
    ("P macro", "precision_macro", "{:.4f}"),
    ("R macro", "recall_macro", "{:.4f}"),
    ("F1 macro", "f1_macro", "{:.4f}"),
    ("exact match", "exact_match", "{:.4f}"),
    ("hamming", "hamming_loss", "{:.5f}"),
    ("label acc", "label_accuracy", "{:.5f}"),
)
MLM_COLUMNS = (
    *_LOSS_COLUMNS,
    ("perplexity", "perplexity", "{:.2f}"),
    ("accuracy", "accuracy", "{:.4f}"),
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl log; a torn last line (a kill mid-write) is skipped, not fatal."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def with_train_loss(history: Sequence[dict[str, Any]], train_log: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each evaluation row plus ``train_loss``: the mean of the logged training-loss windows that
    ended after the previous evaluation and at or before this one. Windows are
    ``train.log_every_steps`` long, so this is an approximation of the epoch's loss; it is missing
    ("-") when no window ended in that interval."""
    rows, previous = [], -1
    for row in sorted(history, key=lambda r: r["step"]):
        losses = [r["train_loss"] for r in train_log if previous < r.get("step", -1) <= row["step"]]
        rows.append({**row, "train_loss": float(np.mean(losses)) if losses else None})
        previous = row["step"]
    return rows


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(int(value) if fmt == "{:d}" else value)
    except (TypeError, ValueError):
        return str(value)


def epoch_table(rows: Sequence[dict[str, Any]], phase: str = "classify", best_step: int | None = None) -> str:
    """The series' per-epoch table as fixed-width text; the best row is marked with '*'."""
    columns = CLASSIFY_COLUMNS if phase == "classify" else MLM_COLUMNS
    header = [title for title, _, _ in columns]
    body = [[_cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row, cells in zip(rows, body, strict=True):
        mark = " *" if best_step is not None and row.get("step") == best_step else ""
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + mark)
    return "\n".join(lines)


def save_per_label(
    path: Path, cuis: Sequence[str], train_counts: Sequence[int], support: np.ndarray,
    f1_fixed: np.ndarray, f1_tuned: np.ndarray | None, threshold: float = 0.5,
) -> None:
    """Per-label validation F1 of the best model (written by the best-model hook, read by the plot)."""
    data = {
        "cuis": list(cuis),
        "train_count": [int(c) for c in train_counts],
        "validation_support": [int(s) for s in support],
        "f1": [round(float(v), 5) for v in f1_fixed],
        "f1_tuned": None if f1_tuned is None else [round(float(v), 5) for v in f1_tuned],
        "threshold": float(threshold),
    }
    write_json(path, data, indent=None)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on a cluster node; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: Sequence[dict[str, Any]], train_log: Sequence[dict[str, Any]], out: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train_log:
        ax.plot([r["epoch"] for r in train_log], [r["train_loss"] for r in train_log], label="training", alpha=0.7)
    if rows:
        ax.plot([r["epoch"] for r in rows], [r.get("loss") for r in rows], "o-", label="validation")
    losses = [r["train_loss"] for r in train_log] + [r.get("loss") for r in rows]
    if losses and all(isinstance(v, (int, float)) and v > 0 for v in losses):
        ax.set_yscale("log")  # the first steps' loss is many times the plateau: keep the plateau visible
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_f1(rows: Sequence[dict[str, Any]], out: Path, threshold: float = 0.5) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    epochs = [r["epoch"] for r in rows]
    for key, label in (("f1", "micro F1"), ("f1_macro", "macro F1"), ("f1_samples", "samples F1")):
        if any(key in r for r in rows):
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation F1 (threshold {threshold:g})")
    ax.set_title("Validation F1 over epochs")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_per_label(per_label: dict[str, Any], out: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = np.asarray(per_label["train_count"], dtype=float)
    # A label no validation caption carries has no F1 (drawn at 0 it looked like a label the model
    # gets wrong): left out, and counted in the title.
    support = np.asarray(per_label.get("validation_support") or [1] * len(counts))
    shown = support > 0
    threshold = per_label.get("threshold", 0.5)
    ax.scatter(counts[shown], np.asarray(per_label["f1"])[shown], s=9, alpha=0.5, label=f"threshold {threshold:g}")
    if per_label.get("f1_tuned") is not None:
        ax.scatter(counts[shown], np.asarray(per_label["f1_tuned"])[shown], s=9, alpha=0.5, marker="x",
                   label="tuned thresholds")
    ax.set_xscale("log")
    ax.set_xlabel("training captions with the label (log scale)")
    ax.set_ylabel("validation F1 of the label")
    hidden = int((~shown).sum())
    # Two lines: the counts on one line with the title overran a 7-inch figure and were cut.
    ax.set_title(f"Per-label F1 against label frequency\n({int(shown.sum())} labels"
                 + (f"; {hidden} absent from validation, not shown)" if hidden else ")"))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_plots(run_dir: Path, phase: str, history: Sequence[dict[str, Any]] | None = None) -> list[Path]:
    """Draw the run's plots into ``run_dir/plots``; returns the files written."""
    run_dir = Path(run_dir)
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    train_log = read_jsonl(run_dir / "train_log.jsonl")
    rows = sorted(history if history is not None else read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    written = [plot_losses(rows, train_log, out_dir / "loss.png")]
    if phase == "classify":
        from radtrain.config import read_saved_config

        saved = read_saved_config(run_dir)
        written.append(plot_f1(rows, out_dir / "f1.png", saved.train.threshold if saved else 0.5))
        per_label_path = run_dir / PER_LABEL_FILE
        if per_label_path.is_file():
            written.append(plot_per_label(json.loads(per_label_path.read_text()), out_dir / "per_label_f1.png"))
    return written
