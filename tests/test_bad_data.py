"""Bad input is reported with the file, the line or row, and the fix (issue 8, promise 6).

In-process and fast: these exercise data loading and config checks only, on real ROCO captions
where a real file is needed. tests/test_data.py holds the basic cases (labels of a wrong type,
empty/non-string captions, missing columns, CUIs outside the label space); these are the rest.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from radtrain.cli import main
from radtrain.config import ConfigError, DataConfig, load_config
from radtrain.data.labels import LabelSpace
from radtrain.data.sources import DataError, load_splits
from tests.conftest import ROCO


def real_rows(n: int, start: int = 0) -> list[dict]:
    with ROCO.open(encoding="utf-8") as handle:
        return [json.loads(line) for i, line in enumerate(handle) if start <= i < start + n]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def split_dir(tmp_path: Path, train: list, validation: list | None = None, test: list | None = None) -> Path:
    write_jsonl(tmp_path / "train.jsonl", train)
    for name, rows in (("validation", validation), ("test", test)):
        if rows is not None:
            write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return tmp_path


def test_malformed_json_line_names_file_line_and_fix(tmp_path, roco_path):
    rows = real_rows(20)
    broken = json.dumps(rows[3])[:-10]  # a truncated line, as a killed writer leaves it
    split_dir(tmp_path, rows[:3] + [broken] + rows[4:])
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(source=str(tmp_path)))
    message = str(info.value)
    assert f"{tmp_path / 'train.jsonl'}:4: malformed JSON" in message
    assert "fix or delete that line" in message


def test_malformed_json_array_names_the_line(tmp_path, roco_path):
    rows = real_rows(5)
    text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + ",\n{\"caption\": \"x\" \"cui\": []}\n]\n"
    (tmp_path / "train.json").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json: malformed JSON at line 7"):
        load_splits(DataConfig(source=str(tmp_path)))


@pytest.mark.parametrize(
    "cui, message",
    [
        (["C0040405", 17], r"train.jsonl:6: label 17 is not a string"),
        ({"C0040405": 1}, r"train.jsonl:6: labels must be a list of strings or a delimited string, got dict"),
        ("['C0040405', ", r"train.jsonl:6: label string .* looks like a list but does not parse"),
    ],
)
def test_labels_that_are_not_a_list_of_strings_name_the_row(tmp_path, roco_path, cui, message):
    rows = real_rows(10)
    rows[5]["cui"] = cui
    split_dir(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(source=str(tmp_path)))


def test_non_string_captions_are_dropped_counted_and_located(tmp_path, roco_path, caplog):
    rows = real_rows(40)
    rows[2]["caption"] = 1234
    rows[7]["caption"] = ["a list"]
    split_dir(tmp_path, rows[:30], rows[30:])
    with caplog.at_level(logging.WARNING):
        splits = load_splits(DataConfig(source=str(tmp_path)))
    assert len(splits["train"]) == 28 and splits["train"].dropped_empty == 2
    assert f"{tmp_path / 'train.jsonl'}:3, {tmp_path / 'train.jsonl'}:8" in caplog.text
    assert "data.text_column" in caplog.text  # the fix when the captions live in another field


@pytest.mark.parametrize("content", ["", "blank captions"])
def test_an_empty_split_is_an_error_naming_the_file(tmp_path, roco_path, content):
    rows = real_rows(30)
    validation = [] if content == "" else [{**r, "caption": "  "} for r in real_rows(5, 30)]
    split_dir(tmp_path, rows, validation)
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(source=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / "validation.jsonl") in message
    assert "validation split has no usable captions" in message
    assert "one is cut from train" in message  # the way out: delete the file


def test_duplicate_ids_are_reported_with_both_rows_and_kept(tmp_path, roco_path, caplog):
    rows = real_rows(60)
    train = rows[:40] + [rows[5]]  # line 41 repeats line 6
    test = rows[40:55] + [rows[10], rows[11]]  # two training records leaked into test
    split_dir(tmp_path, train, rows[55:], test)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(DataConfig(source=str(tmp_path)))
    assert len(splits["train"]) == 41  # decided: reported, never silently dropped
    train_file = tmp_path / "train.jsonl"
    assert f"1 duplicate ids (image_id={rows[5]['image_id']!r} at {train_file}:6 and {train_file}:41)" in caplog.text
    assert "2 ids are in both the train split" in caplog.text
    assert rows[10]["image_id"] in caplog.text and "test scores are optimistic" in caplog.text


def test_real_roco_ids_are_unique_so_no_false_alarm(tmp_path, roco_path, caplog):
    (tmp_path / "roco.jsonl").write_text("".join(ROCO.read_text(encoding="utf-8").splitlines(True)[:500]))
    with caplog.at_level(logging.WARNING):
        load_splits(DataConfig(source=str(tmp_path / "roco.jsonl")))
    assert "duplicate ids" not in caplog.text and "ids are in both" not in caplog.text


def test_test_cuis_unseen_in_training_are_counted(tmp_path, roco_path, caplog):
    rows = real_rows(400)
    split_dir(tmp_path, rows[:300], rows[300:350], rows[350:])
    splits = load_splits(DataConfig(source=str(tmp_path)))
    space = LabelSpace.fit(splits["train"].labels, min_count=1)
    train_cuis = set(space.cuis)
    expected = sum(1 for labels in splits["test"].labels for c in labels if c not in train_cuis)
    assert expected > 0  # real data: the test captions do carry concepts the training ones never had
    with caplog.at_level(logging.WARNING):
        space.encode(splits["test"].labels, split_name="test")
    assert f"test: {expected} label occurrences are CUIs outside the training label space" in caplog.text


def test_long_and_non_ascii_captions_are_handled(tmp_path, roco_path):
    """Truncated to data.max_length, never an error; unicode survives the byte-level tokenizer."""
    from radtrain import models
    from radtrain.data.tokens import tokenize_texts

    rows = real_rows(300)
    non_ascii = [r["caption"] for r in rows if any(ord(ch) > 127 for ch in r["caption"])]
    assert non_ascii, "the real captions hold non-ASCII text (degree signs, accents, dashes)"
    exotic = "Ödem im Lungenunterlappen, 肺部CT显示磨玻璃影 — 5 mm ± 1 µm, α/β ✓ 🫁"
    huge = " ".join([rows[0]["caption"]] * 2000)  # ~250k characters
    rows.append({"image_id": "X1", "caption": exotic, "cui": ["C0040405"]})
    rows.append({"image_id": "X2", "caption": huge, "cui": ["C0040405"]})
    split_dir(tmp_path, rows[:250] + rows[-2:], rows[250:300])
    splits = load_splits(DataConfig(source=str(tmp_path), max_length=128))
    texts = splits["train"].texts
    assert exotic in texts and huge in texts
    tokenizer = models.train_scratch_tokenizer(texts, "tiny", 128)
    tokenized = tokenize_texts(tokenizer, texts, 128, tmp_path / "cache")
    assert int(tokenized.lengths.max()) == 128  # the huge caption, cut
    assert len(tokenizer(exotic)["input_ids"]) < 128  # (byte-level: ~3 tokens per CJK character)
    assert tokenizer.decode(tokenized.row(texts.index(exotic)), skip_special_tokens=True) == exotic
    for text in non_ascii[:20]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_config_file_typo_lists_the_valid_keys(tmp_path):
    (tmp_path / "run.yaml").write_text("trian:\n  lr: 3.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "run.yaml")
    assert "unknown config key 'trian.lr'" in str(info.value) or "unknown config key 'trian'" in str(info.value)
    assert "train.lr" in str(info.value)


def test_value_of_the_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_malformed_hub_repo_id_is_refused():
    with pytest.raises(ConfigError, match="hub.repo_id must look like 'org/name'"):
        load_config(None, ["hub.repo_id=just-a-name"])


def test_init_from_a_run_directory_points_at_its_best_export(tmp_path):
    from radtrain.phase import check_init_from

    run = tmp_path / "mlm"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"directory without config.json\. Did you mean .*mlm/best"):
        check_init_from(str(run))
    with pytest.raises(ConfigError, match="no such directory"):
        check_init_from(str(tmp_path / "nowhere"))
    check_init_from(str(run / "best"))  # the right one passes
    check_init_from("answerdotai/ModernBERT-base")  # a Hub id is not checked locally


def test_metric_for_best_typo_fails_before_anything_is_written(tmp_path, capsys, roco_path):
    out = tmp_path / "run"
    code = main(["classify", "--output-dir", str(out), f"data.source={ROCO}", "train.metric_for_best=f1_mikro"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.metric_for_best='f1_mikro' is not a classifier metric" in err and "f1_macro" in err
    assert not out.exists()


def test_duplicate_captions_in_real_data_are_legitimate(roco_path):
    """Why duplicates are keyed on ids, not caption text: different images share short captions."""
    captions = Counter(r["caption"] for r in real_rows(8180))
    assert captions["Chest X-ray."] > 1
