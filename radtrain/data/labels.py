"""The CUI label space: fitted on the training split only, saved as labels.json."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radtrain.data.sources import CUI_PATTERN, DataError
from radtrain.io import write_json

log = logging.getLogger(__name__)


@dataclass
class LabelSpace:
    cuis: list[str]
    counts: list[int]
    names: dict[str, str]
    min_count: int = 1

    def __post_init__(self) -> None:
        self.index = {cui: i for i, cui in enumerate(self.cuis)}

    def __len__(self) -> int:
        return len(self.cuis)

    @classmethod
    def fit(
        cls, train_labels: Sequence[Sequence[str]], min_count: int = 1, names: dict[str, str] | None = None
    ) -> LabelSpace:
        """Like the seed's MultiLabelBinarizer fitted on train, plus a frequency cut.

        Labels are ordered by training frequency (most frequent first), ties by CUI, so the
        order is deterministic and the head of the list is what matters most.
        """
        counter = Counter(cui for labels in train_labels for cui in labels)
        if not counter:  # not a frequency cut: no caption has a label at all
            raise DataError(
                f"none of the {len(train_labels)} training captions has a label: check that data.label_column "
                "names the column holding the CUIs (and data.label_delimiter how they are separated)"
            )
        kept = sorted((c for c, n in counter.items() if n >= min_count), key=lambda c: (-counter[c], c))
        if not kept:
            raise DataError(
                f"no labels left after data.min_label_count={min_count}: the most frequent CUI appears "
                f"{max(counter.values(), default=0)} times in training. Lower data.min_label_count."
            )
        _warn_non_cuis(counter)
        dropped = len(counter) - len(kept)
        if dropped:
            log.info("label space: kept %d CUIs seen >= %d times, dropped %d rarer ones", len(kept), min_count, dropped)
        names = names or {}
        return cls(
            cuis=kept, counts=[counter[c] for c in kept], names={c: names[c] for c in kept if c in names},
            min_count=min_count,
        )

    def name(self, cui: str) -> str:
        return self.names.get(cui, cui)

    def encode(self, labels: Sequence[Sequence[str]], split_name: str = "") -> np.ndarray:
        """Multi-hot matrix (float32). Unknown CUIs are dropped and counted in one warning."""
        offsets, columns = self.encode_sparse(labels, split_name)
        matrix = np.zeros((len(labels), len(self.cuis)), dtype=np.float32)
        matrix[np.repeat(np.arange(len(labels)), np.diff(offsets)), columns] = 1.0
        return matrix

    def encode_sparse(self, labels: Sequence[Sequence[str]], split_name: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Each caption's label indices, ascending and distinct, as (offsets, columns): caption i's
        are ``columns[offsets[i]:offsets[i + 1]]``. Unknown CUIs are dropped and counted in one warning."""
        offsets = np.zeros(len(labels) + 1, dtype=np.int64)
        columns: list[int] = []
        unseen = 0
        for row, cuis in enumerate(labels):
            known = {self.index.get(cui) for cui in cuis}
            unseen += sum(cui not in self.index for cui in cuis)
            known.discard(None)
            columns.extend(sorted(known))
            offsets[row + 1] = len(columns)
        if unseen and split_name and split_name != "train":
            log.warning(
                "%s: %d label occurrences are CUIs outside the training label space (unseen in training or "
                "under min_label_count); they are dropped from the targets",
                split_name, unseen,
            )
        return offsets, np.asarray(columns, dtype=np.int32)

    def count_outside(self, labels: Sequence[Sequence[str]]) -> np.ndarray:
        """Per caption, its distinct gold CUIs outside the label space (what ``encode`` drops):
        ImageCLEF's per-caption F1 counts them as missed."""
        return np.array([len({c for c in cuis if c not in self.index}) for cuis in labels], dtype=np.int32)

    def to_json(self) -> dict:
        return {
            "min_label_count": self.min_count,
            "labels": [
                {"cui": c, "name": self.names.get(c), "count": n} for c, n in zip(self.cuis, self.counts, strict=True)
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelSpace:
        """A labels.json written by ``save``; anything else is a DataError naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            labels = data["labels"]
            return cls(
                cuis=[str(item["cui"]) for item in labels],
                counts=[int(item.get("count") or 0) for item in labels],
                names={item["cui"]: item["name"] for item in labels if item.get("name")},
                min_count=int(data.get("min_label_count", 1)),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(
                f"{path}: not a radtrain labels.json ({type(exc).__name__}: {exc}); copy it from the run's best/"
            ) from exc


def _warn_non_cuis(counter: Counter) -> None:
    """Labels that are CUIs with other strings among them are, most likely, label strings cut at the
    wrong places ("C0040405: X-ray CT" split on spaces): each piece would train as a label. A label
    space with no CUI at all is another vocabulary and is left alone."""
    others = [label for label in counter if not CUI_PATTERN.fullmatch(label)]
    if not others or not any(CUI_PATTERN.search(label) for label in counter):
        return
    examples = sorted(others, key=lambda label: (-counter[label], label))[:5]
    log.warning(
        "%d of the %d distinct training labels are not CUIs (C and 7 digits) although others are, e.g. %s "
        "(%d occurrences in all): if they are pieces of label strings, set data.label_delimiter to what "
        "separates the labels",
        len(others), len(counter), ", ".join(repr(label) for label in examples), sum(counter[o] for o in others),
    )


def load_name_mapping(path: str | os.PathLike) -> dict[str, str]:
    """CUI -> name from a JSON object file or a two-column csv/tsv (cui, name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.label_names={str(path)!r}: no such file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"data.label_names={str(path)!r}: not a JSON file in UTF-8 ({exc})") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object mapping CUI to name")
        return {str(k): str(v) for k, v in data.items()}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if len(row) >= 2]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"data.label_names={str(path)!r}: unreadable as UTF-8 CSV/TSV ({exc})") from exc
    if rows and rows[0][0].lower() in ("cui", "id", "concept"):
        rows = rows[1:]
    return {row[0].strip(): row[1].strip() for row in rows}
