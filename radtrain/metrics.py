"""Multi-label metrics with the series' names, computed in numpy.

Conventions (checked against scikit-learn in tests/test_metrics.py):
- micro/macro precision, recall, F1 as sklearn with ``zero_division=0`` (the seed's setting);
  macro averages over every label of the label space, including labels absent from the split.
- ``exact_match``: subset accuracy; ``hamming_loss``: share of wrong label decisions;
  ``label_accuracy`` = 1 - hamming_loss.
- ``f1_samples``: the per-caption F1 that ImageCLEF uses for ROCOv2, averaged over captions; a
  caption with no true and no predicted labels scores 1 (sklearn's ``zero_division=1``). Its
  truth is the caption's whole gold CUI set, as ImageCLEF's scorer reads it: the gold CUIs
  outside the label space (``true_outside``, per caption; no model here can predict them) count
  as missed. Every other metric, as the series' MultiLabelBinarizer, sees the label space only.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = (
    "precision_micro",
    "recall_micro",
    "f1",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "exact_match",
    "hamming_loss",
    "label_accuracy",
    "f1_samples",
)
LOWER_IS_BETTER = {"hamming_loss", "loss", "perplexity"}


def _safe_div(num: np.ndarray, den: np.ndarray, default: float = 0.0) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, default, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def multilabel_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, true_outside: np.ndarray | None = None
) -> dict[str, float]:
    """y_true, y_pred: (n_samples, n_labels) arrays of 0/1; true_outside: per sample, the gold
    labels outside the label space (counted by ``f1_samples`` only; None: none)."""
    t = np.asarray(y_true).astype(bool, copy=False)
    p = np.asarray(y_pred).astype(bool, copy=False)
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: targets {t.shape} vs predictions {p.shape}")
    outside = np.zeros(len(t)) if true_outside is None else np.asarray(true_outside, dtype=np.float64)
    if outside.shape != (len(t),):
        raise ValueError(f"true_outside has shape {outside.shape}; expected ({len(t)},)")
    tp_l = (t & p).sum(0)
    fp_l = (~t & p).sum(0)
    fn_l = (t & ~p).sum(0)
    tp, fp, fn = tp_l.sum(), fp_l.sum(), fn_l.sum()
    precision_micro = float(_safe_div(tp, tp + fp))
    recall_micro = float(_safe_div(tp, tp + fn))
    f1_micro = float(_safe_div(2 * tp, 2 * tp + fp + fn))
    precision_l = _safe_div(tp_l, tp_l + fp_l)
    recall_l = _safe_div(tp_l, tp_l + fn_l)
    f1_l = _safe_div(2 * tp_l, 2 * tp_l + fp_l + fn_l)
    tp_s = (t & p).sum(1)
    f1_s = _safe_div(2 * tp_s, t.sum(1) + outside + p.sum(1), default=1.0)
    hamming = float((t != p).mean()) if t.size else 0.0
    return {
        "precision_micro": precision_micro,
        "recall_micro": recall_micro,
        "f1": f1_micro,
        "precision_macro": float(precision_l.mean()) if t.shape[1] else 0.0,
        "recall_macro": float(recall_l.mean()) if t.shape[1] else 0.0,
        "f1_macro": float(f1_l.mean()) if t.shape[1] else 0.0,
        "exact_match": float((t == p).all(1).mean()) if len(t) else 0.0,
        "hamming_loss": hamming,
        "label_accuracy": 1.0 - hamming,
        "f1_samples": float(f1_s.mean()) if len(t) else 0.0,
    }


def per_label_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    t = np.asarray(y_true).astype(bool, copy=False)
    p = np.asarray(y_pred).astype(bool, copy=False)
    tp = (t & p).sum(0)
    return _safe_div(2 * tp, 2 * tp + (~t & p).sum(0) + (t & ~p).sum(0))


def is_better(metric: str, new: float, best: float | None) -> bool:
    # A non-finite value (a diverged evaluation) is never better: as a first best it would stay
    # best forever, since every comparison with NaN is false.
    if new is None or not np.isfinite(new):
        return False
    if best is None or not np.isfinite(best):
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best
