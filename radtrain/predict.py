"""Batched inference with an export: CUIs, their names and probabilities per text.

Thresholds and label names are read from the export (``thresholds.json``, ``labels.json``), so a
model predicts the same CUIs here, after ``radtrain evaluate`` and after a push to the Hub.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from radtrain.config import ConfigError
from radtrain.data.labels import LabelSpace
from radtrain.data.sources import ENCODING, FILE_SUFFIXES, DataError, read_rows
from radtrain.export import LABELS_FILE, read_meta, read_thresholds
from radtrain.io import read_json
from radtrain.thresholds import apply_thresholds, threshold_vector

log = logging.getLogger(__name__)


def check_export(model_dir: Path) -> None:
    """A classifier export (a classify run's best/), checked before anything is loaded."""
    if not (model_dir / "config.json").is_file():
        what = "no such directory" if not model_dir.exists() else "not a model directory (no config.json)"
        raise ConfigError(f"--model {model_dir}: {what}; pass a classify run's best/ directory")
    task = read_meta(model_dir).get("task")
    if task is not None and task != "classify":
        raise ConfigError(
            f"--model {model_dir}: radtrain.json says task {task!r}; predict and evaluate need a classifier "
            "export (a classify run's best/)"
        )
    if not isinstance(read_json(model_dir / "config.json"), dict):  # a damaged one named, not "Offline?"
        raise ConfigError(f"--model {model_dir}: config.json is not a JSON object; copy it from the run's best/")
    missing = [
        f"{what} file ({', '.join(names)})" for what, names in (("weights", WEIGHT_PATTERNS), ("tokenizer", TOKENIZER_PATTERNS))
        if not any(any(model_dir.glob(name)) for name in names)
    ]
    if missing:
        raise ConfigError(
            f"--model {model_dir}: incomplete model directory, no {'; no '.join(missing)}; copy the whole best/ "
            "directory"
        )


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


class Predictor:
    """``precision`` (``no``/``fp32`` or ``bf16``) defaults to the precision the run evaluated in
    (its radtrain.json): a GPU run evaluates, and tunes its thresholds, under bf16 autocast, and
    fp32 probabilities would differ enough to move decisions near a threshold."""

    def __init__(
        self, model_dir: str | Path, device: str | None = None, threshold: float | None = None,
        precision: str | None = None,
    ):
        from radtrain.models import load_tokenizer
        from radtrain.phase import load_export_classifier

        self.model_dir = Path(model_dir)
        check_export(self.model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(str(self.model_dir))
        # The same loader as the run's test evaluation: a whole plain model on every process, also
        # inside a ZeRO-3 run (`radtrain demo` under accelerate launch), where a bare from_pretrained
        # would be partitioned and the forward pass would wait on ranks that never call it.
        self.model = load_export_classifier(self.model_dir).to(self.device).eval()
        config = self.model.config
        self.cuis = [config.id2label[i] for i in range(config.num_labels)]
        labels_path = self.model_dir / LABELS_FILE
        self.names = LabelSpace.load(labels_path).names if labels_path.is_file() else {}
        thresholds = read_thresholds(self.model_dir)
        if threshold is not None:
            # --threshold replaces the whole tuned rule: one number for every label, no top1.
            thresholds = {"global": threshold, "per_label": None, "top1": False}
        self.thresholds = threshold_vector(thresholds, self.cuis)
        # 'Always emit the top label' is part of the export's tuned rule.
        self.top1 = bool(thresholds.get("top1"))
        meta = read_meta(self.model_dir)
        self.max_length = int(meta.get("data", {}).get("max_length", 256))
        self.precision = {"fp32": "no"}.get(precision or "", precision) or meta.get("precision") or "no"
        if self.precision not in ("no", "bf16"):
            raise ConfigError(f"precision {self.precision!r}: use fp32 or bf16")
        if self.precision == "no":  # fp32 asked of a bf16 export (DeepSpeed bf16): compute in fp32
            self.model.float()

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        from radtrain.phase import export_autocast

        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                # Stripped as training and evaluation strip every caption (data/sources.py).
                [text.strip() for text in texts[start : start + batch_size]], truncation=True, max_length=self.max_length,
                padding=True, return_tensors="pt",
            ).to(self.device)
            with export_autocast(self.model, self.precision, self.device):
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.cuis)), dtype=np.float32)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        probs = self.probabilities(texts, batch_size)
        results = []
        decisions = apply_thresholds(probs, self.thresholds, self.top1)
        for text, row, decided in zip(texts, probs, decisions, strict=True):
            # A blank text has no findings: no CUI, though always_top1 would emit one (the model's
            # prior for the empty caption, which training never saw: it drops blank captions).
            chosen = np.flatnonzero(decided) if text.strip() else np.zeros(0, dtype=np.int64)
            chosen = chosen[np.argsort(-row[chosen])]
            results.append({
                "cuis": [
                    {"cui": self.cuis[i], "name": self.names.get(self.cuis[i]), "probability": round(float(row[i]), 4)}
                    for i in chosen
                ],
            })
        return results


INPUT_FORMATS = ("auto", "text", "jsonl")


def _stdin_lines() -> Iterator[str]:
    """Standard input, line by line, decoded here strictly: the interpreter's own decoding passes
    undecodable bytes on as surrogates, which the tokenizer then fails on with a traceback."""
    buffer = getattr(sys.stdin, "buffer", None)
    # Training's encoding: a leading byte-order mark (Notepad, Excel) is not part of the first text.
    stream = io.TextIOWrapper(buffer, encoding=ENCODING) if buffer is not None else sys.stdin
    try:
        yield from stream
    finally:
        if buffer is not None:
            stream.detach()  # sys.stdin keeps its buffer


def _file_lines(path: Path) -> Iterator[str]:
    try:
        handle = path.open(encoding=ENCODING)  # as training reads its files
    except OSError as exc:
        raise DataError(f"--input {path}: cannot read ({exc.strerror or exc})") from exc
    with handle:
        yield from handle


def read_texts(path: str | Path, text_column: str = "caption", input_format: str = "auto") -> Iterator[str]:
    """Texts from a .jsonl file (field ``text_column``, else ``text``, else ``caption``), a
    .json/.csv/.tsv/.parquet file (the same fields, read as training reads these), or any other file as
    plain text (one per line, blank lines included, so that output line N answers input line N); ``-``
    is standard input. ``input_format`` "text" or "jsonl" overrides what the name implies (standard
    input is plain text unless told). Unreadable or malformed input raises DataError (exit 2) naming
    the file and line."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError(f"--input-format {input_format!r}: use one of {INPUT_FORMATS}")
    stdin = str(path) == "-"
    path = Path(path)
    suffix = "" if stdin else path.suffix.lower()
    if input_format == "auto" and suffix in FILE_SUFFIXES and suffix != ".jsonl":
        yield from _table_texts(path, text_column)
        return
    jsonl = input_format == "jsonl" or (input_format == "auto" and suffix == ".jsonl")
    name = "standard input" if stdin else str(path)
    lines = _stdin_lines() if stdin else _file_lines(path)
    number = 0
    try:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not jsonl:
                if stdin and number == 1 and input_format == "auto" and _is_json_object(line):
                    log.warning(
                        "standard input line 1 is a JSON object, scored as plain text (the whole line is the text); "
                        "for JSON lines pass --input-format jsonl"
                    )
                yield line
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{number}: malformed JSON ({exc.msg}); one JSON object per line") from exc
            text = _first_text(row, text_column) if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise DataError(f"{name}:{number}: no string field {_columns_text(text_column)} (--text-column)")
            yield text
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: line {number + 1} is not UTF-8 text ({exc.reason})") from exc


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _table_texts(path: Path, text_column: str) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    columns = _text_columns(text_column)
    if path.suffix.lower() == ".parquet":  # read_rows requires the first column it is given
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(path).names)
        except Exception:  # noqa: BLE001 - read_rows reports an unreadable file as a DataError
            names = set()
        columns = [c for c in columns if c in names] or columns
    for where, row in read_rows(path, columns):
        text = _first_text(row, text_column)
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field {_columns_text(text_column)} (fields: {sorted(row)}; --text-column)")
        yield text


def _text_columns(text_column: str) -> list[str]:
    """Where a text is looked for: the given column, then 'text', then 'caption'."""
    return list(dict.fromkeys([text_column, "text", "caption"]))


def _columns_text(text_column: str) -> str:
    return " or ".join(repr(c) for c in _text_columns(text_column))


def _first_text(row: dict, text_column: str):
    for column in _text_columns(text_column):
        if isinstance(row.get(column), str):
            return row[column]
    return None


def export_text_column(model_dir: str | Path) -> str:
    """The text column the export was trained on (its radtrain.json), 'caption' when unrecorded."""
    try:
        return str(read_meta(Path(model_dir)).get("data", {}).get("text_column") or "caption")
    except (OSError, ValueError):
        return "caption"


# Texts scored per chunk: memory stays bounded (probabilities of 1M texts x 2k labels would be
# 8 GB) and lines appear as they are ready.
PREDICT_CHUNK = 1024


def predict_lines(model_dir: str | Path, texts: Iterable[str], threshold: float | None = None,
                  batch_size: int = 32, precision: str | None = None) -> Iterator[str]:
    iterator = iter(texts)
    chunk = list(itertools.islice(iterator, PREDICT_CHUNK))  # bad input in it fails before the model loads
    predictor = Predictor(model_dir, threshold=threshold, precision=precision)
    while chunk:
        for text, result in zip(chunk, predictor.predict(chunk, batch_size), strict=True):
            yield json.dumps({"text": text, **result}, ensure_ascii=False)
        chunk = list(itertools.islice(iterator, PREDICT_CHUNK))
