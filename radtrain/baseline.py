"""``radtrain baseline``: part 1 of the series as a reference point for every run.

One-vs-rest logistic regression on either
- frozen ModernBERT features (``--features model``, the default): the encoder's last hidden states
  mean-pooled over real tokens; ``--model`` is a Hub id, a local model directory, a run's
  ``best/`` (MLM or classifier export: the encoder is loaded, the head ignored) or ``scratch:SIZE``
  (random weights, tokenizer trained on the training split: a "features without pretraining" floor);
- TF-IDF of word uni- and bigrams (``--features tfidf``): no model at all.

Same label space (``LabelSpace.fit`` on train with ``data.min_label_count``), same splits, same
metric code (``multilabel_metrics``) and the same threshold tuning on validation as the
classifier, so ``summary.json`` has the same ``validation`` / ``test`` keys (plus ``_tuned``).
Vectoriser, scaler and classifiers see the training split only; thresholds see validation only;
the test split is used once, for the reported test figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radtrain.cli import positive_int
from radtrain.config import ConfigError, RunConfig, load_config
from radtrain.io import replacing, write_json

log = logging.getLogger(__name__)

FEATURES = ("model", "tfidf")
# On ROCO TF-IDF, C=100 won on validation (0.912 vs 0.898 at 10, 0.783 at 1: the CUIs come from
# the caption's own words, so little regularisation is needed). On frozen features of our scratch
# tiny MLM export C=1 won (0.491 vs 0.453 at 10), at ~2-5 min per value on a shared 2-core CPU.
DEFAULT_C = {"tfidf": (1.0, 10.0, 100.0), "model": (1.0,)}
PREDICTIONS_FILE = "predictions.npz"


# -- features -----------------------------------------------------------------------------------


def tfidf_features(train_texts: list[str], *others: list[str]) -> list[Any]:
    """Sparse TF-IDF matrices; the vocabulary and IDF come from the training texts only."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from radtrain.data.sources import DataError

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True)
    try:
        train = vectorizer.fit_transform(train_texts)
    except ValueError as exc:  # "empty vocabulary": no word occurs in two training captions
        raise DataError(
            f"TF-IDF found no word that occurs in at least two training captions ({exc}); check the text "
            "column (data.text_column), or use --features model"
        ) from exc
    log.info("tfidf: %d features from %d training captions", train.shape[1], len(train_texts))
    return [train, *(vectorizer.transform(texts) for texts in others)]


def load_encoder(name: str, train_texts: list[str], max_length: int, seed: int):
    """(tokenizer, encoder) for a Hub id, a local directory, a run's best/, or scratch:SIZE."""
    import torch
    from transformers import AutoModel, ModernBertModel

    from radtrain import models

    if name.startswith("scratch:"):
        size = name.split(":", 1)[1]
        if size not in models.SCRATCH_SHAPES:
            raise ConfigError(f"--model {name}: scratch size must be one of {tuple(models.SCRATCH_SHAPES)}")
        tokenizer = models.train_scratch_tokenizer(train_texts, size, max_length)
        torch.manual_seed(seed)
        return tokenizer, ModernBertModel(models.scratch_config(size, tokenizer))
    tokenizer = models.load_tokenizer(name)
    try:
        # AutoModel loads the bare encoder from a base model, an MLM export or a classifier
        # export alike (transformers strips the task head's prefix).
        encoder = AutoModel.from_pretrained(name, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(
            f"--model {name}: cannot load an encoder ({exc}). Give a Hub id, a model directory "
            "(e.g. a run's best/), scratch:tiny, or use --features tfidf"
        ) from exc
    return tokenizer, encoder


def mean_pooled(tokenizer, encoder, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean of the last hidden states over real (non-padding) tokens, one row per text.

    Texts are encoded in order of length so batches carry little padding; rows are written back
    in the original order."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            ).to(device)
            hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = pooled.cpu().numpy()
    return out


# -- classifier -----------------------------------------------------------------------------------


def fit_predict(
    x_train, y_train: np.ndarray, x_eval: list[Any], c: float = 1.0, max_iter: int = 200
) -> tuple[list[np.ndarray], dict[str, int]]:
    """One logistic regression per label (liblinear: fast on a few thousand rows, sparse or dense).

    A label with a single class in training (e.g. present in every caption) gets that class's
    constant probability instead of a model: sklearn refuses to fit one. Returns the probability
    matrices for ``x_eval`` and counts of what happened."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n_labels = y_train.shape[1]
    # The dual problem has one variable per caption: with more features than captions (TF-IDF)
    # liblinear solves it ~10x faster (measured: 0.03 s vs 0.32 s per label on 6k ROCO captions).
    dual = x_train.shape[1] > x_train.shape[0]
    outputs = [np.zeros((x.shape[0], n_labels), dtype=np.float32) for x in x_eval]
    stats = {"fitted": 0, "constant": 0, "not_converged": 0, "dual": int(dual)}
    for j in range(n_labels):
        column = y_train[:, j].astype(int)
        if column.min() == column.max():
            for out in outputs:
                out[:, j] = float(column[0])
            stats["constant"] += 1
            continue
        model = LogisticRegression(solver="liblinear", dual=dual, C=c, max_iter=max_iter, random_state=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, column)
        stats["not_converged"] += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        stats["fitted"] += 1
        for x, out in zip(x_eval, outputs, strict=True):
            out[:, j] = model.predict_proba(x)[:, 1]
    return outputs, stats


# -- the command ------------------------------------------------------------------------------------


def run_baseline(
    cfg: RunConfig,
    features: str = "model",
    model: str | None = None,
    c: float | Sequence[float] | None = None,
    max_iter: int = 200,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Fit the baseline in ``cfg.output_dir`` and return its summary (also written to summary.json).

    Several ``c`` values: each is fitted on train and scored on VALIDATION (micro F1 under
    thresholds tuned on validation); the winner is refitted and is the only one that sees test.
    None: ``DEFAULT_C[features]`` (a grid for TF-IDF, where a fit takes seconds; one value for
    dense features, where liblinear takes ~0.15 s per label and a grid would take many minutes).
    """
    from radtrain.data.labels import LabelSpace
    from radtrain.data.sources import load_splits
    from radtrain.export import LABELS_FILE, write_thresholds
    from radtrain.metrics import multilabel_metrics
    from radtrain.phase import label_names
    from radtrain.thresholds import apply_thresholds, threshold_vector, tune_thresholds

    if features not in FEATURES:
        raise ConfigError(f"--features must be one of {FEATURES}, got {features!r}")
    if features == "model" and not model:
        raise ConfigError("--features model needs --model NAME (Hub id, directory, best/ or scratch:tiny); "
                          "or use --features tfidf")
    c = DEFAULT_C[features] if c is None else c
    candidates = [float(v) for v in (c if isinstance(c, Sequence) else [c])]
    check_c_values(candidates)
    started = time.time()
    out_dir = Path(cfg.output_dir)
    check_baseline_dir(out_dir, baseline_identity(cfg, features, model))
    splits = load_splits(cfg.data)
    if "test" not in splits:
        log.warning("%s has no test split: only validation figures will be reported", cfg.data.source)
    labels = LabelSpace.fit(splits["train"].labels, cfg.data.min_label_count, label_names(cfg, splits))
    names = ["train", "validation"] + (["test"] if "test" in splits else [])
    targets = {n: labels.encode(splits[n].labels, split_name=n) for n in names}
    outside = {n: labels.count_outside(splits[n].labels) for n in names}
    texts = {n: splits[n].texts for n in names}

    t0 = time.time()
    if features == "tfidf":
        matrices = tfidf_features(texts["train"], *(texts[n] for n in names[1:]))
    else:
        from sklearn.preprocessing import StandardScaler

        tokenizer, encoder = load_encoder(model, texts["train"], cfg.data.max_length, cfg.train.seed)
        dense = [mean_pooled(tokenizer, encoder, texts[n], cfg.data.max_length, batch_size) for n in names]
        scaler = StandardScaler().fit(dense[0])  # training statistics only
        matrices = [scaler.transform(x) for x in dense]
    feature_time = time.time() - t0

    fixed = cfg.train.threshold
    t0 = time.time()
    c_scores: dict[str, float] = {}
    if len(candidates) > 1:
        for value in candidates:
            (val_probs,), _ = fit_predict(matrices[0], targets["train"], [matrices[1]], c=value, max_iter=max_iter)
            tuned_val = tune_thresholds(val_probs, targets["validation"], labels.cuis,
                                        min_support=cfg.train.threshold_min_support,
                                        top1=cfg.train.always_top1, fixed=fixed)
            c_scores[f"{value:g}"] = tuned_val["validation_tuned"]["f1"]
            log.info("C=%g: validation micro F1 (tuned thresholds) %.4f", value, c_scores[f"{value:g}"])
    chosen = max(candidates, key=lambda v: c_scores[f"{v:g}"]) if c_scores else candidates[0]
    probs_list, fit_stats = fit_predict(matrices[0], targets["train"], matrices[1:], c=chosen, max_iter=max_iter)
    fit_time = time.time() - t0
    probs = dict(zip(names[1:], probs_list, strict=True))

    thresholds = tune_thresholds(
        probs["validation"], targets["validation"], labels.cuis,
        min_support=cfg.train.threshold_min_support, top1=cfg.train.always_top1, fixed=fixed,
        labels_outside=outside["validation"],
    )
    vector = threshold_vector(thresholds, labels.cuis)
    results: dict[str, dict[str, float] | None] = {"validation": None, "test": None}
    for name in names[1:]:
        metrics = multilabel_metrics(targets[name], apply_thresholds(probs[name], fixed), outside[name])
        tuned = multilabel_metrics(targets[name], apply_thresholds(probs[name], vector, thresholds["top1"]), outside[name])
        results[name] = {**metrics, **{f"{k}_tuned": v for k, v in tuned.items()}}

    summary: dict[str, Any] = {
        "task": "baseline",
        **baseline_identity(cfg, features, model),
        "classifier": {"kind": "one-vs-rest logistic regression", "solver": "liblinear", "C": chosen,
                       "C_validation_f1_tuned": c_scores or None, "max_iter": max_iter, **fit_stats},
        "validation": results["validation"],
        "test": results["test"],
        "thresholds": {k: thresholds[k] for k in ("global", "fixed", "top1", "min_support", "labels_with_own_threshold")},
        "num_labels": len(labels),
        "split_sizes": {n: len(splits[n]) for n in splits},
        "feature_time_s": round(feature_time, 2),
        "fit_time_s": round(fit_time, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    labels.save(out_dir / LABELS_FILE)
    write_thresholds(out_dir, thresholds)
    arrays = {"cuis": np.array(labels.cuis)}
    for name in names[1:]:
        arrays[f"{name}_probs"] = probs[name]
        arrays[f"{name}_labels"] = targets[name].astype(np.uint8)
        arrays[f"{name}_labels_outside"] = outside[name]  # gold CUIs outside the label space (f1_samples)
    with replacing(out_dir / PREDICTIONS_FILE, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    write_json(out_dir / "summary.json", summary)
    for name in names[1:]:
        r = results[name]
        print(
            f"[radtrain] baseline ({features}, C={chosen:g}) {name}: at {fixed:g}: micro F1 {r['f1']:.4f}, macro F1 "
            f"{r['f1_macro']:.4f}, samples F1 {r['f1_samples']:.4f} | tuned: micro F1 {r['f1_tuned']:.4f}, "
            f"macro F1 {r['f1_macro_tuned']:.4f}, samples F1 {r['f1_samples_tuned']:.4f}",
            flush=True,
        )
    return summary


# Command-line overrides a baseline uses; any other key (model.*, most of train.*, the batching
# keys of data.*) would be accepted and silently ignored.
BASELINE_KEYS = ("data.", "output_dir", "train.threshold", "train.threshold_min_support", "train.always_top1",
                 "train.seed")
BASELINE_IGNORES = ("data.padding", "data.pad_to_multiple_of", "data.bucket_by_length", "data.packing",
                    "data.packed_attention")


def split_c_arguments(tokens: Sequence[str] | None) -> tuple[list[float] | None, list[str]]:
    """``--C 1 10,100 data.x=y``: the C values (spaces or commas), and the overrides that argparse's
    greedy ``nargs`` swallowed after them (overrides may follow options)."""
    if tokens is None:
        return None, []
    values: list[float] = []
    overrides = [t for t in tokens if "=" in t]
    for token in (t for t in tokens if "=" not in t):
        for part in filter(None, token.split(",")):
            try:
                values.append(float(part))
            except ValueError:
                raise ConfigError(f"--C: {part!r} is not a number (e.g. --C 1 10 100, or --C 1,10,100)") from None
    return values, overrides


def check_c_values(values: Sequence[float]) -> None:
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--C must be one or more positive finite numbers, got {list(values)}")


def baseline_identity(cfg: RunConfig, features: str, model: str | None) -> dict[str, Any]:
    """What makes two baselines the same one (recorded in summary.json)."""
    return {
        "features": features,
        "model": model if features == "model" else None,
        "data": {key: getattr(cfg.data, key) for key in IDENTITY_DATA_KEYS},
    }


# The data settings that change which captions and labels a baseline reads.
IDENTITY_DATA_KEYS = (
    "source", "min_label_count", "test_fraction", "validation_fraction", "split_seed", "max_length",
    "max_train_samples", "max_eval_samples", "text_column", "label_column", "label_delimiter", "label_names",
    "label_name_column",
)


def identity_differences(saved: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """``key: recorded -> now`` for each setting that makes this another baseline. A record from an
    older radtrain has fewer data keys: only the ones it has are compared."""
    differences = []
    for key, value in identity.items():
        if key not in saved:
            continue
        recorded = saved[key]
        if isinstance(recorded, dict) and isinstance(value, dict):
            differences += [
                f"{key}.{sub}: {recorded[sub]!r} -> {value[sub]!r}"
                for sub in recorded if sub in value and recorded[sub] != value[sub]
            ]
        elif recorded != value:
            differences.append(f"{key}: {recorded!r} -> {value!r}")
    return differences


def check_baseline_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse, before any work, an output directory holding a training run's files or another
    baseline's results: a baseline rewrites summary.json, labels.json and thresholds.json. The same
    baseline again (same features, model and data) replaces its own results."""
    from radtrain.checkpoint import recorded_task

    training = [n for n in ("checkpoints", "best", "metrics.jsonl", "config.yaml", "config.json", "radtrain.json")
                if (out_dir / n).exists()]
    training += [p.name for p in out_dir.glob("*.safetensors")][:1]  # a model export (best/, selected/, a snapshot)
    task = recorded_task(out_dir)
    if training or task not in (None, "baseline"):
        raise ConfigError(
            f"--output-dir {out_dir} holds a {task or 'training'} run's or a model export's files "
            f"({', '.join(training) or 'summary.json'}); a baseline would overwrite its summary.json, labels.json and "
            "thresholds.json. Use another --output-dir."
        )
    if task is None:
        return
    try:
        saved = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return
    differences = identity_differences(saved, identity)
    if differences:
        raise ConfigError(
            f"--output-dir {out_dir} holds another baseline's results ({'; '.join(differences)}); this one would "
            "overwrite them. Use another --output-dir."
        )


def cmd_baseline(args: argparse.Namespace) -> int:
    from radtrain.phase import check_model_source, setup_logging

    setup_logging(True)
    c_values, swallowed = split_c_arguments(args.C)
    cli_overrides = list(args.overrides) + swallowed
    keys = [(o, o.split("=", 1)[0].strip()) for o in cli_overrides]
    ignored = [o for o, key in keys if not key.startswith(BASELINE_KEYS) or key in BASELINE_IGNORES]
    if ignored:
        raise ConfigError(
            f"baseline uses only data.* (not its batching keys: {', '.join(BASELINE_IGNORES)}), output_dir and "
            f"train.threshold*/always_top1/seed settings; {', '.join(ignored)} would be ignored. Drop them (model "
            "features come from --model)."
        )
    check_model_source(args.model, "--model")
    overrides = [f"data.source={args.data}"] + cli_overrides
    # --output-dir, else an output_dir= override, else a default per feature kind. Not the --config
    # file's output_dir: that is the training run's directory when the same config serves both.
    explicit = [o for o in cli_overrides if o.split("=", 1)[0].strip() == "output_dir"]
    output = args.output_dir or (explicit[-1].split("=", 1)[1].strip() if explicit else f"runs/baseline-{args.features}")
    cfg = load_config(args.config, overrides + [f"output_dir={output}"])
    run_baseline(cfg, args.features, args.model, c=c_values, max_iter=args.max_iter, batch_size=args.batch_size)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "baseline",
        help="reference point: logistic regression on frozen model features or TF-IDF (same labels and metrics)",
    )
    p.add_argument("--data", required=True, help="data source (Hub id, directory of split files, or one file)")
    p.add_argument("--model", help="encoder for --features model: Hub id, directory, a run's best/, or scratch:tiny")
    p.add_argument("--features", choices=FEATURES, default="model", help="'model' (default) or 'tfidf' (no model)")
    p.add_argument("--output-dir", help="where summary.json, thresholds.json, predictions.npz go")
    p.add_argument(
        "--config", "-c",
        help="YAML config: its data and train.threshold* settings apply (not its output_dir, the training run's)",
    )
    p.add_argument(
        "--C", nargs="+", default=None,
        help="inverse L2 strength of each logistic regression; several values (spaces or commas) are compared "
        "on validation (default: 1 10 100 for tfidf, 1 for model features)",
    )
    p.add_argument("--max-iter", type=positive_int, default=200, help="iteration bound per label (liblinear)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="captions per forward pass for --features model")
    p.add_argument("overrides", nargs="*", help="data.* and train.threshold* overrides, e.g. data.min_label_count=10")
    p.set_defaults(func=cmd_baseline)
