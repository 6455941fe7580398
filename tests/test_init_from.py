"""Starting a classifier from earlier weights (model.init_from): what is kept, what starts anew."""

from __future__ import annotations

import logging

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification

from radtrain.config import ModelConfig
from radtrain.models import build_classifier

CUIS = [f"C{i:07d}" for i in range(6)]


def _config(**extra) -> ModernBertConfig:
    return ModernBertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, **extra,
    )


def _saved_classifier(path, cuis):
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(_config(
        num_labels=len(cuis), id2label=dict(enumerate(cuis)), label2id={c: i for i, c in enumerate(cuis)},
    ))
    with torch.no_grad():  # a trained head, far from any fresh initialisation
        model.classifier.weight.fill_(0.5)
        model.classifier.bias.fill_(-1.0)
    model.save_pretrained(path)
    return model


def _build(source, cuis, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="radtrain.models"):
        return build_classifier(ModelConfig(name=str(source)), None, cuis, seed=0)


def test_a_classifier_of_the_same_labels_keeps_its_head(tmp_path, caplog):
    old = _saved_classifier(tmp_path / "old", CUIS)
    model = _build(tmp_path / "old", CUIS, caplog)
    assert torch.equal(model.classifier.weight, old.classifier.weight)
    assert torch.equal(model.classifier.bias, old.classifier.bias)
    assert "its head is kept" in caplog.text


def test_a_classifier_of_other_labels_of_the_same_count_gets_a_new_head(tmp_path, caplog):
    """Before: transformers loaded the head as it was (same shape), each row now under another
    CUI, silently. Other CUIs, and the same CUIs in another order, start a new head."""
    old = _saved_classifier(tmp_path / "old", CUIS)
    for cuis in ([*CUIS[:5], "C9999999"], CUIS[::-1]):
        model = _build(tmp_path / "old", cuis, caplog)
        head = model.classifier
        assert not torch.equal(head.weight, old.classifier.weight) and (head.bias == 0).all()
        # ModernBERT's initialisation of a new classifier: truncated normal, std hidden**-0.5, bias 0.
        std = _config().hidden_size ** -0.5
        assert head.weight.abs().max() <= 3 * std + 1e-6 and 0.5 * std < float(head.weight.detach().std()) < 1.5 * std
        assert "its head is replaced by a new one" in caplog.text
        # The encoder still comes from the old model.
        assert torch.equal(model.model.embeddings.tok_embeddings.weight, old.model.embeddings.tok_embeddings.weight)


def test_an_mlm_export_and_another_label_count_start_a_new_head_quietly(tmp_path, caplog):
    _saved_classifier(tmp_path / "old", CUIS)
    model = _build(tmp_path / "old", CUIS[:4], caplog)  # transformers' own size mismatch
    assert model.classifier.weight.shape == (4, 32) and (model.classifier.bias == 0).all()
    torch.manual_seed(0)
    ModernBertForMaskedLM(_config()).save_pretrained(tmp_path / "mlm")
    model = _build(tmp_path / "mlm", CUIS, caplog)
    assert model.classifier.weight.shape == (6, 32) and "head" not in caplog.text


def test_a_warning_when_init_from_trained_on_this_runs_held_out_captions(tmp_path, roco_path, caplog):
    """An MLM phase cut the captions with data.split_seed=42, the classifier with 5: most of the
    classifier's test captions were MLM training captions. Counted and named; the same cut is quiet."""
    import json

    from conftest import write_roco_slice

    from radtrain.config import load_config
    from radtrain.data.sources import load_splits
    from radtrain.phase import _source_for_meta, warn_if_init_trained_on_held_out

    data = write_roco_slice(tmp_path / "roco.jsonl", 400)
    mlm = tmp_path / "mlm" / "best"
    mlm.mkdir(parents=True)
    defaults = load_config(None, [f"data.source={data}"]).data
    recorded = {"source": _source_for_meta(str(data)), "validation_fraction": defaults.validation_fraction,
                "test_fraction": defaults.test_fraction, "split_seed": 42, "max_train_samples": None,
                "text_column": "caption"}
    (mlm / "radtrain.json").write_text(json.dumps({"task": "mlm", "data": recorded}))
    for seed, warned in ((5, True), (42, False)):
        cfg = load_config(None, [f"data.source={data}", f"model.init_from={mlm}", f"data.split_seed={seed}"])
        splits = load_splits(cfg.data)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_if_init_trained_on_held_out(cfg, splits)
        if warned:
            test = f"of the {len(splits['test'])} test captions were training captions of model.init_from={mlm}"
            assert test in caplog.text and "data.split_seed=42 there, 5 here" in caplog.text
            assert len(caplog.records) == 2  # validation and test; load_splits' own warnings are not repeated
        else:
            assert caplog.text == ""


def test_a_roberta_style_head_of_other_labels_starts_anew(tmp_path, caplog):
    """RoBERTa's head is a module of a dense layer and a projection: initialising only the module
    itself left both as they were (session 8 review)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=3,
                           id2label=dict(enumerate(CUIS[:3])), label2id={c: i for i, c in enumerate(CUIS[:3])})
    old = RobertaForSequenceClassification(config)
    with torch.no_grad():
        for param in old.classifier.parameters():
            param.fill_(7.0)
    old.save_pretrained(tmp_path / "roberta")
    model = _build(tmp_path / "roberta", CUIS[3:], caplog)
    assert "its head is replaced by a new one" in caplog.text
    for name, param in model.classifier.named_parameters():
        assert float(param.detach().abs().max()) < 1.0, name  # BERT-style init: normal(0.02) weights, zero biases


ZERO3_HEAD = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from radtrain.config import ModelConfig
from radtrain.models import build_classifier
deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1})
cuis = [f"C{i:07d}" for i in range(6)][::-1]
model = build_classifier(ModelConfig(name=sys.argv[1]), None, cuis, seed=0)
head = list(model.classifier.parameters())
assert all(p.numel() == 0 for p in head), "expected ZeRO-3 shards"
with deepspeed.zero.GatheredParameters(head):
    print("WEIGHT_MAX", float(model.classifier.weight.abs().max()), "BIAS_MAX", float(model.classifier.bias.abs().max()))
"""


def test_a_new_head_under_zero3_is_initialised_in_its_gathered_parameters(tmp_path):
    """Under ZeRO-3 transformers builds the model as empty shards: initialising those changed
    nothing, and the old head was kept under other CUIs (session 8 review)."""
    import re
    import socket
    import subprocess

    from conftest import PYTHON, REPO, subprocess_env

    _saved_classifier(tmp_path / "old", CUIS)  # head weight 0.5, bias -1.0
    script = tmp_path / "zero3_head.py"
    script.write_text(ZERO3_HEAD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([PYTHON, str(script), str(tmp_path / "old"), str(port)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    weight, bias = map(float, re.search(r"WEIGHT_MAX (\S+) BIAS_MAX (\S+)", done.stdout).groups())
    assert weight < 3 * 32**-0.5 + 1e-6 and bias == 0.0
