"""``radtrain evaluate``: metrics of an export on a split, computed exactly as the run did."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from radtrain.config import ConfigError, DataConfig, RunConfig, load_config, parse_override
from radtrain.data.labels import LabelSpace
from radtrain.data.sources import load_file, load_splits
from radtrain.export import LABELS_FILE, read_meta
from radtrain.io import check_output_file, read_json, sha256_file, write_json

# The export fixes the rest: its labels.json is the label space (data.min_label_count,
# label_names), and its radtrain.json the padding the run evaluated with.
EVALUATE_DATA_KEYS = (
    "data.source", "data.text_column", "data.label_column", "data.label_delimiter", "data.max_length",
    "data.validation_fraction", "data.test_fraction", "data.split_seed", "data.max_train_samples",
    "data.max_eval_samples", "data.cache_dir",
)


def export_config(meta: dict[str, Any], source: str | None, overrides: list[str] | None = None) -> RunConfig:
    """The data settings the export was trained with (its radtrain.json), so splits and padding
    match the run."""
    data = meta.get("data", {})
    # Settings only (a later radtrain may record more about the data there).
    settings = {f.name for f in dataclasses.fields(DataConfig)}
    base: dict[str, Any] = {"data": {k: v for k, v in data.items() if v is not None and k in settings}}
    if source:
        base["data"]["source"] = source
    return load_config(None, overrides, base=base)


def evaluate_model(
    model_dir: str | Path,
    source: str | None,
    split: str | None = None,
    output: str | Path | None = None,
    overrides: list[str] | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    from radtrain.distributed import make_accelerator
    from radtrain.models import check_max_length, load_tokenizer
    from radtrain.phase import evaluate_export, resolve_precision, tokenize_split
    from radtrain.predict import check_export

    # A data.source override names the data exactly as --data does (a held-out file is scored whole).
    for text in overrides or []:
        key, value = parse_override(text)
        if not key.startswith("data."):  # the model, its thresholds and precision come from the export
            raise ConfigError(
                f"evaluate takes data.* overrides only; {text!r} would be ignored (the export fixes the model and "
                "precision; use --threshold for a decision threshold)"
            )
        if key not in EVALUATE_DATA_KEYS:
            raise ConfigError(
                f"evaluate would ignore {text!r}: the export fixes it (its labels.json is the label space, its "
                f"radtrain.json the batching). The data keys evaluate uses: {', '.join(EVALUATE_DATA_KEYS)}"
            )
        if key == "data.source" and value:
            source = str(value)
    model_dir = Path(model_dir)
    check_export(model_dir)  # a classifier export: an MLM one has no labels to score
    if output is not None:
        check_output_file(output, "--output")
    if not (model_dir / LABELS_FILE).is_file():
        raise ConfigError(
            f"{model_dir} has no {LABELS_FILE}, which maps the data's CUIs to the model's outputs; copy it from the "
            "run's best/ (radtrain predict works without it)"
        )
    meta = read_meta(model_dir)
    trained_on = str(meta.get("data", {}).get("source") or "")
    if not source and not trained_on:  # else DataConfig's default dataset, unrelated to the model
        raise ConfigError(
            f"{model_dir} does not record the data it was trained on (no radtrain.json, or one without data.source); "
            "pass the data to score with --data SOURCE"
        )
    if not source and trained_on.startswith("local:"):
        known = (
            "that file, at any path, is cut into the run's splits and --split is scored; any other file is scored whole"
            if meta.get("data_sha256")
            else "a file is scored whole: this export predates radtrain's record of its data file's content, so the "
            "run's own file cannot be told from another"
        )
        raise ConfigError(
            f"{model_dir} was trained on a local file ({trained_on[len('local:'):]}) that a published export does not "
            f"name in full; pass the data to score with --data FILE ({known})"
        )
    label_space = LabelSpace.load(model_dir / LABELS_FILE)
    model_config = read_json(model_dir / "config.json")
    id2label = model_config.get("id2label") or {}
    outputs = [id2label.get(str(i)) for i in range(len(id2label))]
    if outputs and outputs != label_space.cuis:
        differs = (
            f"lists {len(label_space)} CUIs but the model has {len(outputs)} outputs"
            if len(outputs) != len(label_space)
            else "orders the CUIs otherwise than the model's outputs (config.json id2label), first at output "
            f"{next(i for i, (a, b) in enumerate(zip(outputs, label_space.cuis, strict=True)) if a != b)}"
        )
        raise ConfigError(
            f"{model_dir}: labels.json {differs}; it is not this model's label file (copy labels.json from the "
            "run's best/)"
        )
    cfg = export_config(meta, source, overrides)
    check_max_length(cfg.data.max_length, SimpleNamespace(**model_config))  # as training checks it
    held_out = _held_out_file(meta, source)
    if held_out:
        if split is not None:
            print(
                f"radtrain evaluate: --split {split} does not apply: {source} is not the file the model was trained "
                "on (or cannot be told from it), so all of it is scored (as 'held-out')", file=sys.stderr,
            )
        split = "held-out"
        # A file of its own, not the run's data: every caption of it is scored (cutting it into the
        # run's train/test shares would score a tenth of it; the run's sample caps do not apply).
        captions = load_file(cfg.data)
    else:
        split = split or "test"
        splits = load_splits(cfg.data)
        if split not in splits:
            raise ConfigError(f"split {split!r} not found in {cfg.data.source}; available: {sorted(splits)}")
        captions = splits[split]
    # The run's own precision (older exports: train.precision as resolved here).
    precision = meta.get("precision") or resolve_precision(cfg.train.precision)
    accelerator = make_accelerator(precision, 1)
    tokenizer = load_tokenizer(str(model_dir))
    tokenized = tokenize_split(tokenizer, captions, cfg, label_space, split)
    metrics = evaluate_export(model_dir, tokenized, accelerator, cfg, threshold=threshold)
    if accelerator.is_main_process:
        shown = "fp32" if precision == "no" else precision
        print(f"{split}: {len(tokenized)} captions from {captions.origin}, {shown} as the run evaluated")
        for key, value in metrics.items():
            print(f"{split}/{key}: {value:.6f}")
        if output:
            write_json(output, {"split": split, "data": captions.origin, "model": str(model_dir),
                                "captions": len(tokenized), **metrics})
    return metrics


def _held_out_file(meta: dict[str, Any], source: str | None) -> bool:
    """--data names a single file other than the one the model was trained on: by content where
    the export recorded it (a copy, a download of a published model's data), else by path. The
    run's own path with other content is refused: its splits would not be the run's, and scoring
    it whole would score training captions as held-out."""
    trained_on = meta.get("data", {}).get("source")
    own = Path(trained_on).expanduser() if trained_on and not trained_on.startswith("local:") else None
    path = Path(source).expanduser() if source else own
    if path is None or not path.is_file():
        return False
    same_path = own is not None and path.resolve() == own.resolve()
    recorded = meta.get("data_sha256")
    if recorded and sha256_file(path) != recorded:
        if same_path:
            raise ConfigError(
                f"{path} changed since the run trained on it (its sha256 differs from the one in radtrain.json): "
                "cut again, its splits would not be the run's. Restore the file, or score a copy of it elsewhere "
                "with --data COPY (scored whole, as held-out)"
            )
        return True
    return source is not None and not recorded and not same_path
