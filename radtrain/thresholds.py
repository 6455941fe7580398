"""Decision thresholds tuned on VALIDATION outputs only, stored as the export's thresholds.json.

The series decides every CUI at a fixed 0.5. With hundreds of labels, most of them rare, the
sigmoid outputs of rare labels rarely cross 0.5, so recall (and macro F1) suffers. This module:

1. picks one global threshold that maximises micro F1 on validation (the model-selection metric);
2. for labels with at least ``min_support`` validation positives, picks the threshold that
   maximises that label's F1, then shrinks it toward the global one with a prior worth
   ``min_support`` captions: ``t = (n * t_label + m * t_global) / (n + m)``. A label with few
   positives has a noisy F1 curve (one caption moves it by a lot), so it stays near the global
   threshold; labels under ``min_support`` keep the global threshold exactly;
3. optionally always emits each caption's most probable label (``top1``; ImageCLEF scores every
   caption, and an empty prediction scores 0 there).

The functions take validation arrays and nothing else: no path, no split name, so they cannot
read test data. ``tune_thresholds`` returns the dict stored in ``best/thresholds.json``:
``{'global': float, 'per_label': {cui: float} | None, 'top1': bool, 'fixed': float, ...}``;
``fixed`` is the untuned threshold, used for the "at 0.5" figures next to the tuned ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from radtrain.metrics import multilabel_metrics

# 0.02 .. 0.95: finer steps buy nothing measurable with ~1k validation captions.
DEFAULT_GRID = np.round(np.arange(0.02, 0.951, 0.01), 4)


def apply_thresholds(probs: np.ndarray, thresholds: np.ndarray | float, top1: bool = False) -> np.ndarray:
    """Boolean predictions: prob >= threshold (per label or one number), plus the argmax if top1."""
    probs = np.asarray(probs)
    pred = probs >= np.asarray(thresholds, dtype=probs.dtype if probs.dtype.kind == "f" else np.float32)
    if top1 and probs.size:
        pred[np.arange(len(probs)), probs.argmax(1)] = True
    return pred


def threshold_vector(thresholds: dict[str, Any], cuis: Sequence[str]) -> np.ndarray:
    """The per-label threshold of each CUI in model order; labels without one use the global."""
    per_label = thresholds.get("per_label") or {}
    return np.array([per_label.get(c, thresholds["global"]) for c in cuis], dtype=np.float32)


def is_tuned(thresholds: dict[str, Any]) -> bool:
    """Whether the export carries a tuned decision rule, or one that differs from the plain fixed
    threshold: then reports add '_tuned' metrics (on validation and test alike, even when the
    tuning happened to land on the fixed threshold)."""
    fixed = thresholds.get("fixed", thresholds.get("global"))
    return (
        thresholds.get("tuned_on") is not None
        or bool(thresholds.get("per_label"))
        or bool(thresholds.get("top1"))
        or thresholds.get("global") != fixed
    )


def _top1_mask(probs: np.ndarray) -> np.ndarray:
    """Each caption's most probable output: predicted whatever the threshold under ``top1``."""
    forced = np.zeros(probs.shape, dtype=bool)
    if probs.size:
        forced[np.arange(len(probs)), probs.argmax(1)] = True
    return forced


def _best_on_grid(scores: np.ndarray, grid: np.ndarray) -> float:
    """The grid value with the best score; ties (flat F1 plateaus are common) resolve to the
    middle of the tied values, which generalises better than the plateau's edge."""
    tied = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(grid[tied[len(tied) // 2]])


def _counts_on_grid(
    probs: np.ndarray, truth: np.ndarray, forced: np.ndarray | None, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid value and label, the true positives, false positives and false negatives of the
    rule ``prob >= grid[g]`` (or forced): shape (len(grid), n_labels) each.

    One pass over the (n x L) matrix instead of one per grid value: each output gets the number
    of grid values it clears (``rank``), counted per label into a histogram; a suffix sum then
    gives, per grid value, how many outputs clear it. At 10k captions x 9k labels that is 5 s
    instead of 33 s. Counts are exact: ``probs`` (float32) against the grid in float32, the
    comparison ``apply_thresholds`` makes with the exported thresholds.
    """
    steps = len(grid)
    n_labels = truth.shape[1]
    predicted = np.zeros((n_labels, steps + 1), dtype=np.int64)  # histogram of rank per label
    hits = np.zeros((n_labels, steps + 1), dtype=np.int64)  # the same over gold positives
    column = np.arange(n_labels, dtype=np.int64) * (steps + 1)
    # Row chunks keep the 8-byte temporaries to ~16 MB each whatever the label count.
    chunk = max(1, (1 << 21) // max(1, n_labels))
    for start in range(0, len(probs), chunk):
        block = probs[start : start + chunk]
        # side="right": grid[g] <= p for g < rank, i.e. p clears exactly the first `rank` values.
        rank = np.searchsorted(grid, block, side="right")
        rank[np.isnan(block)] = 0  # NaN >= t is false: a diverged output is never predicted
        if forced is not None:
            rank[forced[start : start + chunk]] = steps  # top-1 outputs are predicted at every threshold
        flat = (rank + column).ravel()
        predicted += np.bincount(flat, minlength=predicted.size).reshape(predicted.shape)
        gold = truth[start : start + chunk].ravel()
        hits += np.bincount(flat[gold], minlength=hits.size).reshape(hits.shape)
    # cleared[:, g] = outputs with rank > g = those predicted positive at grid[g].
    cleared = np.cumsum(predicted[:, ::-1], axis=1)[:, ::-1][:, 1:]
    tp = np.cumsum(hits[:, ::-1], axis=1)[:, ::-1][:, 1:]
    support = truth.sum(0)
    return tp.T, (cleared - tp).T, (support[:, None] - tp).T


def tune_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    cuis: Sequence[str],
    *,
    min_support: int = 5,
    top1: bool = False,
    per_label: bool = True,
    fixed: float = 0.5,
    grid: np.ndarray | None = None,
    labels_outside: np.ndarray | None = None,
) -> dict[str, Any]:
    """Tune thresholds on validation probabilities ``probs`` and 0/1 ``labels`` (n_captions, n_labels);
    ``labels_outside``: per caption, gold CUIs outside the label space (for ``f1_samples``).

    Returns the thresholds.json dict, with the validation metrics at the fixed threshold and with
    the tuned rule (``validation_fixed`` / ``validation_tuned``) so reports need not recompute them.
    """
    probs = np.asarray(probs, dtype=np.float32)
    truth = np.asarray(labels).astype(bool, copy=False)
    if probs.shape != truth.shape:
        raise ValueError(f"probs {probs.shape} and labels {truth.shape} differ in shape")
    if probs.shape[1] != len(cuis):
        raise ValueError(f"{probs.shape[1]} label columns but {len(cuis)} CUIs")
    if min_support < 1:
        raise ValueError("min_support must be >= 1")
    # Decided in float32, as apply_thresholds decides with the exported (float) thresholds: an
    # output equal to float32(0.11) clears 0.11 there, so it must clear it here. (Compared in
    # float64 it did not, and the tuned rule was not the rule the export applied.) The values
    # reported stay the grid's own (0.11, not 0.10999999940).
    grid = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    grid32 = grid.astype(np.float32)
    if len(grid) == 0 or np.any(np.diff(grid32) <= 0):
        raise ValueError("the threshold grid must be non-empty and strictly increasing (in float32)")
    forced = _top1_mask(probs) if top1 else None

    # Global threshold: micro F1 over the grid; per-label F1 for the labels' own thresholds.
    tp, fp, fn = _counts_on_grid(probs, truth, forced, grid32)
    tp_all, fp_all, fn_all = tp.sum(1), fp.sum(1), fn.sum(1)
    denom = 2 * tp_all + fp_all + fn_all
    micro = np.where(denom > 0, 2 * tp_all / np.maximum(denom, 1), 0.0)
    label_denom = 2 * tp + fp + fn
    label_f1 = np.where(label_denom > 0, 2 * tp / np.maximum(label_denom, 1), 0.0)
    global_t = _best_on_grid(micro, grid) if len(truth) else fixed

    tuned: dict[str, float] | None = None
    support = truth.sum(0)
    if per_label:
        tuned = {}
        for j in np.flatnonzero(support >= min_support):
            if label_f1[:, j].max() <= 0:
                continue  # no threshold finds one of its captions: nothing to tune, the global one stays
            best = _best_on_grid(label_f1[:, j], grid)
            n = float(support[j])
            value = (n * best + min_support * global_t) / (n + min_support)
            tuned[cuis[j]] = round(float(value), 4)
        tuned = tuned or None

    result: dict[str, Any] = {
        "global": round(global_t, 4),
        "per_label": tuned,
        "top1": bool(top1),
        "fixed": float(fixed),
        "min_support": int(min_support),
        "tuned_on": "validation",
        "validation_captions": int(len(truth)),
        "labels_with_own_threshold": len(tuned or {}),
    }
    vector = threshold_vector(result, cuis)
    result["validation_fixed"] = multilabel_metrics(truth, apply_thresholds(probs, fixed), labels_outside)
    result["validation_tuned"] = multilabel_metrics(truth, apply_thresholds(probs, vector, top1), labels_outside)
    return result


def fixed_thresholds(fixed: float = 0.5, top1: bool = False) -> dict[str, Any]:
    """The untuned decision rule (train.tune_thresholds=false), in the same format."""
    return {"global": float(fixed), "per_label": None, "top1": bool(top1), "fixed": float(fixed)}


def thresholds_for_export(train_cfg, gathered: dict[str, np.ndarray], label_space, per_label_path=None) -> dict[str, Any]:
    """The best-model hook's thresholds from the gathered VALIDATION outputs of that model.

    ``train_cfg`` is the run's TrainConfig (tune_thresholds, threshold_min_support, always_top1,
    threshold). When ``per_label_path`` is given (main process), the per-label validation F1 at
    the fixed and tuned rule is saved there for the per-label plot.
    """
    from radtrain.metrics import per_label_f1
    from radtrain.tasks import MultiLabelTask

    _, probs, labels, outside = MultiLabelTask.ordered_outputs(gathered)
    cuis = label_space.cuis
    if train_cfg.tune_thresholds:
        result = tune_thresholds(
            probs, labels, cuis, min_support=train_cfg.threshold_min_support,
            top1=train_cfg.always_top1, fixed=train_cfg.threshold, labels_outside=outside,
        )
    else:
        result = fixed_thresholds(train_cfg.threshold, train_cfg.always_top1)
        if train_cfg.always_top1:
            truth = np.asarray(labels).astype(bool, copy=False)
            result["validation_tuned"] = multilabel_metrics(
                truth, apply_thresholds(probs, train_cfg.threshold, True), outside
            )
    if per_label_path is not None:
        from radtrain.plots import save_per_label

        f1_tuned = None
        if is_tuned(result):
            pred = apply_thresholds(probs, threshold_vector(result, cuis), result["top1"])
            f1_tuned = per_label_f1(labels, pred)
        save_per_label(
            per_label_path, cuis, label_space.counts, np.asarray(labels).sum(0),
            per_label_f1(labels, apply_thresholds(probs, train_cfg.threshold)), f1_tuned,
            threshold=train_cfg.threshold,
        )
    return result
