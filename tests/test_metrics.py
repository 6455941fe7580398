"""The metric code against scikit-learn on fixed arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_score, recall_score

from radtrain.metrics import METRIC_NAMES, is_better, multilabel_metrics


@pytest.fixture(params=[0, 1, 2])
def arrays(request):
    rng = np.random.default_rng(request.param)
    y_true = (rng.random((57, 23)) < 0.15).astype(int)
    y_pred = (rng.random((57, 23)) < 0.2).astype(int)
    y_true[:, 5] = 0  # a label absent from the split
    y_pred[:, 7] = 0  # a label never predicted
    y_true[3] = 0  # a caption without labels ...
    y_pred[3] = 0  # ... and without predictions (ImageCLEF counts it as F1 = 1)
    return y_true, y_pred


def test_matches_sklearn(arrays):
    y_true, y_pred = arrays
    got = multilabel_metrics(y_true, y_pred)
    expected = {
        "precision_micro": precision_score(y_true, y_pred, average="micro", zero_division=0),
        "recall_micro": recall_score(y_true, y_pred, average="micro", zero_division=0),
        "f1": f1_score(y_true, y_pred, average="micro", zero_division=0),
        "precision_macro": precision_score(y_true, y_pred, average="macro", zero_division=0),
        "recall_macro": recall_score(y_true, y_pred, average="macro", zero_division=0),
        "f1_macro": f1_score(y_true, y_pred, average="macro", zero_division=0),
        "exact_match": accuracy_score(y_true, y_pred),
        "hamming_loss": hamming_loss(y_true, y_pred),
        "label_accuracy": 1 - hamming_loss(y_true, y_pred),
        "f1_samples": f1_score(y_true, y_pred, average="samples", zero_division=1),
    }
    assert set(got) == set(METRIC_NAMES)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_perfect_and_empty_predictions():
    y = np.eye(4, dtype=int)
    assert multilabel_metrics(y, y)["f1"] == 1.0
    none = multilabel_metrics(y, np.zeros_like(y))
    assert none["f1"] == 0.0 and none["precision_micro"] == 0.0


def test_direction_of_best():
    assert is_better("f1", 0.5, 0.4) and not is_better("f1", 0.4, 0.5)
    assert is_better("loss", 0.4, 0.5) and is_better("hamming_loss", 0.1, 0.2)
    assert is_better("f1", 0.1, None)


def test_f1_samples_counts_gold_labels_outside_the_label_space_as_imageclef(arrays):
    """ImageCLEF scores each caption against its whole gold CUI set; CUIs outside the label space
    (unseen in training, or under min_label_count) cannot be predicted and count as missed."""
    y_true, y_pred = arrays
    outside = np.arange(len(y_true)) % 3  # 0, 1 or 2 gold CUIs outside the space per caption
    got = multilabel_metrics(y_true, y_pred, outside)
    # ImageCLEF's rule, written out: the outside CUIs as extra true labels never predicted.
    full_true = np.concatenate([y_true, (np.arange(2)[None, :] < outside[:, None]).astype(int)], axis=1)
    full_pred = np.concatenate([y_pred, np.zeros((len(y_pred), 2), dtype=int)], axis=1)
    assert got["f1_samples"] == pytest.approx(f1_score(full_true, full_pred, average="samples", zero_division=1))
    # Only f1_samples changes: the other metrics are the series', over the label space.
    inside = multilabel_metrics(y_true, y_pred)
    assert {k: v for k, v in got.items() if k != "f1_samples"} == {k: v for k, v in inside.items() if k != "f1_samples"}


def test_a_perfect_model_is_not_scored_perfect_where_the_label_space_drops_gold_cuis():
    """On the shared real captions with labels seen >= 20 times: predicting every kept CUI right
    used to score f1_samples = 1.0, whatever share of the gold CUIs the cut had dropped."""
    import json

    from radtrain.data.labels import LabelSpace
    from tests.conftest import ROCO

    rows = [json.loads(line) for line in ROCO.read_text(encoding="utf-8").splitlines()]
    train, test = [r["cui"] for r in rows[:6000]], [r["cui"] for r in rows[6000:]]
    space = LabelSpace.fit(train, min_count=20)
    truth = space.encode(test)
    metrics = multilabel_metrics(truth, truth, space.count_outside(test))
    assert metrics["f1"] == 1.0  # the series' micro F1 sees the label space only
    assert 0.7 < metrics["f1_samples"] < 0.95, metrics["f1_samples"]
