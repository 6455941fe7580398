"""Batched inference with an export: CUIs, their names and probabilities per text.

Thresholds and label names are read from the export (``thresholds.json``, ``labels.json``), so a
model predicts the same CUIs here, after ``radtrain evaluate`` and after a push to the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from radtrain.data.labels import LabelSpace
from radtrain.export import LABELS_FILE, read_meta, read_thresholds


class Predictor:
    def __init__(self, model_dir: str | Path, device: str | None = None, threshold: float | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        config = self.model.config
        self.cuis = [config.id2label[i] for i in range(config.num_labels)]
        labels_path = self.model_dir / LABELS_FILE
        self.names = LabelSpace.load(labels_path).names if labels_path.is_file() else {}
        thresholds = read_thresholds(model_dir)
        base = threshold if threshold is not None else thresholds["global"]
        per_label = thresholds.get("per_label") if threshold is None else None
        self.thresholds = np.array(
            [(per_label or {}).get(c, base) for c in self.cuis], dtype=np.float32
        )
        # 'Always emit the top label' is part of the export's tuned rule; --threshold replaces the rule.
        self.top1 = bool(thresholds.get("top1")) and threshold is None
        self.max_length = int(read_meta(model_dir).get("data", {}).get("max_length", 256))

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[start : start + batch_size], truncation=True, max_length=self.max_length,
                padding=True, return_tensors="pt",
            ).to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.cuis)), dtype=np.float32)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        probs = self.probabilities(texts, batch_size)
        results = []
        from radtrain.thresholds import apply_thresholds

        decisions = apply_thresholds(probs, self.thresholds, self.top1)
        for row, decided in zip(probs, decisions, strict=True):
            chosen = np.flatnonzero(decided)
            chosen = chosen[np.argsort(-row[chosen])]
            results.append({
                "cuis": [
                    {"cui": self.cuis[i], "name": self.names.get(self.cuis[i]), "probability": round(float(row[i]), 4)}
                    for i in chosen
                ],
            })
        return results


def read_texts(path: str | Path, text_column: str = "caption") -> Iterator[str]:
    """Texts from a .jsonl file (field ``text_column`` or ``text``) or a plain text file (one per line)."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
                text = row.get(text_column, row.get("text")) if isinstance(row, dict) else row
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: no string field {text_column!r} or 'text'")
                yield text
            else:
                yield line.rstrip("\n")


def predict_lines(model_dir: str | Path, texts: Iterable[str], threshold: float | None = None,
                  batch_size: int = 32) -> Iterator[str]:
    predictor = Predictor(model_dir, threshold=threshold)
    texts = list(texts)
    for text, result in zip(texts, predictor.predict(texts, batch_size), strict=True):
        yield json.dumps({"text": text, **result}, ensure_ascii=False)
