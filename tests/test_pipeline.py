"""End to end on real ROCO captions: MLM phase, classifier from its export, evaluate, predict.

One module-scoped pipeline (scratch tiny ModernBERT, 600 training captions) feeds every test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, TINY, subprocess_env

pytestmark = pytest.mark.slow


def radtrain(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "radtrain", *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env(),
        cwd=cwd,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, roco_dir):
    root = tmp_path_factory.mktemp("pipeline")
    ok(radtrain("mlm", "--output-dir", str(root / "mlm"), f"data.source={roco_dir}", *TINY, "train.epochs=3"))
    # The classifier whose quality is checked starts from scratch: 114 MLM steps on 600 captions
    # teach a tiny model little more than unigram statistics, which is a poorer start than random
    # weights. The MLM -> classifier hand-off itself is checked in test_classifier_starts_from_the_mlm_export.
    ok(radtrain(
        "classify", "--output-dir", str(root / "cls"), f"data.source={roco_dir}", *TINY,
        "train.epochs=6", "train.lr=2e-3",
    ))
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mlm_validation_loss_falls(runs):
    rows = read_jsonl(runs / "mlm" / "metrics.jsonl")
    assert len(rows) == 3
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    summary = json.loads((runs / "mlm" / "summary.json").read_text())
    assert summary["best_metric"] == "loss" and summary["test"] is None  # MLM never reads test


def test_run_directory_contract(runs):
    run = runs / "cls"
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "checkpoints", "best"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    metric_names = {"precision_micro", "recall_micro", "f1", "precision_macro", "recall_macro", "f1_macro",
                    "exact_match", "hamming_loss", "label_accuracy", "f1_samples"}
    assert metric_names <= set(summary["validation"]) and metric_names <= set(summary["test"])
    assert summary["best_step"] in [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert summary["best_epoch"] >= 1
    assert len(list((run / "checkpoints").glob("step-*"))) <= 3  # save_total_limit


def test_classifier_beats_an_untrained_one(runs, roco_dir):
    """Micro F1 of the trained classifier vs the same architecture with an untrained head."""
    from radtrain.config import load_config
    from radtrain.data.batching import collate
    from radtrain.data.labels import LabelSpace
    from radtrain.data.sources import load_splits
    from radtrain.distributed import make_accelerator
    from radtrain.models import build_classifier, load_tokenizer
    from radtrain.phase import tokenize_split
    from radtrain.tasks import MultiLabelTask
    from radtrain.trainer import evaluate_split

    cfg = load_config(None, [f"data.source={roco_dir}", *TINY])
    labels = LabelSpace.load(runs / "cls" / "labels.json")
    tokenizer = load_tokenizer(str(runs / "cls" / "tokenizer"))
    test = tokenize_split(tokenizer, load_splits(cfg.data)["test"], cfg, labels, "test")
    untrained = build_classifier(cfg.model, tokenizer, labels.cuis, seed=0)
    accelerator = make_accelerator("no", 1)
    metrics, _ = evaluate_split(
        MultiLabelTask(len(labels)), untrained, accelerator, test,
        lambda s, i: collate(s, i, tokenizer.pad_token_id), 16, 0,
    )
    trained = json.loads((runs / "cls" / "summary.json").read_text())["test"]
    assert trained["f1"] > metrics["f1"] + 0.2, (trained["f1"], metrics["f1"])


def test_classifier_starts_from_the_mlm_export(runs, roco_dir):
    """model.init_from=RUN/best: encoder weights and tokenizer come from the MLM export, the head is new."""
    import torch
    from safetensors.torch import load_file

    from radtrain.config import load_config
    from radtrain.models import build_classifier, load_tokenizer

    mlm_best = runs / "mlm" / "best"
    cfg = load_config(None, [f"data.source={roco_dir}", *TINY, f"model.init_from={mlm_best}"])
    tokenizer = load_tokenizer(str(mlm_best))
    model = build_classifier(cfg.model, tokenizer, ["C0040405", "C1306645"], seed=0)
    mlm = load_file(mlm_best / "model.safetensors")
    state = model.state_dict()
    encoder_keys = [k for k in mlm if k.startswith("model.")]
    assert len(encoder_keys) > 10
    for key in encoder_keys:
        torch.testing.assert_close(state[key], mlm[key], rtol=0, atol=0, msg=key)
    assert model.config.num_labels == 2 and model.config.problem_type == "multi_label_classification"


def test_a_run_from_an_mlm_export_names_that_exports_base_model(runs, roco_dir, tmp_path):
    """radtrain.json's base_model named model.name's default (ModernBERT-base), which a run with
    model.init_from never loads; the card resolved it, other readers of radtrain.json did not."""
    out = tmp_path / "cls"
    tiny = [o for o in TINY if not o.startswith("model.name=")]
    # init_from as a relative path (session 13: it was recorded as typed, so a push from another
    # directory published "base_model: mlm/best" and "MLM phase ran: no").
    ok(radtrain("classify", "--output-dir", str(out), f"data.source={roco_dir}", *tiny, "train.max_steps=2",
                "model.init_from=mlm/best", cwd=runs))
    meta = json.loads((out / "best" / "radtrain.json").read_text())
    assert meta["base_model"] == "scratch:tiny" and meta["init_from"] == str(runs / "mlm" / "best")
    ok(radtrain("push", str(out), "--repo-id", "me/x", "--preview", str(tmp_path / "preview"), cwd=tmp_path))
    card = (tmp_path / "preview" / "README.md").read_text()
    assert "mlm/best" not in card.split("---")[1] and "Radiology MLM phase ran: yes" in card


def test_best_export_loads_with_transformers(runs):
    from transformers import AutoModelForSequenceClassification, pipeline

    best = runs / "cls" / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best)
    labels = json.loads((best / "labels.json").read_text())["labels"]
    assert model.config.problem_type == "multi_label_classification"
    assert [model.config.id2label[i] for i in range(model.config.num_labels)] == [x["cui"] for x in labels]
    classify = pipeline("text-classification", model=str(best), top_k=None)
    # A list in, one list of {label, score} per text out (transformers 5 nests even a single string).
    out = classify(["Chest radiograph showing a right pneumothorax."])[0]
    assert len(out) == model.config.num_labels
    assert all(item["label"].startswith("C") and 0.0 <= item["score"] <= 1.0 for item in out)


def test_evaluate_reproduces_the_test_metrics(runs, roco_dir, tmp_path):
    output = tmp_path / "metrics.json"
    ok(radtrain("evaluate", "--model", str(runs / "cls" / "best"), "--data", str(roco_dir),
                "--split", "test", "--output", str(output)))
    got = json.loads(output.read_text())
    expected = json.loads((runs / "cls" / "summary.json").read_text())["test"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_predict_prints_cuis_with_names_and_probabilities(runs, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"caption": "Axial CT of the abdomen."}) + "\n")
    result = ok(radtrain("predict", "--model", str(runs / "cls" / "best"), "--threshold", "0.2",
                         "--input", str(inputs), "Chest radiograph."))
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Chest radiograph.", "Axial CT of the abdomen."]
    for row in rows:
        probs = [c["probability"] for c in row["cuis"]]
        assert probs == sorted(probs, reverse=True) and all(p >= 0.2 for p in probs)
    assert any(row["cuis"] for row in rows)


def test_a_different_config_in_the_same_directory_is_refused(runs, roco_dir):
    best = runs / "cls" / "best" / "model.safetensors"
    before = best.read_bytes()
    result = radtrain("classify", "--output-dir", str(runs / "cls"), f"data.source={roco_dir}", *TINY,
                      "train.epochs=6", "train.lr=5e-3")
    assert result.returncode == 2
    # Named: every setting that differs, saved -> now (it used to give two fingerprint hashes).
    assert "holds checkpoints of a run with other settings" in result.stderr and "train.lr: " in result.stderr
    assert best.read_bytes() == before
