"""Read captions and labels from a Hub dataset, a directory of split files, or one file.

Only the text and label columns (and an optional name column) are read. Parquet is read by
column, so an image column is never loaded or decoded. Each record keeps where it came from
(file and line/row) so bad input can be reported precisely.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radtrain.config import DataConfig

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# A record id, when the data has one (ROCO: image_id). Used only to report duplicated rows and
# rows shared between splits; records are never dropped or merged because of it.
ID_COLUMNS = ("image_id", "id")


class DataError(ValueError):
    """Input data the user must fix; the message names the file/row and the fix."""


@dataclass
class Split:
    """One split as plain lists: small enough (ROCOv2: 60k captions) to hold in memory."""

    texts: list[str]
    labels: list[list[str]]
    origin: str
    dropped_empty: int = 0
    names: dict[str, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    """Parallel to texts when the data has an id column (ID_COLUMNS), else empty."""

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Iterable[int], origin: str | None = None) -> Split:
        idx = list(indices)
        return Split(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            origin=origin or self.origin,
            names=self.names,
            ids=[self.ids[i] for i in idx] if self.ids else [],
        )


# A UMLS CUI: "C" and 7 digits. A lower-case "c0040405" is the same concept as "C0040405".
CUI_PATTERN = re.compile(r"[Cc]\d{7}")


def _label(item: str) -> str:
    """One label as the label space keys it: stripped, and a CUI in upper case (other
    vocabularies' labels are kept as written)."""
    item = item.strip()
    return item.upper() if CUI_PATTERN.fullmatch(item) else item


def parse_labels(value: Any, delimiter: str, where: str) -> list[str]:
    """Labels as a list, or one delimited string ('C1;C2', 'C1 C2', "['C1', 'C2']")."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise DataError(f"{where}: label {item!r} is not a string; labels must be CUI strings")
            item = _label(item)
            if item:
                out.append(item)
        return out
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("[") and "," not in text:
            # numpy's repr of a list column, which pandas' and datasets' to_csv write: "['C1' 'C2']",
            # wrapped over lines. literal_eval would join the adjacent strings into ONE label 'C1C2'.
            quoted = re.findall(r"'([^']*)'|\"([^\"]*)\"", text)
            items = [a or b for a, b in quoted] if quoted else text.strip("[]").split()
            return parse_labels(items, delimiter, where)
        if text.startswith("["):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise DataError(f"{where}: label string {text[:60]!r} looks like a list but does not parse") from exc
            return parse_labels(parsed, delimiter, where)
        parts = _split_auto(text) if delimiter == "auto" else text.split(delimiter)
        return [_label(p) for p in parts if p.strip()]
    raise DataError(
        f"{where}: labels must be a list of strings or a delimited string, got {type(value).__name__} {value!r}"
    )


def _split_auto(text: str) -> list[str]:
    """data.label_delimiter=auto: ; , and | separate labels, and a name between them keeps its
    spaces ("Pleural effusion|Cardiomegaly" is two labels, not three); a piece with a code in it
    (a word with a digit: "C0032227 C0018800; C0040405", "C0040405: X-Ray CT") is split on
    whitespace too, and so is a string without any of ; , | (labels separated by spaces)."""
    pieces = re.split(r"[;,|]", text)
    labels: list[str] = []
    for piece in pieces:
        words = piece.split()
        if len(pieces) == 1 or any(char.isdigit() for word in words for char in word):
            labels.extend(words)
        elif words:
            labels.append(" ".join(words))
    return labels


# utf-8-sig: UTF-8 that skips a leading byte-order mark (Excel's "CSV UTF-8", some editors'
# JSON), which would otherwise become part of the first column's name or break the first line.
ENCODING = "utf-8-sig"


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding=ENCODING) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: malformed JSON ({exc.msg}); fix or delete that line"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            yield f"{path}:{number}", row


def _iter_json(path: Path, text_column: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding=ENCODING))
    except json.JSONDecodeError as exc:
        # Many ".json" files are really JSON lines.
        if exc.msg == "Extra data":
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from exc
    if isinstance(data, dict) and isinstance(data.get(text_column), str):
        data = [data]  # one record (its one list value is its labels, not a list of records)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif len(lists) == 1:
            data = lists[0]
        elif all(isinstance(v, list) for v in data.values()):
            # Column-oriented: {"caption": [...], "cui": [...]}
            sizes = {key: len(values) for key, values in data.items()}
            if len(set(sizes.values())) > 1:
                raise DataError(f"{path}: its columns have different lengths {sizes}; each needs one value per row")
            keys = list(data)
            data = [dict(zip(keys, values, strict=True)) for values in zip(*data.values(), strict=True)]
        else:
            raise DataError(f"{path}: expected a list of records, {{'data': [...]}} or columns of lists")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    for number, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{number}]: expected an object, got {type(row).__name__}")
        yield f"{path}[{number}]", row


def _iter_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    tsv = path.suffix.lower() == ".tsv"
    delimiter = "\t" if tsv else ","
    with path.open(encoding=ENCODING, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            where = f"{path}:{number}" if reader.line_num == number else f"{path} record {number - 1} (line {reader.line_num})"
            if any(str(extra).strip() for extra in row.get(None) or []):  # DictReader's place for fields beyond the header's
                raise DataError(
                    f"{where}: more fields than the header's {len(reader.fieldnames or [])}; a caption holding "
                    f"the delimiter {delimiter!r} must be quoted (\"...\")"
                )
            if tsv and any(isinstance(v, str) and "\t" in v and "\n" in v for v in row.values()):
                # Unquoted TSV (ROCO's own files) with a caption that starts with a lone double quote:
                # the reader takes every row up to the next quote as one field, silently. (A quoted
                # field may hold a line break or a tab; both at once means whole rows were taken.)
                raise DataError(
                    f"{where}: a field spans several lines and tabs, so rows were joined: a caption that starts "
                    "with a double quote (\") is read as a quoted field up to the next quote. Balance or remove "
                    "that quote (or quote the whole field, doubling the quotes inside it)"
                )
            row.pop(None, None)  # empty trailing fields (a trailing delimiter)
            # A row with fewer fields than the header: its missing fields are missing, as a JSON
            # line's missing key is (a missing label field is an error, not "no labels").
            yield where, {key: value for key, value in row.items() if value is not None}


def _iter_parquet(path: Path, columns: list[str], required: int) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    present = [c for c in columns if c in schema.names]
    # Checked against the file's schema: the rows hold only the columns read, so a later check
    # could list only those, hiding the name the user meant (e.g. "cuis").
    _require_columns(path, schema.names, columns[:required])
    # Reading by column means an image column is never read from disk, let alone decoded.
    table = pq.read_table(path, columns=present)
    for number, row in enumerate(table.to_pylist()):
        yield f"{path} row {number}", row


def _require_columns(where: Any, existing: Iterable[str], wanted: list[str]) -> None:
    existing = list(existing)
    missing = [c for c in wanted if c not in existing]
    if missing:
        raise DataError(
            f"{where}: column(s) {missing} not found; columns present: {existing}. "
            "Set data.text_column / data.label_column to the right names."
        )


def read_rows(path: Path, columns: list[str], required: int = 1) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a .jsonl/.json/.csv/.tsv/.parquet file, as training reads it; ``columns``
    are the ones a parquet file needs to read, the text column first; the first ``required`` of
    them must exist."""
    return _rows(Path(path), columns, required)


def _rows(path: Path, columns: list[str], required: int = 1) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _readable(path, _iter_jsonl(path))
    if suffix == ".json":
        return _readable(path, _iter_json(path, columns[0]))
    if suffix in (".csv", ".tsv"):
        return _readable(path, _iter_csv(path))
    if suffix == ".parquet":
        return _readable(path, _iter_parquet(path, columns, required))
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {FILE_SUFFIXES}")


def _readable(path: Path, rows: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The readers' own failures on a damaged or foreign file, as a DataError that names it."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        with path.open("rb") as handle:
            if handle.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # Excel's "Unicode text" and Notepad's "Unicode"
                raise DataError(
                    f"{path}: UTF-16 text, not UTF-8; re-save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)"
                ) from exc
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason}: byte {exc.object[exc.start:exc.start + 1]!r}); re-save it as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from exc
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable as CSV/TSV ({exc}); check its quoting") from exc
    except DataError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("pyarrow"):  # ArrowInvalid and kin: not a (whole) parquet file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
        raise


def _collect(
    rows: Iterable[tuple[str, dict[str, Any]]], cfg: DataConfig, origin: str, need_labels: bool = True
) -> Split:
    texts: list[str] = []
    labels: list[list[str]] = []
    names: dict[str, str] = {}
    dropped: list[str] = []
    ids: list[str] = []
    first_seen: dict[str, str] = {}
    duplicates: list[str] = []
    id_column = None
    checked_columns = False
    for where, row in rows:
        if not checked_columns:
            _require_columns(origin, row.keys(), [cfg.text_column] + ([cfg.label_column] if need_labels else []))
            id_column = next((c for c in ID_COLUMNS if c in row and c not in (cfg.text_column, cfg.label_column)), None)
            checked_columns = True
        if need_labels and cfg.label_column not in row:
            raise DataError(f"{where}: no {cfg.label_column!r} field; fields present: {sorted(row)}")
        text = row.get(cfg.text_column)
        if not isinstance(text, str) or not text.strip():
            dropped.append(where)
            continue
        # Labels a phase does not use are not parsed: MLM reads the text of any labelled corpus.
        cuis = parse_labels(row.get(cfg.label_column), cfg.label_delimiter, where) if need_labels else []
        if need_labels and cfg.label_name_column and row.get(cfg.label_name_column) is not None:
            row_names = parse_labels(row[cfg.label_name_column], "|", where)
            if len(row_names) == len(cuis):
                names.update(zip(cuis, row_names, strict=True))
        if id_column is not None:
            record_id = str(row.get(id_column))
            if record_id in first_seen:
                duplicates.append(f"{id_column}={record_id!r} at {first_seen[record_id]} and {where}")
            else:
                first_seen[record_id] = where
            ids.append(record_id)
        texts.append(text.strip())
        labels.append(list(dict.fromkeys(cuis)))  # de-duplicate, keep order
    if dropped:
        log.warning(
            "%s: dropped %d empty or non-string captions (first: %s); fix those rows, or set data.text_column "
            "if the captions are in another field",
            origin, len(dropped), ", ".join(dropped[:3]),
        )
    if duplicates:
        log.warning(
            "%s: %d duplicate ids (%s); the rows are all kept. If they are copies, delete them: a copy weighs "
            "its caption twice", origin, len(duplicates), "; ".join(duplicates[:3]),
        )
    return Split(texts=texts, labels=labels, origin=origin, dropped_empty=len(dropped), names=names, ids=ids)


def _warn_shared_records(splits: dict[str, Split]) -> None:
    """A record in two splits inflates the held-out scores; say which ones (kept as they are).

    Ids name the same record; an identical caption may be another image (ROCO has many "Chest
    X-ray." captions), so it is counted, as the share of held-out captions a model has seen verbatim
    in training, not called a leak."""
    names = [n for n in ("train", "validation", "test") if n in splits and splits[n].ids]
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(set(splits[first].ids) & set(splits[second].ids))
            if shared:
                log.warning(
                    "%d ids are in both the %s split (%s) and the %s split (%s), e.g. %s: their %s scores are "
                    "optimistic. Remove them from one of the files.",
                    len(shared), first, splits[first].origin, second, splits[second].origin,
                    ", ".join(shared[:5]), second,
                )
    if "train" not in splits:
        return
    seen = {_caption_key(text) for text in splits["train"].texts}
    for name in ("validation", "test"):
        if name not in splits:
            continue
        held_out = splits[name].texts
        repeated = [text for text in held_out if _caption_key(text) in seen]
        if repeated:
            log.warning(
                "%d of the %d %s captions (%.1f%%) are word for word a training caption, e.g. %s: kept (another "
                "image may share a short caption), but the model has seen those texts, and their labels may "
                "be the training ones",
                len(repeated), len(held_out), name, 100 * len(repeated) / len(held_out),
                "; ".join(repr(text[:60]) for text in list(dict.fromkeys(repeated))[:3]),
            )


def _caption_key(text: str) -> str:
    return " ".join(text.casefold().split())


def _find_split_files(directory: Path) -> dict[str, list[Path]]:
    """A split's files: ``train.jsonl`` (any supported suffix) or the Hub's shards
    ``train-00000-of-00002[-<hash>].parquet``. Other data files are not read, and a warning names
    them: ones that start like a split's (``train_v1.jsonl``, an old copy; ``test_metrics.json``;
    ROCOv2's ``train_captions.csv``) would be added to the split silently, and ``eval.jsonl`` or
    ``heldout.csv`` may be the held-out split the user meant."""
    found: dict[str, list[Path]] = {}
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    for split, aliases in SPLIT_ALIASES.items():
        names = "|".join(aliases)
        pattern = re.compile(rf"^({names})(-\d+-of-\d+(-[0-9a-f]+)?)?$", re.IGNORECASE)
        matches = [p for p in files if pattern.match(p.stem)]
        plain = [p for p in matches if "-of-" not in p.stem]
        if len(plain) > 1:
            raise DataError(
                f"{directory}: {len(plain)} files for the {split} split ({', '.join(p.name for p in plain)}); keep one"
            )
        if matches:
            found[split] = matches
    data_dir = directory / "data"
    if not found and data_dir.is_dir():
        return _find_split_files(data_dir)
    read = {p for paths in found.values() for p in paths}
    unread = [p.name for p in files if p not in read]
    if unread:
        # eval.jsonl or heldout.jsonl may be the held-out split the user meant: never drop one silently.
        log.warning(
            "%s: not read: %s. A split's files are named train, validation (or valid/val/dev) and test, with a "
            "data suffix (.jsonl/.json/.csv/.tsv/.parquet) or as the Hub's train-00000-of-0000N.parquet shards; rename "
            "the ones you mean%s", directory, ", ".join(unread),
            "" if "validation" in found else " (without a validation file, one is cut from train)",
        )
    return found


def _resplit_validation(splits: dict[str, Split], cfg: DataConfig) -> None:
    """The seed's recipe: validation = fraction x (train + test), drawn from the shuffled train split.

    Matches ``datasets.Dataset.train_test_split(test_size=n, seed=42)``: a permutation from
    ``np.random.default_rng(seed)``, validation = its first n indices, train = the rest.
    """
    train = splits["train"]
    total = len(train) + (len(splits["test"]) if "test" in splits else 0)
    n_val = max(1, int(round(cfg.validation_fraction * total)))
    if n_val >= len(train):
        raise DataError(
            f"{train.origin}: train split has {len(train)} captions, too few to hold out {n_val} for validation"
        )
    permutation = np.random.default_rng(cfg.split_seed).permutation(len(train))
    splits["validation"] = train.select(permutation[:n_val].tolist(), origin=f"{train.origin} (validation cut)")
    splits["train"] = train.select(permutation[n_val:].tolist())
    log.info(
        "%s: no validation split, so %d of its %d training captions are held out for validation "
        "(data.validation_fraction=%s of train + test, data.split_seed=%d)",
        train.origin, n_val, len(train), cfg.validation_fraction, cfg.split_seed,
    )


def _split_single_file(split: Split, cfg: DataConfig) -> dict[str, Split]:
    permutation = np.random.default_rng(cfg.split_seed).permutation(len(split))
    n_test = max(1, int(round(cfg.test_fraction * len(split))))
    test = split.select(permutation[:n_test].tolist(), origin=f"{split.origin} (test cut)")
    train = split.select(permutation[n_test:].tolist())
    return {"train": train, "test": test}


def _not_local(source: str) -> str:
    return f"no file or directory {str(Path(source).expanduser().absolute())!r} exists"


def _load_hub(cfg: DataConfig, need_labels: bool) -> dict[str, Split]:
    import datasets
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(cfg.source)
    except ValueError as exc:  # a mistyped path more often than a mistyped Hub id
        raise DataError(
            f"data.source={cfg.source!r}: {_not_local(cfg.source)}, and it is not a Hub dataset id ({exc}). Give an "
            "existing file or directory, or a Hub id such as unsloth/Radiology_mini"
        ) from None
    columns = _columns(cfg)
    try:
        try:
            # Parquet-backed Hub datasets (ROCOv2, Radiology_mini) accept `columns`: the image column
            # is then never downloaded into the Arrow cache, let alone decoded.
            dataset_dict = datasets.load_dataset(cfg.source, columns=columns)
        except (TypeError, ValueError) as exc:
            log.warning(
                "data.source=%r does not accept a column selection (%s): loading EVERY column, images "
                "included; the first load can download and cache many GB more than the %s used here",
                cfg.source, exc, columns,
            )
            dataset_dict = datasets.load_dataset(cfg.source)
    except datasets.exceptions.DatasetGenerationError as exc:
        # A column selection naming a column the dataset lacks fails inside the parquet reader
        # (pyarrow's "No match for FieldRef.Name(...)"), whose message lists the dataset's columns.
        cause = exc.__cause__ or exc.__context__ or exc
        raise DataError(
            f"data.source={cfg.source!r}: reading the columns {columns} failed: {str(cause)[:600]}. "
            "Set data.text_column / data.label_column / data.label_name_column to the dataset's column names"
            + ("" if need_labels else " (a corpus without labels, for the MLM phase: data.label_column=null)")
        ) from exc
    except ConnectionError as exc:  # HF_HUB_OFFLINE=1 and not cached (or no network): say what to fetch
        raise DataError(
            f"data.source={cfg.source!r}: {exc}. Offline? Run `radtrain prefetch --data {cfg.source}` (same data.* "
            f"settings) where the Hub is reachable, with the HF_HOME this job uses. (Meant a local path? "
            f"{_not_local(cfg.source)}.)"
        ) from exc
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError: no such dataset, or gated/private
        raise DataError(
            f"data.source={cfg.source!r}: {_not_local(cfg.source)}, and the Hub has no dataset of that name that "
            f"this job may read ({str(exc)[:300]}). Check the spelling; a private or gated dataset needs "
            "`hf auth login` (or HF_TOKEN) and its terms accepted on its Hub page"
        ) from exc
    splits: dict[str, Split] = {}
    for name, dataset in dataset_dict.items():
        canonical = next((k for k, aliases in SPLIT_ALIASES.items() if name.lower() in aliases), None)
        if canonical is None:
            continue
        _require_columns(f"{cfg.source} [{name}]", dataset.column_names, columns[: 2 if need_labels else 1])
        dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
        rows = ((f"{cfg.source} [{name}] row {i}", row) for i, row in enumerate(dataset))
        splits[canonical] = _collect(rows, cfg, f"{cfg.source} [{name}]", need_labels)
    return splits


def _columns(cfg: DataConfig) -> list[str]:
    """The columns radtrain reads (a parquet file is read by column: images never are). The same
    whether or not the phase needs the labels, so that one download and cache serves both phases."""
    return [c for c in (cfg.text_column, cfg.label_column, cfg.label_name_column) if c]


def _check_labels_wanted(cfg: DataConfig, need_labels: bool) -> None:
    if need_labels and not cfg.label_column:
        raise DataError(
            f"data.source={cfg.source!r}: data.label_column is null (a text-only corpus), but this needs labels: "
            "name the column holding the CUIs (data.label_column=cui)"
        )


def _read_file(path: Path, cfg: DataConfig, need_labels: bool) -> Split:
    rows = _rows(path, _columns(cfg) + list(ID_COLUMNS), required=2 if need_labels else 1)
    return _collect(rows, cfg, str(path), need_labels)


def load_file(cfg: DataConfig, need_labels: bool = True) -> Split:
    """Every caption of the one file ``cfg.source`` as a single split (no train/test cut): a
    held-out file to evaluate."""
    _check_labels_wanted(cfg, need_labels)
    source = Path(cfg.source).expanduser()
    if not source.is_file():
        raise DataError(f"data.source={cfg.source!r}: no such file")
    split = _read_file(source, cfg, need_labels)
    if len(split) == 0:
        raise DataError(f"{source}: no usable captions (no rows, or every {cfg.text_column!r} empty or not a string)")
    return split


def load_splits(cfg: DataConfig, need_labels: bool = True) -> dict[str, Split]:
    """Return {'train', 'validation', 'test'} splits for ``cfg.source``.

    A source without a validation split gets one by the seed's re-split; one file is first cut
    into train and test (``data.test_fraction``).
    """
    _check_labels_wanted(cfg, need_labels)
    source = Path(cfg.source).expanduser()
    columns = _columns(cfg)
    if source.is_dir():
        files = _find_split_files(source)
        if "train" not in files:
            present = sorted(p.name for p in source.iterdir())
            raise DataError(
                f"{source}: no train file found (looked for train.jsonl/.json/.csv/.tsv/.parquet); "
                f"files present: {present}"
            )
        splits = {}
        for name, paths in files.items():
            rows = (
                row for path in paths for row in _rows(path, columns + list(ID_COLUMNS), 2 if need_labels else 1)
            )
            splits[name] = _collect(rows, cfg, ", ".join(str(p) for p in paths), need_labels)
    elif source.is_file():
        splits = _split_single_file(_read_file(source, cfg, need_labels), cfg)
    elif source.exists() or cfg.source.startswith((".", "/", "~")) or Path(cfg.source).suffix in FILE_SUFFIXES:
        raise DataError(f"data.source={cfg.source!r}: no such file or directory")
    else:
        splits = _load_hub(cfg, need_labels)
        if "train" not in splits:
            raise DataError(f"data.source={cfg.source!r}: the dataset has no train split")
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(
                f"{split.origin}: the {name} split has no usable captions (no rows, or every "
                f"{cfg.text_column!r} empty or not a string). Fill it, or point data.text_column at the caption "
                "field" + ("; without a validation file one is cut from train" if name == "validation" else "")
            )
    if "validation" not in splits:
        _resplit_validation(splits, cfg)
    _warn_shared_records(splits)
    if "test" not in splits:
        log.warning("%s has no test split: the final test evaluation will be skipped", cfg.source)
    if cfg.max_train_samples:
        splits["train"] = splits["train"].select(range(min(cfg.max_train_samples, len(splits["train"]))))
    if cfg.max_eval_samples:
        for name in ("validation", "test"):
            if name in splits:
                splits[name] = splits[name].select(range(min(cfg.max_eval_samples, len(splits[name]))))
    return splits
