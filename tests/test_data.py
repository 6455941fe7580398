"""Data sources, the seed's validation re-split, label parsing and the label space."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from radtrain.config import ConfigError, DataConfig, load_config
from radtrain.data.labels import LabelSpace
from radtrain.data.sources import DataError, load_splits, parse_labels

ROWS = [
    {"image_id": f"X{i}", "caption": f"Axial CT of the abdomen number {i}.", "cui": ["C0040405", "C0000726"]}
    for i in range(40)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_directory_of_jsonl_with_all_splits(tmp_path):
    for name, part in (("train", ROWS[:30]), ("validation", ROWS[30:35]), ("test", ROWS[35:])):
        write_jsonl(tmp_path / f"{name}.jsonl", part)
    splits = load_splits(DataConfig(source=str(tmp_path)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 5, "test": 5}
    assert splits["train"].labels[0] == ["C0040405", "C0000726"]


def test_missing_validation_is_cut_like_the_seed(tmp_path):
    """validation = 15% of (train + test) from the train split shuffled with seed 42, exactly as
    the series' `train_test_split(test_size=n, seed=42)` does it."""
    import datasets

    train = [dict(r, caption=f"caption {i}") for i, r in enumerate(ROWS * 5)]  # 200 rows
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:20])
    splits = load_splits(DataConfig(source=str(tmp_path)))
    n_val = round(0.15 * (200 + 20))
    reference = datasets.Dataset.from_dict({"caption": [r["caption"] for r in train]}).train_test_split(
        test_size=n_val, seed=42
    )
    assert splits["validation"].texts == reference["test"]["caption"]
    assert splits["train"].texts == reference["train"]["caption"]
    assert len(splits["test"]) == 20


def test_single_csv_with_delimited_labels(tmp_path):
    path = tmp_path / "all.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "codes"])
        for i in range(100):
            writer.writerow([f"Chest radiograph {i}", "C1306645;C0817096"])
    cfg = DataConfig(source=str(path), text_column="text", label_column="codes")
    splits = load_splits(cfg)
    assert len(splits["test"]) == 10  # data.test_fraction = 0.1
    assert len(splits["validation"]) == round(0.15 * 100)
    assert sum(len(s) for s in splits.values()) == 100
    assert splits["train"].labels[0] == ["C1306645", "C0817096"]


def test_parquet_image_column_is_never_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Garbage where the image bytes would be: decoding them, or even reading the column into
    # the records, would show up below.
    images = [{"bytes": b"\x00not-a-png" * 1000, "path": f"img{i}.png"} for i in range(40)]
    table = pa.table({
        "image": images,
        "caption": [r["caption"] for r in ROWS],
        "cui": [r["cui"] for r in ROWS],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table.slice(0, 8), tmp_path / "test.parquet")
    read_columns = []
    original = pq.read_table

    def spy(path, columns=None, **kwargs):
        read_columns.append(columns)
        return original(path, columns=columns, **kwargs)

    pq.read_table = spy
    try:
        splits = load_splits(DataConfig(source=str(tmp_path)))
    finally:
        pq.read_table = original
    assert read_columns and all(cols is not None and "image" not in cols for cols in read_columns)
    assert len(splits["train"]) + len(splits["validation"]) == 40
    assert splits["test"].labels[0] == ["C0040405", "C0000726"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["C1", " C2 "], ["C1", "C2"]),
        ("C1;C2", ["C1", "C2"]),
        ("C1, C2", ["C1", "C2"]),
        ("C1 C2|C3", ["C1", "C2", "C3"]),
        ("['C1', 'C2']", ["C1", "C2"]),
        ("", []),
        (None, []),
    ],
)
def test_label_formats(value, expected):
    assert parse_labels(value, "auto", "here") == expected


def test_labels_of_a_wrong_type_name_the_row(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:5] + [{"caption": "x", "cui": 7}])
    with pytest.raises(DataError, match=r"train.jsonl:6: labels must be a list"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_empty_and_non_string_captions_are_dropped_and_counted(tmp_path, caplog):
    bad = [{"caption": "", "cui": ["C1"]}, {"caption": None, "cui": ["C1"]}, {"caption": 5, "cui": ["C1"]}]
    write_jsonl(tmp_path / "train.jsonl", ROWS[:30] + bad)
    write_jsonl(tmp_path / "validation.jsonl", ROWS[30:35])
    splits = load_splits(DataConfig(source=str(tmp_path)))
    assert len(splits["train"]) == 30
    assert splits["train"].dropped_empty == 3
    assert "dropped 3 empty or non-string captions" in caplog.text
    assert "train.jsonl:31" in caplog.text


def test_missing_column_names_the_columns_that_exist(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "labels": ["C1"]}] * 10)
    with pytest.raises(DataError, match=r"column\(s\) \['caption', 'cui'\] not found; columns present: \['text', 'labels'\]"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_label_space_is_fitted_on_train_only_with_a_frequency_cut(caplog):
    train = [["C1", "C2"], ["C1"], ["C1", "C3"], ["C2"]]
    space = LabelSpace.fit(train, min_count=2, names={"C1": "one"})
    assert space.cuis == ["C1", "C2"]  # by frequency, C3 cut
    assert space.counts == [3, 2]
    matrix = space.encode([["C2", "C9"], ["C3"]], split_name="test")
    np.testing.assert_array_equal(matrix, [[0, 1], [0, 0]])
    assert "2 label occurrences are CUIs outside the training label space" in caplog.text
    with pytest.raises(DataError, match="no labels left after data.min_label_count=5"):
        LabelSpace.fit(train, min_count=5)


def test_sparse_targets_are_the_dense_multi_hot_rows_and_keep_the_checkpoint_data_digest():
    # Real captions' CUIs (repeats inside a caption, CUIs outside the space): each batch's targets
    # are the rows of the dense matrix, and the digest is the one radtrain recorded in checkpoints
    # when it kept that matrix (a checkpoint written before must still resume).
    import hashlib

    from radtrain.data.tokens import TokenizedSplit
    from tests.conftest import ROCO

    splits = load_splits(DataConfig(source=str(ROCO)))
    space = LabelSpace.fit(splits["train"].labels, min_count=3)
    labels = [cuis + cuis[:1] for cuis in splits["validation"].labels]  # a CUI given twice
    dense = space.encode(labels)
    n = len(labels)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = TokenizedSplit(ids=rng.integers(5, 900, size=int(offsets[-1])).astype(np.int32), offsets=offsets)
    split.set_labels(*space.encode_sparse(labels), num_labels=len(space))
    np.testing.assert_array_equal(split.targets(), dense)
    rows = np.array([5, 0, 5, n - 1])
    np.testing.assert_array_equal(split.targets(rows), dense[rows])
    assert split.targets(np.array([], dtype=np.int64)).shape == (0, len(space))
    with pytest.raises(IndexError, match="caption indices must lie in"):
        split.targets(np.array([0, -1]))
    legacy = hashlib.sha256()
    for array in (split.ids, split.offsets, dense):
        legacy.update(str((array.dtype.str, array.shape)).encode())
        legacy.update(array.tobytes())
    assert split.digest() == legacy.hexdigest()[:16]
    numpy_count = TokenizedSplit(ids=split.ids, offsets=split.offsets)
    numpy_count.set_labels(split.label_offsets, split.label_columns, np.int64(len(space)))
    assert numpy_count.digest() == split.digest()
    with pytest.raises(ValueError, match="label indices outside"):
        numpy_count.set_labels(split.label_offsets, split.label_columns, 3)
    with pytest.raises(ValueError, match="labels for 2 captions, but the split has"):
        split.set_labels(np.array([0, 1, 2]), np.array([0, 1], dtype=np.int32), len(space))


def test_label_space_round_trip(tmp_path):
    space = LabelSpace.fit([["C1", "C2"], ["C1"]], names={"C1": "one"})
    space.save(tmp_path / "labels.json")
    again = LabelSpace.load(tmp_path / "labels.json")
    assert (again.cuis, again.counts, again.names) == (space.cuis, space.counts, space.names)


def test_max_length_above_the_model_limit_is_refused(tmp_path):
    from radtrain import models

    cfg = load_config(None, ["model.name=scratch:tiny", "data.max_length=5000"])
    with pytest.raises(ConfigError, match="above the model's limit of 1024"):
        models.check_max_length(cfg.data.max_length, models.source_config(cfg.model))
