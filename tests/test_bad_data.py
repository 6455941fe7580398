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
    from radtrain.phase import check_model_source

    run = tmp_path / "mlm"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"directory without config.json\. Did you mean .*mlm/best"):
        check_model_source(str(run))
    with pytest.raises(ConfigError, match="no such directory"):
        check_model_source(str(tmp_path / "nowhere"))
    check_model_source(str(run / "best"))  # the right one passes
    check_model_source("answerdotai/ModernBERT-base")  # a Hub id is not checked locally


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


# -- found by a review of what users type and feed in (session 6) ---------------------------------


def test_damaged_or_foreign_files_are_data_errors_naming_the_file(tmp_path):
    """Each used to end in a traceback (exit 1) from the reader: a byte that is not UTF-8, an
    unreadable parquet file, column-oriented JSON with uneven columns, a CSV row with more fields
    than its header (a caption with an unquoted comma, silently cut), a malformed names file."""
    rows = real_rows(30)
    cases = {
        "latin1.jsonl": json.dumps(rows[0]).encode()[:-2] + b'\xe9"}\n',
        "broken.parquet": b"PAR1 this is not a parquet file PAR1",
        "uneven.json": json.dumps({"caption": ["a", "b"], "cui": [["C1"]]}).encode(),
        "extra.csv": b'caption,cui\nCT of the chest, with contrast,C0040405\n',
    }
    expected = {"latin1.jsonl": "not UTF-8", "broken.parquet": "not a readable parquet",
                "uneven.json": "different lengths", "extra.csv": "more fields than the header"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=expected[name]) as caught:
            load_splits(DataConfig(source=str(path)))
        assert str(path) in str(caught.value)
    names = tmp_path / "names.json"
    names.write_text('{"C0040405": "X-ray CT",', encoding="utf-8")
    from radtrain.data.labels import load_name_mapping

    with pytest.raises(DataError, match="not a JSON file"):
        load_name_mapping(names)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: it became part of the first column's name."""
    rows = real_rows(40)
    plain = tmp_path / "plain.csv"
    plain.write_text("caption,cui\n" + "".join(f'"{r["caption"]}",{";".join(r["cui"])}\n' for r in rows),
                     encoding="utf-8")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "p.jsonl", rows).read_bytes())
    want = load_splits(DataConfig(source=str(plain)))
    for path in (bom, bom_jsonl):
        got = load_splits(DataConfig(source=str(path)))
        assert {k: v.texts for k, v in got.items()} == {k: v.texts for k, v in want.items()}


def test_a_tsv_caption_opening_a_quote_cannot_swallow_the_rows_after_it(tmp_path):
    """ROCO-style unquoted TSV: a caption starting with a lone double quote made the reader join
    every row up to the next quote into one 'caption', silently (31 captions read of 400)."""
    rows = real_rows(60)
    lines = [f'{r["caption"]}\t{";".join(r["cui"])}' for r in rows]
    lines[30] = '"Ground glass opacity in the right lung.\tC0000001'
    path = tmp_path / "plain.tsv"
    path.write_text("caption\tcui\n" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="starts with a double quote"):
        load_splits(DataConfig(source=str(path)))


def test_text_overrides_keep_what_was_typed():
    """Overrides were read as YAML whatever the key: output_dir=0755 wrote to ./493,
    hub.revision=1.10 became 1.1, a date was refused, label_delimiter=| became empty (a crash)."""
    cfg = load_config(None, [
        "output_dir=0755", "hub.revision=1.10", "hub.commit_message=Fix: lower lr", "data.label_delimiter=|",
        "tracking.run_name=lr3e-5 #2", "model.init_from=null", "train.lr=3e-5", "data.packing=off",
    ])
    assert cfg.output_dir == "0755" and cfg.hub.revision == "1.10" and cfg.hub.commit_message == "Fix: lower lr"
    assert cfg.data.label_delimiter == "|" and cfg.tracking.run_name == "lr3e-5 #2"
    assert cfg.model.init_from is None and cfg.train.lr == 3e-5 and cfg.data.packing == "off"
    assert load_config(None, ["output_dir=2024-06-01"]).output_dir == "2024-06-01"
    assert load_config(None, ['data.label_delimiter="|"']).data.label_delimiter == "|"  # quotes still work
    with pytest.raises(ConfigError, match="label_delimiter is empty"):
        load_config(None, ["data.label_delimiter="])


@pytest.mark.parametrize("override, message", [
    ("model.classifier_dropout=5", "classifier_dropout must be in"),
    ("train.adam_beta1=2", "adam_beta1 must be in"),
    ("train.adam_eps=-1", "adam_eps must be > 0"),
    ("train.epochs=.inf", "epochs must be a finite number"),
    ("train.lr=.nan", "lr must be a finite number"),
])
def test_out_of_range_settings_fail_at_start_naming_the_key(override, message):
    """Each used to pass the config and crash inside torch or transformers (exit 1), after the run
    directory had been written."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_unknown_attention_fails_at_start_and_every_registered_one_passes(tmp_path, capsys):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from radtrain.models import check_attn_implementation

    for name in [*ALL_ATTENTION_FUNCTIONS.keys(), "eager", "radtrain_varlen", "kernels-community/flash-attn"]:
        check_attn_implementation(name)  # flash_attention_4, paged|eager: valid in transformers 5
    assert main(["classify", "--output-dir", str(tmp_path / "out"), "data.source=/nowhere.jsonl",
                 "model.name=scratch:tiny", "model.attn_implementation=bogus"]) == 2
    assert "attn_implementation='bogus' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quoted_tsv_fields_and_trailing_delimiters_still_load(tmp_path):
    """What the checks above must not refuse: a properly quoted TSV field holding a line break,
    and a trailing delimiter (an empty extra field, as spreadsheets export)."""
    rows = real_rows(40)
    tsv = tmp_path / "quoted.tsv"
    lines = [f'{r["caption"]}\t{";".join(r["cui"])}' for r in rows]
    lines[5] = f'"{rows[5]["caption"]}\nsecond line"\t{";".join(rows[5]["cui"])}'
    tsv.write_text("caption\tcui\n" + "\n".join(lines) + "\n", encoding="utf-8")
    texts = [t for split in load_splits(DataConfig(source=str(tsv))).values() for t in split.texts]
    assert len(texts) == 40 and any("\nsecond line" in t for t in texts)
    csv_path = tmp_path / "trailing.csv"
    csv_path.write_text("caption,cui\n" + "".join(f'"{r["caption"]}",{r["cui"][0]},\n' for r in rows), encoding="utf-8")
    assert sum(len(split) for split in load_splits(DataConfig(source=str(csv_path))).values()) == 40


def test_text_override_null_is_none_everywhere():
    """Job files keep the hub section as a plain dict: hub.repo_id=null must not become a repo
    named 'null'. Text values are stripped; quotes keep spaces."""
    from radtrain.config import parse_override

    assert parse_override("hub.repo_id=null") == ("hub.repo_id", None)
    assert parse_override("hub.revision=~") == ("hub.revision", None)
    assert parse_override("data.source= /x/y.jsonl") == ("data.source", "/x/y.jsonl")
    assert parse_override("data.label_delimiter=' '") == ("data.label_delimiter", " ")
    from radtrain.cluster.jobfile import load_job

    assert load_job("jobs/demo.yaml", ["hub.repo_id=null"]).hub.get("repo_id") is None


def test_another_tasks_results_are_not_overwritten(tmp_path):
    """A baseline's (or an MLM run's) results in the output_dir of a classify run: refused, even
    without a config.yaml to compare (the baseline writes none)."""
    from radtrain.phase import check_run_dir

    (tmp_path / "summary.json").write_text(json.dumps({"task": "baseline"}))
    cfg = load_config(None, [f"output_dir={tmp_path}", "model.name=scratch:tiny"])
    with pytest.raises(ConfigError, match="holds a baseline run's results"):
        check_run_dir(cfg, "classify", 1)


def test_a_run_directory_as_model_name_points_at_its_export(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    assert main(["classify", "--output-dir", str(tmp_path / "out"), "data.source=/nowhere.jsonl",
                 f"model.name={run}"]) == 2
    assert f"Did you mean {run / 'best'}" in capsys.readouterr().err
    assert main(["baseline", "--data", "/nowhere.jsonl", "--model", str(run)]) == 2
    assert f"Did you mean {run / 'best'}" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, capsys):
    """`classify data.source=X --output-dir D model.name=...` was refused as 'unrecognized
    arguments'; the trailing override is now read (here: its bad value is what is reported)."""
    code = main(["classify", "data.source=/nowhere.jsonl", "--output-dir", str(tmp_path), "model.name=scratch:huge"])
    assert code == 2 and "scratch size must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["classify", "data.source=/nowhere.jsonl", "--output-dir", str(tmp_path), "--no-such-option"])


@pytest.mark.parametrize("argv", [
    ["predict", "--model", "m", "--batch-size", "0", "text"],
    ["predict", "--model", "m", "--threshold", "nan", "text"],
    ["predict", "--model", "m", "--threshold", "1.5", "text"],
    ["evaluate", "--model", "m", "--threshold", "-1"],
    ["baseline", "--data", "d", "--max-iter", "0"],
])
def test_command_line_numbers_are_checked(argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_demo_refuses_an_output_dir_override(tmp_path, capsys):
    assert main(["demo", f"output_dir={tmp_path}"]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_demo_checks_its_settings_before_writing_any_data(tmp_path, capsys):
    """A bad override used to fail only after the demo had written its synthetic captions over
    OUTPUT_DIR/data (a user's own train.jsonl included)."""
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    mine = '{"caption": "my own caption", "cui": ["C0000001"]}\n'
    (data / "train.jsonl").write_text(mine)
    assert main(["demo", "--output-dir", str(tmp_path / "proj"), "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]
    # Valid settings: the folder still holds data the demo did not write, so it is refused.
    assert main(["demo", "--output-dir", str(tmp_path / "proj"), "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "train.jsonl" in err
    assert (data / "train.jsonl").read_text() == mine


def test_demo_keeps_a_users_cui_names_file(tmp_path, capsys):
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    (data / "cui_names.json").write_text('{"C0000005": "my own name"}')
    assert main(["demo", "--output-dir", str(tmp_path / "proj"), "train.epochs=1"]) == 2
    assert "cui_names.json" in capsys.readouterr().err
    assert (data / "cui_names.json").read_text() == '{"C0000005": "my own name"}'


def test_demo_names_an_unwritable_output_dir(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--output-dir", str(tmp_path / "afile" / "demo")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_a_stale_scratch_tokenizer_is_retrained(tmp_path):
    """An attempt that died before its first checkpoint left its scratch tokenizer in the run
    directory; the next run there, on other captions, silently reused it."""
    from accelerate import Accelerator

    from radtrain.models import train_scratch_tokenizer
    from radtrain.phase import prepare_tokenizer

    accelerator = Accelerator(cpu=True)
    first = [r["caption"] for r in real_rows(300)]
    other = [r["caption"] for r in real_rows(300, start=4000)]
    cfg = load_config(None, ["model.name=scratch:tiny", f"output_dir={tmp_path}"])
    prepare_tokenizer(cfg, accelerator, tmp_path, first)
    got = prepare_tokenizer(cfg, accelerator, tmp_path, other)
    assert got.get_vocab() == train_scratch_tokenizer(other, "tiny", cfg.data.max_length).get_vocab()
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)  # a checkpoint needs its own tokenizer
    kept = prepare_tokenizer(cfg, accelerator, tmp_path, first)
    assert kept.get_vocab() == got.get_vocab()


def test_captions_without_any_label_point_at_the_label_column(tmp_path):
    """Every caption without CUIs was reported as 'no labels left after data.min_label_count=1
    ... Lower data.min_label_count', which cannot help; the column is what to check."""
    rows = [{**r, "cui": []} for r in real_rows(40)]
    with pytest.raises(DataError, match="none of the .* training captions has a label: check that data.label_column"):
        LabelSpace.fit([r["cui"] for r in rows], 1)


# -- baseline (review of session 7) --------------------------------------------------------------


def test_baseline_never_overwrites_a_training_run_or_another_baseline(tmp_path, capsys):
    """`radtrain baseline --output-dir RUN` replaced a classifier run's summary.json and labels.json
    (exit 0); a second baseline on other data replaced the first's results."""
    data = write_jsonl(tmp_path / "roco.jsonl", real_rows(400))
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "classify", "best_step": 7}))
    (run / "metrics.jsonl").write_text("{}\n")
    base = ["baseline", "--data", str(data), "--features", "tfidf", "--C", "1"]
    assert main([*base, "--output-dir", str(run)]) == 2
    assert "classify run's or a model export's files" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text()) == {"task": "classify", "best_step": 7}
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "summary.json"]

    out = tmp_path / "tfidf"
    assert main([*base, "--output-dir", str(out), "data.min_label_count=3"]) == 0
    first = (out / "summary.json").read_text()
    assert main([*base, "--output-dir", str(out), "data.min_label_count=5"]) == 2
    assert "data.min_label_count: 3 -> 5" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == first
    # Session 13: sample caps and columns made no other baseline (it was overwritten, exit 0).
    assert main([*base, "--output-dir", str(out), "data.min_label_count=3", "data.max_train_samples=50"]) == 2
    assert "data.max_train_samples: None -> 50" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == first
    assert main([*base, "--output-dir", str(out), "data.min_label_count=3"]) == 0  # the same baseline again
    # A record written before those keys were recorded is compared on the keys it has.
    summary = json.loads((out / "summary.json").read_text())
    summary["data"] = {k: summary["data"][k] for k in ("source", "min_label_count")}
    (out / "summary.json").write_text(json.dumps(summary))
    assert main([*base, "--output-dir", str(out), "data.min_label_count=3"]) == 0


def test_baseline_c_values_and_overrides(tmp_path, capsys):
    data = write_jsonl(tmp_path / "roco.jsonl", real_rows(400))
    base = ["baseline", "--data", str(data), "--features", "tfidf"]
    for bad in ("nan", "inf", "0", "-1", "ten"):
        assert main([*base, "--output-dir", str(tmp_path / bad), "--C", bad]) == 2, bad
        assert "--C" in capsys.readouterr().err
        assert not (tmp_path / bad).exists()
    # Overrides after --C are overrides (argparse's nargs took them as C values), and commas separate.
    out = tmp_path / "ok"
    assert main([*base, "--output-dir", str(out), "--C", "1,10", "data.min_label_count=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["min_label_count"] == 3
    assert set(summary["classifier"]["C_validation_f1_tuned"]) == {"1", "10"}
    # Settings a baseline does not use are refused, not silently ignored.
    assert main([*base, "--output-dir", str(tmp_path / "x"), "train.lr=1e-3"]) == 2
    assert "train.lr=1e-3" in capsys.readouterr().err


def test_baseline_output_dir_is_its_own_not_the_training_configs(tmp_path, monkeypatch, capsys):
    """The same --config serves training and the baseline: its output_dir is the training run's, so
    the baseline goes to --output-dir, an output_dir= override, or runs/baseline-<features>. And a
    model export (best/, selected/, a Hub snapshot) is never a baseline's output directory."""
    data = write_jsonl(tmp_path / "roco.jsonl", real_rows(300))
    (tmp_path / "cfg.yaml").write_text(f"output_dir: {tmp_path / 'training_run'}\n")
    monkeypatch.chdir(tmp_path)
    base = ["baseline", "--data", str(data), "--features", "tfidf", "--C", "1", "--config", str(tmp_path / "cfg.yaml"),
            "data.min_label_count=3"]
    assert main(base) == 0
    assert (tmp_path / "runs" / "baseline-tfidf" / "summary.json").is_file()
    assert not (tmp_path / "training_run").exists()
    assert main([*base, f"output_dir={tmp_path / 'mine'}"]) == 0
    assert (tmp_path / "mine" / "summary.json").is_file()
    export = tmp_path / "best"
    export.mkdir()
    for name, text in (("config.json", "{}"), ("labels.json", '{"labels": []}'), ("thresholds.json", "{}")):
        (export / name).write_text(text)
    assert main([*base, "--output-dir", str(export)]) == 2
    assert "model export" in capsys.readouterr().err
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "labels.json", "thresholds.json"]


def test_tfidf_baseline_without_a_shared_word_is_a_data_error(tmp_path, capsys):
    rows = [{"caption": f"w{i}", "cui": ["C0000001"]} for i in range(60)]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    assert main(["baseline", "--data", str(data), "--features", "tfidf", "--output-dir", str(tmp_path / "o"),
                 "data.min_label_count=1"]) == 2
    assert "--features model" in capsys.readouterr().err


def test_labels_of_a_csv_written_by_pandas_or_datasets_keep_their_cuis(tmp_path):
    """Session 9 hunt: `Dataset.to_csv` / pandas write a list column as numpy's repr,
    "['C1' 'C2' ...]" wrapped over lines; literal_eval joined it into ONE label 'C1C2...', and the
    run trained on a label space of such strings, exit 0."""
    import datasets

    rows = real_rows(40)
    table = datasets.Dataset.from_list([{"caption": r["caption"], "cui": r["cui"]} for r in rows])
    table.to_csv(str(tmp_path / "train.csv"), index=False)
    assert "' '" in (tmp_path / "train.csv").read_text()  # the repr this test is about
    split = load_splits(DataConfig(source=str(tmp_path), validation_fraction=0.1))
    expected = {r["caption"]: r["cui"] for r in rows}
    for text, labels in zip(split["train"].texts, split["train"].labels, strict=True):
        assert labels == list(dict.fromkeys(expected[text]))


def test_a_split_reads_its_own_files_only(tmp_path, caplog):
    """Session 9 hunt: any name starting 'train_'/'train.'/'test_' was read into that split
    (an old copy train_v1.jsonl doubled the training data; test_metrics.json broke the run)."""
    rows = real_rows(120)
    split_dir(tmp_path, rows[:80], rows[80:100], rows[100:])
    write_jsonl(tmp_path / "train_v1.jsonl", rows[:50])
    (tmp_path / "test_metrics.json").write_text('{"f1": 0.5}')
    with caplog.at_level(logging.WARNING, logger="radtrain.data.sources"):
        splits = load_splits(DataConfig(source=str(tmp_path)))
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [80, 20, 20]
    assert "train_v1.jsonl" in caplog.text and "test_metrics.json" in caplog.text
    write_jsonl(tmp_path / "train.csv", [])  # two files of one split: which one is meant?
    with pytest.raises(DataError, match="2 files for the train split"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_hub_shard_names_are_split_files(tmp_path):
    rows = real_rows(60)
    write_jsonl(tmp_path / "train-00000-of-00002.jsonl", rows[:20])
    write_jsonl(tmp_path / "train-00001-of-00002-0123abcd.jsonl", rows[20:40])
    write_jsonl(tmp_path / "test-00000-of-00001.jsonl", rows[40:])
    splits = load_splits(DataConfig(source=str(tmp_path)))
    assert len(splits["train"]) + len(splits["validation"]) == 40 and len(splits["test"]) == 20


def test_a_csv_row_without_its_label_field_is_an_error_not_an_unlabelled_caption(tmp_path):
    (tmp_path / "train.csv").write_text("caption,cui\nChest x-ray,C0043299\nMRI brain without contrast\n")
    with pytest.raises(DataError, match=r"train.csv:3: no 'cui' field"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_a_hub_column_that_does_not_exist_is_a_data_error_naming_the_columns(tmp_path, monkeypatch, capsys):
    """A Hub source read by column with a wrong data.text_column failed inside datasets' parquet
    builder: a raw ArrowInvalid/DatasetGenerationError traceback, exit 1. The Hub is unreachable
    here: the dataset id is pointed at a local repository of the Hub's layout and schema."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    rows = real_rows(30)
    for name, part in (("train", rows[:20]), ("test", rows[20:])):
        table = pa.table({
            "image": [{"bytes": b"png", "path": None} for _ in part],
            "image_id": [r["image_id"] for r in part],
            "caption": [r["caption"] for r in part],
            "cui": [r["cui"] for r in part],
        })
        pq.write_table(table, repo / f"{name}-00000-of-00001.parquet")
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: real(str(repo.parent), *a, **k))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    splits = load_splits(DataConfig(source="someorg/radiology-like"))  # the defaults read the Hub's schema
    assert len(splits["test"]) == 10 and len(splits["train"]) + len(splits["validation"]) == 20
    assert main(["classify", "--output-dir", str(tmp_path / "run"), "data.source=someorg/radiology-like",
                 "data.text_column=Caption", "model.name=scratch:tiny"]) == 2
    err = capsys.readouterr().err
    assert "reading the columns ['Caption', 'cui'] failed" in err and "caption" in err and "data.text_column" in err


# -- session 10: what session 9's data hunt left open ---------------------------------------------


def test_a_lower_case_cui_is_the_same_label_and_label_words_are_reported(tmp_path, caplog):
    """'c0040405' and 'C0040405' were two labels; 'C0040405: X-Ray CT' strings split on spaces
    trained every word as a label, silently."""
    rows = real_rows(60)
    rows[0]["cui"] = [rows[0]["cui"][0].lower()]
    split_dir(tmp_path, rows[:40], rows[40:50], rows[50:])
    splits = load_splits(DataConfig(source=str(tmp_path)))
    assert splits["train"].labels[0] == [rows[0]["cui"][0].upper()]
    assert splits["train"].labels[0][0] in LabelSpace.fit(splits["train"].labels).cuis
    assert not any(c.islower() for labels in splits["train"].labels for cui in labels for c in cui)

    for row in rows:
        row["cui"] = "; ".join(f"{cui}: X-Ray Computed Tomography" for cui in row["cui"])
    split_dir(tmp_path, rows[:40], rows[40:50], rows[50:])
    with caplog.at_level(logging.WARNING, logger="radtrain.data.labels"):
        LabelSpace.fit(load_splits(DataConfig(source=str(tmp_path)))["train"].labels)
    assert "distinct training labels are not CUIs (C and 7 digits) although others are" in caplog.text and "'X-Ray'" in caplog.text
    assert "data.label_delimiter" in caplog.text


def test_held_out_captions_seen_word_for_word_in_training_are_counted(roco_path, caplog):
    """Ids differ, so no id warning; 7 validation and 5 test captions of the shared real data are
    (case and spacing aside) training captions, e.g. 'Preoperative radiograph'."""
    with caplog.at_level(logging.WARNING, logger="radtrain.data.sources"):
        splits = load_splits(DataConfig(source=str(roco_path)))
    train = {" ".join(t.casefold().split()) for t in splits["train"].texts}
    for name in ("validation", "test"):
        repeated = sum(" ".join(t.casefold().split()) in train for t in splits[name].texts)
        assert repeated > 0
        assert f"{repeated} of the {len(splits[name])} {name} captions" in caplog.text
    assert "ids are in both" not in caplog.text


def test_a_one_record_json_file_is_that_record(tmp_path):
    """Its one list value (the CUIs) was taken for the list of records: 'expected an object, got str'."""
    row = real_rows(1)[0]
    path = tmp_path / "one.json"
    path.write_text(json.dumps(row))
    from radtrain.data.sources import load_file

    split = load_file(DataConfig(source=str(path)))
    assert split.texts == [row["caption"].strip()] and split.labels == [list(dict.fromkeys(row["cui"]))]


def test_a_parquet_file_without_the_label_column_lists_all_its_columns(tmp_path):
    """It listed only the requested columns present, hiding the one the user meant ('cuis')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = real_rows(20)
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows], "caption": [r["caption"] for r in rows],
                             "cuis": [r["cui"] for r in rows]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"column\(s\) \['cui'\] not found; columns present: \['image_id', 'caption', 'cuis'\]"):
        load_splits(DataConfig(source=str(tmp_path)))


def test_a_utf16_file_is_named_as_such(tmp_path):
    """The hint said `iconv -f latin1`, which would garble a UTF-16 file (Excel's 'Unicode text')."""
    rows = real_rows(5)
    path = tmp_path / "train.tsv"
    path.write_text("caption\tcui\n" + "".join(f"{r['caption']}\t{';'.join(r['cui'])}\n" for r in rows), encoding="utf-16")
    with pytest.raises(DataError, match="UTF-16 text, not UTF-8.*iconv -f utf-16"):
        load_splits(DataConfig(source=str(path)))


# -- session 13: the input review -----------------------------------------------------------------


def hub_layout_repo(tmp_path: Path, monkeypatch, columns: dict) -> None:
    """Every Hub dataset id read by datasets.load_dataset is this local repository of the Hub's
    parquet layout (the Hub is unreachable here); ``columns`` maps a column to a function of a row."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    rows = real_rows(30)
    for name, part in (("train", rows[:20]), ("test", rows[20:])):
        pq.write_table(pa.table({c: [f(r) for r in part] for c, f in columns.items()}),
                       repo / f"{name}-00000-of-00001.parquet")
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: real(str(repo.parent), *a, **k))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


@pytest.mark.parametrize("source", ["shared/roco/train_dir", "org/my data", "[a,b]"])
def test_a_source_that_is_no_path_and_no_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys, source):
    """A mistyped relative path with two slashes went to datasets: FileNotFoundError / HFValidationError
    tracebacks, exit 1 (after a wrong 'loading EVERY column' warning for 'org/my data')."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no file or directory .* exists, and it is not a Hub dataset id"):
        load_splits(DataConfig(source=source))
    assert main(["baseline", "--data", source, "--features", "tfidf", "--output-dir", str(tmp_path / "bl")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a Hub dataset id" in err and "EVERY column" not in err
    assert not (tmp_path / "bl").exists()


def test_a_hub_dataset_that_does_not_exist_is_a_clear_error(monkeypatch):
    """datasets' DatasetNotFoundError (a FileNotFoundError: a typo, or a gated/private dataset
    without a token) was not caught: a traceback, exit 1."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(path, *args, **kwargs):  # what datasets raises for an id the Hub does not serve
        raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match=r"'someorg/typo'.*no file or directory.*the Hub has no dataset.*hf auth login"):
        load_splits(DataConfig(source="someorg/typo"))


def test_mlm_reads_a_text_only_hub_corpus_and_the_labels_it_does_not_use_unparsed(tmp_path, monkeypatch):
    """The MLM phase needs no labels, but the label column was always read: a Hub corpus without one
    failed ('No match for FieldRef.Name(cui)'), and a label field MLM never uses stopped it when it
    did not parse."""
    hub_layout_repo(tmp_path, monkeypatch, {"caption": lambda r: r["caption"]})
    with pytest.raises(DataError, match=r"data.label_column=null"):
        load_splits(DataConfig(source="someorg/reports"), need_labels=False)
    splits = load_splits(DataConfig(source="someorg/reports", label_column=None), need_labels=False)
    assert len(splits["test"]) == 10 and len(splits["train"]) + len(splits["validation"]) == 20
    with pytest.raises(DataError, match="data.label_column is null .* needs labels"):
        load_splits(DataConfig(source="someorg/reports", label_column=None))
    assert load_config(None, ["data.label_column=null"]).data.label_column is None

    rows = real_rows(40)
    for row in rows:
        row["cui"] = 7  # not labels at all: MLM does not care
    (tmp_path / "dir").mkdir()
    split_dir(tmp_path / "dir", rows[:30], test=rows[30:])
    splits = load_splits(DataConfig(source=str(tmp_path / "dir")), need_labels=False)
    assert sum(len(s) for s in splits.values()) == 40
    with pytest.raises(DataError, match="labels must be a list"):
        load_splits(DataConfig(source=str(tmp_path / "dir")))


def test_every_data_file_a_split_directory_does_not_read_is_named(tmp_path, caplog):
    """eval.jsonl (the user's validation split) was skipped without a word, and validation was cut
    from train instead; only names starting like a split's were reported."""
    rows = real_rows(120)
    split_dir(tmp_path, rows[:80], test=rows[100:])
    write_jsonl(tmp_path / "eval.jsonl", rows[80:100])
    write_jsonl(tmp_path / "train_v1.jsonl", rows[:10])
    (tmp_path / "notes.txt").write_text("not data")
    with caplog.at_level(logging.INFO, logger="radtrain.data.sources"):
        splits = load_splits(DataConfig(source=str(tmp_path)))
    assert "not read: eval.jsonl, train_v1.jsonl" in caplog.text and "notes.txt" not in caplog.text
    assert "one is cut from train" in caplog.text
    assert f"{len(splits['validation'])} of its 80 training captions are held out for validation" in caplog.text


def test_auto_label_delimiter_keeps_multi_word_labels_between_delimiters(tmp_path):
    """'Pleural Effusion|Cardiomegaly' trained three labels (Pleural, Effusion, Cardiomegaly)."""
    from radtrain.data.sources import parse_labels

    assert parse_labels("Pleural Effusion|Cardiomegaly", "auto", "x") == ["Pleural Effusion", "Cardiomegaly"]
    assert parse_labels("pleural  effusion, cardiomegaly", "auto", "x") == ["pleural effusion", "cardiomegaly"]
    assert parse_labels("C0032227 c0018800; C0040405", "auto", "x") == ["C0032227", "C0018800", "C0040405"]
    assert parse_labels("C0032227 C0018800", "auto", "x") == ["C0032227", "C0018800"]
    assert parse_labels("cardiomegaly effusion", "auto", "x") == ["cardiomegaly", "effusion"]  # as documented


def test_a_config_file_keeps_text_settings_as_written(tmp_path):
    """YAML read hub.revision: 1.10 as 1.1 (a push to branch '1.1') and output_dir: 0755 as '493';
    command-line overrides already kept them as typed."""
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: 0755\nhub:\n  revision: 1.10\ntrain:\n  lr: 2.0e-5\n  epochs: 3\n"
                    "data:\n  max_length: 0x80\n")
    cfg = load_config(path)
    assert cfg.output_dir == "0755" and cfg.hub.revision == "1.10"
    assert cfg.train.lr == 2e-5 and cfg.data.max_length == 128 and type(cfg.data.max_length) is int
    assert "revision: '1.10'" in cfg.to_yaml()  # the saved config.yaml round-trips


def test_home_in_output_dir_and_cache_dir_is_the_home_directory(tmp_path, monkeypatch):
    """output_dir: ~/runs made a folder named '~' in the working directory (and `rm -rf ~...` to clean
    it up is how a home directory gets deleted)."""
    from radtrain.data.tokens import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["output_dir=~/runs/x", "data.cache_dir=~/cache"])
    assert cfg.output_dir == str(tmp_path / "home" / "runs" / "x")
    assert cache_root(cfg.data.cache_dir) == tmp_path / "home" / "cache"


def test_evaluate_and_baseline_refuse_data_settings_they_would_ignore(tmp_path, capsys):
    """evaluate took data.min_label_count=50 (the export's labels.json decides) and baseline
    data.packing=on without a word."""
    from radtrain.evaluate import evaluate_model

    with pytest.raises(ConfigError, match="evaluate would ignore 'data.min_label_count=50'"):
        evaluate_model(tmp_path / "best", None, overrides=["data.min_label_count=50"])
    assert main(["baseline", "--data", str(ROCO), "--features", "tfidf", "--output-dir", str(tmp_path / "bl"),
                 "data.packing=on"]) == 2
    assert "data.packing=on would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "bl").exists()
