"""Quality and the user's view: threshold tuning, imbalance losses, wandb tracking, plots and the
baseline. One small real classifier run (scratch tiny model, real ROCO captions, wandb offline)
is shared by the tests that need a run directory."""

from __future__ import annotations

import glob
import inspect
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from radtrain.cli import main
from radtrain.metrics import multilabel_metrics
from radtrain.thresholds import DEFAULT_GRID, apply_thresholds, threshold_vector, tune_thresholds
from tests.conftest import ROCO, TINY


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _roco_rows(n: int) -> list[dict]:
    with ROCO.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, roco_path) -> Path:
    """Real captions: train 500, validation 120, test 97 (a size no other split has)."""
    rows = _roco_rows(717)
    root = tmp_path_factory.mktemp("quality_data")
    for name, part in (("train", rows[:500]), ("validation", rows[500:620]), ("test", rows[620:])):
        _write_jsonl(root / f"{name}.jsonl", part)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> dict:
    """One classifier run with wandb offline, then the same command again (a resume of a
    finished run), capturing what each printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("quality_run") / "run"
    args = [
        "classify", "--output-dir", str(out), f"data.source={data_dir}", *TINY,
        "train.epochs=2", "train.log_every_steps=4", "tracking.backend=wandb", "tracking.mode=offline",
    ]
    printed = []
    for _ in range(2):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(args) == 0
        printed.append(buffer.getvalue())
    return {"dir": out, "stdout": printed}


# -- thresholds --------------------------------------------------------------------------------


def _synthetic_validation(seed: int = 0):
    """400 captions, 12 labels from common to rare. The model is 'right but under-confident' for
    the rare labels: their positives score 0.15-0.45, under the series' fixed 0.5."""
    rng = np.random.default_rng(seed)
    n, rates = 400, [0.4, 0.3, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.015, 0.005]
    labels = (rng.random((n, len(rates))) < np.array(rates)).astype(np.float32)
    probs = np.empty_like(labels)
    for j, rate in enumerate(rates):
        high = 0.55 if rate >= 0.1 else 0.15  # where positives start
        pos = rng.uniform(high, high + 0.35, n)
        neg = rng.uniform(0.0, high + 0.08, n)  # some overlap: no threshold is perfect
        probs[:, j] = np.where(labels[:, j] > 0, pos, neg)
    cuis = [f"C{j:07d}" for j in range(len(rates))]
    return probs, labels, cuis


def test_threshold_tuning_improves_validation_macro_f1():
    probs, labels, cuis = _synthetic_validation()
    fixed = multilabel_metrics(labels, probs >= 0.5)
    result = tune_thresholds(probs, labels, cuis, min_support=5)
    tuned = multilabel_metrics(labels, apply_thresholds(probs, threshold_vector(result, cuis), result["top1"]))
    assert tuned["f1_macro"] > fixed["f1_macro"] + 0.2, (fixed["f1_macro"], tuned["f1_macro"])
    assert tuned["f1"] > fixed["f1"]
    assert result["validation_tuned"] == tuned and result["validation_fixed"] == fixed
    # Labels under the minimum support keep the global threshold; the others are shrunk toward it.
    support = labels.sum(0)
    rare = [c for c, s in zip(cuis, support, strict=True) if s < 5]
    assert rare and not set(rare) & set(result["per_label"])
    common = result["per_label"][cuis[0]]
    assert 0.02 <= common <= 0.95 and result["per_label"][cuis[5]] < 0.5


def _tuned_by_brute_force(probs, labels, cuis, grid, min_support, top1):
    """The tuning rule written plainly: every grid value scored on the whole matrix, compared as
    apply_thresholds compares (float32 outputs against float32 thresholds)."""
    truth = labels.astype(bool)
    forced = np.zeros(truth.shape, dtype=bool)
    if top1:
        forced[np.arange(len(probs)), probs.argmax(1)] = True
    micro, label_f1 = [], []
    for value in grid:
        pred = (probs >= np.float32(value)) | forced
        tp, fp, fn = (pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)
        micro.append(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1))
        label_f1.append(np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0))
    micro, label_f1 = np.array(micro), np.array(label_f1)

    def best(scores):
        tied = np.flatnonzero(scores >= scores.max() - 1e-12)
        return float(grid[tied[len(tied) // 2]])

    global_t = best(micro)
    per_label = {}
    for j in np.flatnonzero(truth.sum(0) >= min_support):
        if label_f1[:, j].max() > 0:
            n = float(truth[:, j].sum())
            per_label[cuis[j]] = round((n * best(label_f1[:, j]) + min_support * global_t) / (n + min_support), 4)
    return round(global_t, 4), per_label or None


@pytest.mark.parametrize("top1", [False, True])
def test_threshold_tuning_counts_exactly_what_each_grid_value_decides(top1):
    # Outputs on the grid values themselves (>= is inclusive), ties, NaN outputs of a diverged
    # model, and a user grid in float32: the one-pass counting must decide as a plain loop does.
    probs, labels, cuis = _synthetic_validation(2)
    rng = np.random.default_rng(3)
    on_grid = rng.random(probs.shape) < 0.2
    probs[on_grid] = rng.choice(DEFAULT_GRID, size=int(on_grid.sum()))
    probs[rng.random(probs.shape) < 0.01] = np.nan
    for grid in (DEFAULT_GRID, np.array([0.1, 0.3, 0.5, 0.7], dtype=np.float32)):
        result = tune_thresholds(probs, labels, cuis, min_support=3, top1=top1, grid=grid)
        expected = _tuned_by_brute_force(probs.astype(np.float32), labels, cuis, grid, 3, top1)
        assert (result["global"], result["per_label"]) == expected
    with pytest.raises(ValueError, match="strictly increasing"):
        tune_thresholds(probs, labels, cuis, grid=np.array([0.5, 0.3]))


def test_tuned_thresholds_decide_as_the_exported_rule_does():
    """Tuning compared float32 outputs with the grid in float64: an output of float32(0.11)
    (0.10999999940) did not clear 0.11 there, but does in apply_thresholds, which the export and
    predict use. Tuning then picked 0.06 (F1 2/3) where 0.11 separates the captions (F1 1)."""
    probs = np.array([[np.float32(0.11)], [np.float32(0.11)], [0.10], [0.10]], dtype=np.float32)
    labels = np.array([[1], [1], [0], [0]])
    result = tune_thresholds(probs, labels, ["C0000001"], min_support=5, per_label=False)
    assert result["global"] == 0.11
    assert result["validation_tuned"]["f1"] == 1.0
    assert multilabel_metrics(labels, apply_thresholds(probs, result["global"]))["f1"] == 1.0


def test_threshold_shrinkage_and_top1():
    probs, labels, cuis = _synthetic_validation(1)
    loose = tune_thresholds(probs, labels, cuis, min_support=1)
    strict = tune_thresholds(probs, labels, cuis, min_support=40)
    g = strict["global"]
    for cui, value in (strict["per_label"] or {}).items():  # a strong prior pulls toward the global
        assert abs(value - g) <= abs(loose["per_label"][cui] - loose["global"]) + 1e-6
    # A label no grid threshold finds (its positives all score under the grid, as rare labels of an
    # early model do) kept the middle of the grid (~0.49, shrunk), not the global threshold.
    unseen = probs.copy()
    unseen[:, 0] = np.where(labels[:, 0] > 0, 0.01, 0.005)
    assert cuis[0] not in (tune_thresholds(unseen, labels, cuis, min_support=1)["per_label"] or {})
    top1 = tune_thresholds(probs, labels, cuis, top1=True)
    pred = apply_thresholds(probs, np.full(len(cuis), 0.99), True)
    assert top1["top1"] and (pred.sum(1) >= 1).all()


def test_threshold_tuning_reads_only_the_validation_outputs_it_is_given():
    # No path, split name or config with a data source reaches the tuner: only arrays.
    params = list(inspect.signature(tune_thresholds).parameters)
    assert params[:3] == ["probs", "labels", "cuis"]
    assert not {"source", "path", "split", "cfg", "data"} & set(params)


# -- imbalance ---------------------------------------------------------------------------------


def test_asl_reduces_to_bce_and_pos_weight_auto(tmp_path):
    from radtrain.config import ConfigError, load_config
    from radtrain.data.labels import LabelSpace
    from radtrain.phase import resolve_pos_weight
    from radtrain.tasks import MultiLabelTask

    x, y = torch.randn(6, 5), (torch.rand(6, 5) > 0.6).float()
    bce = MultiLabelTask(5)._bce_sum(x, y)
    plain_asl = MultiLabelTask(5, loss="asl", asl_gamma_neg=0, asl_gamma_pos=0, asl_clip=0)._asl_sum(x, y)
    assert torch.allclose(bce, plain_asl, rtol=1e-5)
    assert MultiLabelTask(5, loss="asl")._asl_sum(x, y) < bce  # easy negatives down-weighted
    weighted = MultiLabelTask(5, pos_weight=[1, 2, 3, 4, 5])._bce_sum(x, y)
    assert weighted > bce

    cfg = load_config(None, ["train.pos_weight=auto", "train.pos_weight_cap=10"])
    space = LabelSpace(cuis=["A", "B", "C"], counts=[50, 20, 1], names={})
    assert resolve_pos_weight(cfg, space, 100) == [1.0, 4.0, 10.0]  # 50/50, 80/20, capped 99
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=focal"])
    with pytest.raises(ConfigError, match="pos_weight"):
        load_config(None, ["train.pos_weight=lots"])


# -- the run: tuned thresholds, plots, table, wandb --------------------------------------------


def test_run_reports_tuned_metrics_from_validation(run, data_dir):
    summary = json.loads((run["dir"] / "summary.json").read_text())
    thresholds = json.loads((run["dir"] / "best" / "thresholds.json").read_text())
    assert summary["split_sizes"] == {"train": 500, "validation": 120, "test": 97}
    # Tuned on the 120 validation captions of the best model: its plain validation metrics match.
    assert thresholds["tuned_on"] == "validation" and thresholds["validation_captions"] == 120
    for key, value in thresholds["validation_fixed"].items():
        assert summary["validation"][key] == pytest.approx(value, abs=1e-9)
    for key in ("f1", "f1_macro", "f1_samples"):
        assert summary["validation"][f"{key}_tuned"] == pytest.approx(thresholds["validation_tuned"][key])
        assert f"{key}_tuned" in summary["test"] and key in summary["test"]
    assert summary["validation"]["f1_tuned"] >= summary["validation"]["f1"]


def test_run_writes_plots_and_prints_the_epoch_table(run):
    for name in ("loss.png", "f1.png", "per_label_f1.png"):
        path = run["dir"] / "plots" / name
        assert path.is_file() and path.stat().st_size > 2000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run["stdout"][0].split("per-epoch validation")[1]
    for column in ("epoch", "step", "train loss", "val loss", "F1 micro", "F1 macro", "exact match", "hamming"):
        assert column in table
    rows = [line for line in table.splitlines() if line.strip()[:4] in ("1.00", "2.00")]
    assert len(rows) == 2 and sum(r.endswith("*") for r in rows) == 1


def test_plots_name_the_runs_threshold_and_leave_out_labels_without_validation_support(tmp_path, monkeypatch):
    """The plots said 'threshold 0.5' whatever train.threshold was, and drew labels no validation
    caption carries at F1 = 0, like labels the model gets wrong."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from radtrain import plots

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figures to read them back
    path = tmp_path / "per_label.json"
    plots.save_per_label(path, ["C1", "C2", "C3"], [50, 10, 3], np.array([4, 0, 2]), np.array([0.8, 0.0, 0.5]),
                         None, threshold=0.3)
    plots.plot_per_label(json.loads(path.read_text()), tmp_path / "p.png")
    plots.plot_f1([{"epoch": 1, "f1": 0.5}], tmp_path / "f.png", threshold=0.3)
    per_label_ax, f1_ax = kept[0].axes[0], kept[1].axes[0]
    assert "1 absent from validation, not shown" in per_label_ax.get_title()
    kept[0].canvas.draw()  # the title fits the figure (on one line it ran past the right edge)
    title = per_label_ax.title.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= kept[0].bbox.width, (title, kept[0].bbox)
    assert len(per_label_ax.collections[0].get_offsets()) == 2
    assert per_label_ax.get_legend().get_texts()[0].get_text() == "threshold 0.3"
    assert f1_ax.get_ylabel() == "validation F1 (threshold 0.3)"


def _wandb_records(path: str):
    """Records of a .wandb file (LevelDB-style log: 7-byte header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            raw, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def test_wandb_offline_logs_metrics_keeps_its_run_id_and_no_caption_text(run, data_dir):
    wandb_dir = run["dir"] / "wandb"
    runs = sorted(glob.glob(str(wandb_dir / "offline-run-*")))
    assert len(runs) == 2, runs  # the first start and the resume
    run_id = (wandb_dir / "radtrain-classify.id").read_text().strip()
    assert all(r.endswith(run_id) for r in runs)
    history = []
    for record in _wandb_records(glob.glob(f"{runs[0]}/run-*.wandb")[0]):
        if record.WhichOneof("record_type") == "history":
            history.append({
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            })
    keys = set().union(*history)
    for key in ("train/train_loss", "train/lr", "train/captions_per_s", "eval/f1", "eval/f1_macro", "eval/loss"):
        assert key in keys, sorted(keys)
    f1s = [row["eval/f1"] for row in history if "eval/f1" in row]
    logged = [json.loads(line)["f1"] for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert f1s == pytest.approx(logged)
    # No caption text anywhere under wandb/: check distinctive snippets of every split.
    snippets = []
    for name in ("train", "validation", "test"):
        for line in (data_dir / f"{name}.jsonl").read_text().splitlines()[:15]:
            caption = json.loads(line)["caption"]
            if len(caption) > 40:
                snippets.append(caption[5:35].encode())
    assert len(snippets) > 20
    for path in wandb_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            leaked = [s for s in snippets if s in blob]
            assert not leaked, (path, leaked[:2])


# -- predict honours the export's decision rule -----------------------------------------------


def test_predictor_honours_top1(run, tmp_path):
    from radtrain.export import write_thresholds
    from radtrain.predict import Predictor

    export = tmp_path / "best"
    shutil.copytree(run["dir"] / "best", export)
    write_thresholds(export, {"global": 0.999, "per_label": None, "top1": True, "fixed": 0.5})
    texts = ["Axial CT of the chest shows a nodule.", "Plain radiograph of the left knee."]
    assert [len(r["cuis"]) for r in Predictor(export, device="cpu").predict(texts)] == [1, 1]
    assert [len(r["cuis"]) for r in Predictor(export, device="cpu", threshold=0.999).predict(texts)] == [0, 0]


# -- baseline ----------------------------------------------------------------------------------


def test_tfidf_baseline_uses_the_same_labels_metrics_and_never_tunes_on_test(run, data_dir, tmp_path):
    out = tmp_path / "tfidf"
    assert main(["baseline", "--data", str(data_dir), "--features", "tfidf", "--output-dir", str(out),
                 "data.min_label_count=5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # The classifier run's label space (same data, same min_label_count).
    assert json.loads((out / "labels.json").read_text()) == json.loads((run["dir"] / "labels.json").read_text())
    preds = np.load(out / "predictions.npz")
    thresholds = json.loads((out / "thresholds.json").read_text())
    for split in ("validation", "test"):
        probs, labels, outside = preds[f"{split}_probs"], preds[f"{split}_labels"], preds[f"{split}_labels_outside"]
        expected = multilabel_metrics(labels, probs >= 0.5, outside)
        tuned = multilabel_metrics(labels, apply_thresholds(probs, threshold_vector(thresholds, list(preds["cuis"]))), outside)
        for key in ("f1", "f1_macro", "f1_samples", "hamming_loss", "exact_match"):
            assert summary[split][key] == pytest.approx(expected[key])
            assert summary[split][f"{key}_tuned"] == pytest.approx(tuned[key])
    assert summary["validation"]["f1_tuned"] >= summary["validation"]["f1"]
    scores = summary["classifier"]["C_validation_f1_tuned"]  # C chosen on validation
    assert set(scores) == {"1", "10", "100"} and scores[f"{summary['classifier']['C']:g}"] == max(scores.values())

    # Poison the test split (labels shuffled between captions): thresholds must not move.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(data_dir, poisoned)
    rows = [json.loads(line) for line in (poisoned / "test.jsonl").read_text().splitlines()]
    cuis = [r["cui"] for r in rows]
    for row, labels in zip(rows, cuis[1:] + cuis[:1], strict=True):
        row["cui"] = labels
    _write_jsonl(poisoned / "test.jsonl", rows)
    out2 = tmp_path / "tfidf_poisoned"
    assert main(["baseline", "--data", str(poisoned), "--features", "tfidf", "--output-dir", str(out2),
                 "data.min_label_count=5"]) == 0
    poisoned_summary = json.loads((out2 / "summary.json").read_text())
    assert json.loads((out2 / "thresholds.json").read_text()) == thresholds
    assert poisoned_summary["classifier"]["C_validation_f1_tuned"] == scores
    assert poisoned_summary["validation"] == summary["validation"]
    assert poisoned_summary["test"]["f1"] != summary["test"]["f1"]  # the poison did reach the test figures


def test_model_baseline_on_a_run_export(run, data_dir, tmp_path):
    out = tmp_path / "model"
    assert main(["baseline", "--data", str(data_dir), "--model", str(run["dir"] / "best"), "--output-dir",
                 str(out), "data.min_label_count=5", "data.max_length=96"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    preds = np.load(out / "predictions.npz")
    assert summary["features"] == "model" and summary["num_labels"] == preds["test_probs"].shape[1]
    assert summary["test"]["f1"] == pytest.approx(multilabel_metrics(preds["test_labels"], preds["test_probs"] >= 0.5)["f1"])
    assert main(["baseline", "--data", str(data_dir), "--output-dir", str(tmp_path / "x")]) == 2  # no --model
