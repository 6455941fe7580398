"""The model card (README.md with YAML front matter) published next to a ``best/`` export.

Everything in it is read from files the run wrote: ``best/radtrain.json`` (task, base model,
init_from, selected step), ``best/labels.json``, ``best/thresholds.json``, ``best/config.json``,
and the run directory's ``summary.json`` (split sizes, validation and test metrics) and
``config.yaml`` (training configuration). The metrics go into the Hub's ``model-index`` front
matter exactly as ``summary.json`` holds them, so the card and the run cannot disagree.

Privacy: radiology text can carry patient information, so the card never quotes the training
data. Example predictions use :data:`EXAMPLE_CAPTIONS`, a fixed list of made-up captions, and
local paths are reduced to their last component (they can carry user names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# Written for this card, not taken from any dataset. Keep them generic and short.
EXAMPLE_CAPTIONS = (
    "Axial contrast-enhanced CT of the chest showing a small right pleural effusion.",
    "Frontal chest radiograph without acute cardiopulmonary abnormality.",
    "Sagittal T2-weighted MRI of the lumbar spine showing a disc bulge at L4-L5.",
    "Abdominal ultrasound demonstrating multiple gallstones in the gallbladder.",
)

METRIC_TITLES = {
    "precision_micro": "Precision (micro)",
    "recall_micro": "Recall (micro)",
    "f1": "F1 (micro)",
    "precision_macro": "Precision (macro)",
    "recall_macro": "Recall (macro)",
    "f1_macro": "F1 (macro)",
    "exact_match": "Exact match (subset accuracy)",
    "hamming_loss": "Hamming loss",
    "label_accuracy": "Label accuracy",
    "f1_samples": "F1 (samples, ImageCLEF)",
    "loss": "BCE loss",
}
HEADLINE_METRICS = ("f1", "f1_macro", "f1_samples")
TASK_NAME = "Multi-label UMLS concept (CUI) classification"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_hub_id(value: str | None) -> bool:
    """'org/name' that is not a local path (a relative local dir can look like a Hub id)."""
    return bool(value) and bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def public_source(value: str | None) -> str | None:
    """A Hub id as it is; a local path as its last component only (paths can name users)."""
    if value is None or is_hub_id(value) or value.startswith("scratch:"):
        return value
    return f"local:{Path(value).name}"


def metric_title(key: str) -> str:
    if key.endswith("_tuned"):
        return METRIC_TITLES.get(key[: -len("_tuned")], key) + ", tuned thresholds"
    return METRIC_TITLES.get(key, key)


def lineage(meta: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from: the pretrained base, and whether radtrain's MLM phase ran.

    ``init_from`` is the MLM run's ``best/`` when the pipeline ran both phases; that export's
    radtrain.json says task 'mlm' and names the original base model.
    """
    init_from = meta.get("init_from")
    out: dict[str, Any] = {
        "base_model": meta.get("base_model"),
        "mlm_ran": False,
        "init_from": init_from,
        "mlm_summary": None,
    }
    if not init_from:
        return out
    init_dir = Path(init_from).expanduser()
    init_meta = _read_json(init_dir / "radtrain.json") if init_dir.is_dir() else None
    if init_meta and init_meta.get("task") == "mlm":
        out["mlm_ran"] = True
        out["base_model"] = init_meta.get("init_from") or init_meta.get("base_model")
        out["mlm_summary"] = _read_json(init_dir.parent / "summary.json")
        out["mlm_step"] = init_meta.get("step")
    elif init_meta is None and not init_dir.exists():
        # A Hub id, or a directory not here (exports before session 13 recorded a relative
        # init_from as typed, so from another directory "mlm/best" looked like a Hub id): the
        # export's own base_model is its base; it names init_from itself only for a Hub model.
        base = meta.get("base_model") or init_from
        out["base_model"] = base
        out["mlm_ran"] = False if base == init_from and is_hub_id(init_from) else None
    else:
        out["base_model"] = init_meta.get("base_model") if init_meta else init_from
    return out


def dataset_label(source: str | None) -> tuple[str, str]:
    """(type, name) for model-index: the Hub id for Hub datasets, 'local' otherwise."""
    if is_hub_id(source):
        return source, source
    return "local", (public_source(source) or "unknown").removeprefix("local:")


def card_metadata(model_dir: Path, summary: dict[str, Any] | None, repo_id: str | None) -> dict[str, Any]:
    """The YAML front matter as a dict (model-index built with huggingface_hub's own schema)."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = _read_json(model_dir / "radtrain.json") or {}
    source = (meta.get("data") or {}).get("source")
    origin = lineage(meta)
    dataset_type, dataset_name = dataset_label(source)
    results = []
    for split in ("validation", "test"):
        for key, value in ((summary or {}).get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results.append(
                    EvalResult(
                        task_type="text-classification",
                        task_name=TASK_NAME,
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type=key,
                        metric_name=metric_title(key),
                        metric_value=value,
                    )
                )
    data = ModelCardData(
        model_name=(repo_id or model_dir.resolve().parent.name).split("/")[-1],
        eval_results=results or None,
        library_name="transformers",
        pipeline_tag="text-classification",
        base_model=origin["base_model"] if is_hub_id(origin["base_model"]) else None,
        datasets=[source] if is_hub_id(source) else None,
        language=["en"],
        tags=["radiology", "umls", "cui", "multi-label-classification", "modernbert", "radtrain"],
    )
    return data.to_dict()


def decision_rule(thresholds: dict[str, Any]) -> str:
    """thresholds.json in words: global threshold, per-label ones, top1."""
    per_label = thresholds.get("per_label")
    text = f"probability >= {thresholds.get('global')}"
    if per_label:
        text += (
            f", except {len(per_label)} CUIs with their own threshold tuned on the validation split "
            "(`per_label`)"
        )
    if thresholds.get("top1"):
        text += "; the most probable CUI of each text is always predicted (`top1`)"
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _metrics_table(summary: dict[str, Any]) -> str:
    validation, test = summary.get("validation") or {}, summary.get("test") or {}
    keys = list(dict.fromkeys([*validation, *test]))
    if not keys:
        return "No metrics were recorded for this run.\n"
    rows = ["| Metric | Validation (selected step) | Test |", "|---|---:|---:|"]
    rows += [f"| {metric_title(k)} (`{k}`) | {_fmt(validation.get(k))} | {_fmt(test.get(k))} |" for k in keys]
    return "\n".join(rows) + "\n"


def _public_config(run_dir: Path | None) -> str | None:
    """config.yaml without machine-specific or publishing keys; local paths shortened."""
    path = run_dir / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in ("output_dir", "hub", "tracking"):
        cfg.pop(key, None)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    data.pop("cache_dir", None)
    for section, key in ((data, "source"), (data, "label_names"), (model, "name"), (model, "init_from")):
        if section.get(key):
            section[key] = public_source(str(section[key]))
    return yaml.safe_dump(cfg, sort_keys=False).strip()


def _usage(repo_id: str, revision: str | None, max_length: int, precision: str = "no") -> str:
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    bf16 = (
        "# The run evaluated and tuned its thresholds under bf16 autocast: for its exact decisions, call the\n"
        '# classifier inside `with torch.autocast("cuda", dtype=torch.bfloat16):` (radtrain predict does).\n'
        if precision == "bf16" else ""
    )
    return f'''```python
import json

from huggingface_hub import hf_hub_download
from transformers import pipeline

repo = "{repo_id}"
classifier = pipeline("text-classification", model=repo{rev}, top_k=None, function_to_apply="sigmoid")
thresholds = json.load(open(hf_hub_download(repo, "thresholds.json"{rev})))
per_label = thresholds.get("per_label") or {{}}

texts = ["Axial CT of the abdomen showing a large hepatic cyst."]
# Stripped and truncated as in training (radtrain predict does the same): surrounding whitespace
# or a longer text would change the scores.
texts = [text.strip() for text in texts]
{bf16}results = classifier(texts, truncation=True, max_length={max_length})  # per text, a list of {{"label": CUI, "score": probability}}
for text, scores in zip(texts, results):
    predicted = [s for s in scores if s["score"] >= per_label.get(s["label"], thresholds["global"])]
    top = max(scores, key=lambda s: s["score"])
    if thresholds.get("top1") and text and top not in predicted:
        predicted.append(top)  # the decision rule emits the most probable CUI of any non-blank text
    print(predicted)
```
'''


def _examples(model_dir: Path, predictor=None, top: int = 3) -> str:
    from radtrain.predict import Predictor

    predictor = predictor or Predictor(model_dir, device="cpu")
    texts = list(EXAMPLE_CAPTIONS)
    probs = predictor.probabilities(texts)
    decided = [{c["cui"] for c in result["cuis"]} for result in predictor.predict(texts)]
    rows = ["| Made-up caption | Top CUIs (probability; ✓ = predicted by the decision rule) |", "|---|---|"]
    for text, row, chosen in zip(texts, probs, decided, strict=True):
        order = row.argsort()[::-1][:top]
        shown = []
        for i in order:
            cui = predictor.cuis[i]
            name = predictor.names.get(cui)
            mark = " ✓" if cui in chosen else ""
            shown.append(f"{cui}{f' {name}' if name else ''} ({row[i]:.2f}{mark})")
        rows.append(f"| {text} | {'; '.join(shown)} |")
    return "\n".join(rows) + "\n"


def build_card(
    model_dir: str | Path,
    run_dir: str | Path | None,
    repo_id: str,
    revision: str | None = None,
    predictor=None,
) -> str:
    """README.md text for ``model_dir`` (a classifier export); ``run_dir`` supplies summary.json
    and config.yaml when available (a bare export gets a card without metrics)."""
    model_dir = Path(model_dir)
    run_dir = Path(run_dir) if run_dir else None
    meta = _read_json(model_dir / "radtrain.json") or {}
    labels = _read_json(model_dir / "labels.json") or {"labels": []}
    thresholds = _read_json(model_dir / "thresholds.json") or {"global": meta.get("threshold", 0.5)}
    config = _read_json(model_dir / "config.json") or {}
    summary = _read_json(run_dir / "summary.json") if run_dir else None
    origin = lineage(meta)
    data = meta.get("data") or {}
    source = public_source(data.get("source")) or "unknown"
    front = yaml.safe_dump(card_metadata(model_dir, summary, repo_id), sort_keys=False, allow_unicode=True)

    base = origin["base_model"]
    if base and base.startswith("scratch:"):
        base_text = f"none: a randomly initialised ModernBERT (`{base}` shape)"
        base_text += ", with a tokenizer trained on the training split"
    elif is_hub_id(base):
        base_text = f"[{base}](https://huggingface.co/{base})"
    else:
        base_text = f"`{public_source(base)}`"
    if origin["mlm_ran"]:
        mlm = origin.get("mlm_summary") or {}
        mlm_val = (mlm.get("validation") or {}).get("loss")
        extra = f", validation MLM loss {mlm_val:.4f}" if isinstance(mlm_val, float) else ""
        mlm_text = (
            f"yes: radtrain's masked-language-modelling phase adapted the base model to radiology text "
            f"(export from step {origin.get('mlm_step')}{extra}), and the classifier was fine-tuned from it"
        )
    elif origin["mlm_ran"] is None:
        mlm_text = (
            f"unknown: initialised from `{public_source(origin['init_from'])}`, which is not available here"
        )
    elif origin["init_from"]:
        mlm_text = f"no: fine-tuned directly from `{public_source(origin['init_from'])}`"
    else:
        mlm_text = "no: the classifier was fine-tuned directly from the base model"

    label_rows = labels.get("labels") or []
    n_labels = len(label_rows)
    threshold_text = decision_rule(thresholds)
    head = "\n".join(
        f"| {row['cui']} | {row.get('name') or ''} | {row.get('count')} |" for row in label_rows[:10]
    )
    split_sizes = (summary or {}).get("split_sizes") or {}
    sizes = " / ".join(f"{split_sizes.get(k, '–')}" for k in ("train", "validation", "test"))
    train = (summary or {}).get("train") or {}
    public_cfg = _public_config(run_dir)
    name = repo_id.split("/")[-1]
    fixed = thresholds.get("fixed", thresholds.get("global"))
    columns = f"text column `{data.get('text_column')}`, labels `{data.get('label_column')}`"
    min_count = labels.get("min_label_count", 1)

    parts = [
        f"---\n{front}---\n",
        f"# {name}\n",
        f"A multi-label classifier that maps a radiology caption or report sentence to UMLS concept IDs "
        f'(CUIs), trained with radtrain in the manner of the "ModernBERT in '
        f'Radiology" series: optional masked-language-model adaptation, then multi-label fine-tuning. '
        f"Each of the {n_labels} outputs is an independent sigmoid probability.\n",
        "## Model\n",
        f"- Base model: {base_text}",
        f"- Radiology MLM phase ran: {mlm_text}",
        f"- Architecture: {config.get('model_type', 'unknown')}, hidden size {config.get('hidden_size')}, "
        f"{config.get('num_hidden_layers')} layers, problem type `{config.get('problem_type')}`",
        f"- Selected checkpoint: step {meta.get('step')} (epoch {meta.get('epoch')}), best validation "
        f"`{meta.get('metric')}` = {_fmt(meta.get('value'))}\n",
        "## Data\n",
        f"- Source: `{source}` ({columns})",
        f"- Split sizes (train / validation / test): {sizes}",
        "- The test split was read once, by the final evaluation of this checkpoint; it played no part in "
        "training, the tokenizer, the label space, threshold choice or model selection.\n"
        if (summary or {}).get("test")
        else "- No test evaluation is published with this checkpoint; the test split played no part in "
        "training, the tokenizer, the label space, threshold choice or model selection.\n",
        "## Labels\n",
        f"- {n_labels} CUIs: those seen at least {min_count} times in the training split "
        "(`data.min_label_count`); rarer concepts cannot be predicted. `config.json` maps output index "
        "to CUI (`id2label`); `labels.json` lists every CUI with its name (where known) and training count.",
        f"- Decision rule (`thresholds.json`): {threshold_text}.\n",
        "Most frequent labels in training:\n",
        "| CUI | Name | Training count |\n|---|---|---:|\n" + head + "\n",
        "## Results\n",
        "Validation metrics are those of the selected step; test metrics are from one evaluation of the "
        f"exported checkpoint. Plain metric names use the fixed threshold {fixed}; names ending in "
        "`_tuned` (where present) use the decision rule above, which is what the usage snippet and "
        "`radtrain predict` apply. `f1_samples` is the per-caption F1 used by ImageCLEF for ROCOv2.\n",
        _metrics_table(summary or {}),
        "## Usage\n",
        "The model is a standard `transformers` sequence classifier; use sigmoid scores (multi-label), not "
        "softmax, and apply the published thresholds:\n",
        _usage(repo_id, revision, int((meta.get("data") or {}).get("max_length") or 256), str(meta.get("precision"))),
        "The repository is private by default: log in first (`hf auth login`) or set `HF_TOKEN`. "
        'With radtrain installed, `radtrain predict --model <downloaded snapshot> "text"` applies the '
        "same thresholds and label names.\n",
        "## Example predictions\n",
        "On made-up captions written for this card (no training text is reproduced here):\n",
        _examples(model_dir, predictor),
        "## Intended use and limitations\n",
        "- Intended for research on radiology text: indexing, retrieval, weak labelling, and as a "
        "baseline for concept detection (e.g. ImageCLEF ROCOv2-style caption concepts).",
        "- **Not for clinical decisions.** It has not been validated clinically and must not be used for "
        "diagnosis, triage or patient care.",
        "- The training labels come from an automatic concept extractor run over the captions, not from "
        "expert annotation: they contain extraction errors and omissions, and the model learns them.",
        f"- It predicts only the {n_labels} CUIs of its label space and sees text only, never images. "
        f"It learned the style of `{source}`: other kinds of text (reports vs. figure captions), other "
        "languages and other institutions' phrasing may score lower.",
        "- Radiology text can contain patient information: do not send identifiable text to a shared "
        "endpoint.\n",
        "## Training configuration\n",
        (
            f"Global batch {train.get('global_batch')} ({train.get('processes')} process(es) x "
            f"{train.get('per_device_batch')} x accumulation {train.get('grad_accum')}), "
            f"{(summary or {}).get('global_steps')} optimizer steps.\n"
            if train
            else ""
        ),
        f"```yaml\n{public_cfg}\n```\n" if public_cfg else "The run's config.yaml was not available.\n",
        "## Files\n",
        "`model.safetensors` (weights), `config.json` (architecture, CUI labels), tokenizer files, "
        "`labels.json`, `thresholds.json`, `radtrain.json` (task, selected step and the data settings needed "
        "to re-evaluate with `radtrain evaluate`).\n",
    ]
    return "\n".join(parts)


def read_front_matter(card: str) -> dict[str, Any]:
    """The YAML front matter of a card as a dict (for tests and for checking before a push)."""
    if not card.startswith("---\n"):
        raise ValueError("model card has no YAML front matter")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]) or {}


def model_index_metrics(front: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{split: {metric type: value}} from the model-index front matter."""
    out: dict[str, dict[str, float]] = {}
    for entry in front.get("model-index") or []:
        for result in entry.get("results") or []:
            split = (result.get("dataset") or {}).get("split")
            for metric in result.get("metrics") or []:
                out.setdefault(split, {})[metric["type"]] = metric["value"]
    return out
