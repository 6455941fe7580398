"""Exit statuses, evaluate reproducing a run's test figures, predict's input checks, the
synthetic dataset's completeness check and config-key hygiene: in-process through radtrain.cli.main."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, TINY, subprocess_env, write_roco_slice

from radtrain.cli import main
from radtrain.config import ConfigError, config_from_dict, load_config
from radtrain.data.sources import DataError, load_splits
from radtrain.data.synthetic import dataset_complete, write_dataset


def test_push_local_problems_exit_2_not_3(tmp_path, capsys):
    """Exit 3 means 'training succeeded, the Hub push did not'; a missing directory or a bad repo
    id is bad input (2): retrying the push cannot fix it."""
    assert main(["push", str(tmp_path / "nonexistent"), "--repo-id", "a/b"]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "a/b"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "no-slash"]) == 2
    assert "org/name" in capsys.readouterr().err


def test_predict_bad_model_or_input_exit_2(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nonexistent"), "a caption"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "best/" in err
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"caption": "fine"}\n{not json\n', encoding="utf-8")
    assert main(["predict", "--model", str(tmp_path), "--input", str(bad)]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_init_from_checked_before_the_data_is_loaded(tmp_path, capsys):
    """A wrong model.init_from fails at start, before load_splits (which may download a dataset):
    here the data source is missing too, and the init_from error must be the one reported."""
    code = main([
        "classify", "--output-dir", str(tmp_path / "run"), "data.source=./no-such-data.jsonl",
        "model.name=scratch:tiny", f"model.init_from={tmp_path / 'no-such-run' / 'best'}",
    ])
    assert code == 2
    assert "model.init_from" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex trains on CUDA")
def test_flex_attention_on_a_cpu_is_refused_before_anything_is_read_or_written(tmp_path, capsys):
    """data.packed_attention=flex has no backward on a CPU: refused at start, naming the fix,
    before the (here missing) data is read and before the run directory exists."""
    code = main([
        "classify", "--output-dir", str(tmp_path / "run"), "data.source=./no-such-data.jsonl",
        "model.name=scratch:tiny", "data.packing=on", "data.packed_attention=flex",
    ])
    assert code == 2
    assert "data.packed_attention=flex trains on CUDA only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="these settings pack on a GPU")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.packed_attention=varlen"], "needs a varlen flash kernel"),
        (["model.attn_implementation=eager"], "cannot run with model.attn_implementation='eager'"),
        (["model.attn_implementation=flash_attention_2", "data.packed_attention=blocks"], "cannot use model.attn_implementation"),
    ],
)
def test_packing_settings_that_cannot_run_are_refused_before_anything_is_read_or_written(tmp_path, capsys, overrides, message):
    """Every packing refusal comes at start (it used to come after the tokenizer was trained, the
    data tokenized and the model built, leaving a tokenizer/ folder behind)."""
    code = main([
        "mlm", "--output-dir", str(tmp_path / "run"), "data.source=./no-such-data.jsonl",
        "model.name=scratch:tiny", "data.packing=on", *overrides,
    ])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_radtrain_varlen_attention_builds_both_phases(tmp_path):
    """model.attn_implementation=radtrain_varlen (what the start banner and docs/bench/*.json
    show) is accepted at start, so both phases must build with it: transformers checks the name
    at the model build, before packing.enable registered it (a ValueError traceback, exit 1).
    A fresh process: registering is once per process, and another test may have done it."""
    source = write_roco_slice(tmp_path / "roco.jsonl", 120)
    for phase in ("mlm", "classify"):
        done = subprocess.run(
            [PYTHON, "-m", "radtrain", phase, "--output-dir", str(tmp_path / phase), f"data.source={source}",
             *TINY, "model.attn_implementation=radtrain_varlen", "train.max_steps=1", "data.packing=off"],
            capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "radtrain_varlen" in done.stdout + done.stderr


def test_num_workers_is_gone_but_old_saved_configs_load():
    with pytest.raises(ConfigError, match="unknown config key 'train.num_workers'"):
        load_config(None, ["train.num_workers=2"])
    saved = load_config(None, []).to_dict()
    saved["train"]["num_workers"] = 0  # what older versions wrote into config.yaml
    assert config_from_dict(saved).to_dict() == load_config(None, []).to_dict()


def test_synthetic_dataset_complete_only_after_a_finished_write(tmp_path):
    out = tmp_path / "synth"
    assert not dataset_complete(out)
    write_dataset(out, n_train=40, n_validation=10, n_test=10, seed=3)
    assert dataset_complete(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A write killed midway: the names file (written last) is missing.
    (out / "cui_names.json").unlink()
    (out / "train.jsonl").write_text((out / "train.jsonl").read_text()[:100])
    assert not dataset_complete(out)
    write_dataset(out, n_train=40, n_validation=10, n_test=10, seed=3)
    assert dataset_complete(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary files left


def test_hub_fallback_warns_and_offline_fallback_is_a_data_error(monkeypatch, caplog):
    """The Hub is not reachable here, so datasets.load_dataset stands in: a dataset that refuses
    `columns=` makes the fallback load every column (warned, naming the cost), and that fallback
    failing offline gets the same clear DataError as the first call."""
    import datasets

    calls = []

    def load_dataset(source, **kwargs):
        calls.append(kwargs)
        if "columns" in kwargs:
            raise TypeError("unexpected keyword argument 'columns'")
        raise ConnectionError("offline and not cached")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = load_config(None, ["data.source=some-org/some-captions"]).data
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="radtrain prefetch --data"):
        load_splits(cfg)
    assert len(calls) == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "some-org/some-captions" in warned and "EVERY column" in warned


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory):
    """A tiny classify run with a RELATIVE data.source and data.max_eval_samples."""
    root = tmp_path_factory.mktemp("capped")
    write_roco_slice(root / "roco.jsonl", 400)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("RADTRAIN_CACHE", str(root / "cache"))
    try:
        code = main([
            "classify", "--output-dir", str(root / "run"), "data.source=roco.jsonl", *TINY,
            "train.epochs=1", "data.max_eval_samples=17",
        ])
    finally:
        mp.undo()
    assert code == 0
    return root


def test_evaluate_reproduces_the_runs_test_figures(capped_run, tmp_path, monkeypatch):
    best = capped_run / "run" / "best"
    meta = json.loads((best / "radtrain.json").read_text())
    assert meta["data"]["max_eval_samples"] == 17
    assert meta["data"]["source"] == str((capped_run / "roco.jsonl").resolve())
    assert "source: roco.jsonl" in (capped_run / "run" / "config.yaml").read_text()  # as the user wrote it
    summary = json.loads((capped_run / "run" / "summary.json").read_text())
    assert summary["split_sizes"]["test"] == 17
    monkeypatch.chdir(tmp_path)  # another working directory: the relative source must not matter
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["evaluate", "--model", str(best), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key, value in summary["test"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_evaluate_scores_every_caption_of_a_held_out_file(capped_run, tmp_path, monkeypatch):
    """--data naming another single file: all of it is scored, not the run's 10% test cut of it
    (and not the run's max_eval_samples); the run's own file still gives the run's test split."""
    best = capped_run / "run" / "best"
    held_out = write_roco_slice(tmp_path / "held_out.jsonl", 60, start=2000)
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["evaluate", "--model", str(best), "--data", str(held_out), "--output", str(tmp_path / "h.json")]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["captions"] == 60
    own = capped_run / "roco.jsonl"
    assert main(["evaluate", "--model", str(best), "--data", str(own), "--output", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["captions"] == 17  # the run's capped test split


def test_evaluate_data_source_override_is_data(capped_run, tmp_path, monkeypatch, capsys):
    """`evaluate data.source=FILE` scored the run's 10% test cut of FILE where --data FILE scores
    all of it; an MLM export got a FileNotFoundError; --output naming a directory failed only
    after the evaluation."""
    best = capped_run / "run" / "best"
    held_out = write_roco_slice(tmp_path / "held_out.jsonl", 60, start=2000)
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["evaluate", "--model", str(best), f"data.source={held_out}", "--output", str(tmp_path / "h.json")]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["captions"] == 60
    assert main(["evaluate", "--model", str(best), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    (mlm / "config.json").write_text("{}")
    (mlm / "radtrain.json").write_text(json.dumps({"task": "mlm"}))
    assert main(["evaluate", "--model", str(mlm)]) == 2
    assert "need a classifier export" in capsys.readouterr().err


def test_evaluate_refuses_what_it_would_ignore_or_fail_on_late(capped_run, tmp_path, monkeypatch, capsys):
    """Session 7 review: `evaluate train.threshold=0.9` was accepted and ignored; an unwritable
    --output failed with a traceback after the evaluation; an export without labels.json was a
    FileNotFoundError traceback; a held-out file was reported as split 'test'."""
    best = capped_run / "run" / "best"
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["evaluate", "--model", str(best), "train.threshold=0.9"]) == 2
    assert "--threshold" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", "--model", str(best), "--output", str(tmp_path / "afile" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "test/f1" not in capsys.readouterr().out
    bare = tmp_path / "bare"
    shutil.copytree(best, bare)
    (bare / "labels.json").unlink()
    assert main(["evaluate", "--model", str(bare)]) == 2
    assert "no labels.json" in capsys.readouterr().err
    held_out = write_roco_slice(tmp_path / "held_out.jsonl", 30, start=2000)
    assert main(["evaluate", "--model", str(best), "--data", str(held_out), "--split", "validation",
                 "--output", str(tmp_path / "h.json")]) == 0
    written = json.loads((tmp_path / "h.json").read_text())
    assert written["split"] == "held-out" and written["data"].endswith("held_out.jsonl")
    assert "held-out/f1" in capsys.readouterr().out
    # A published export names its local training file by name only; another model's labels.json.
    published = tmp_path / "published"
    shutil.copytree(best, published)
    meta = json.loads((published / "radtrain.json").read_text())
    (published / "radtrain.json").write_text(json.dumps({**meta, "data": {**meta["data"], "source": "local:roco.jsonl"}}))
    assert main(["evaluate", "--model", str(published)]) == 2
    assert "--data FILE" in capsys.readouterr().err
    labels = json.loads((bare.parent / "published" / "labels.json").read_text())
    labels["labels"] = labels["labels"][:-1]
    (published / "labels.json").write_text(json.dumps(labels))
    assert main(["evaluate", "--model", str(published), "--data", str(held_out)]) == 2
    assert "outputs" in capsys.readouterr().err
    # Session 8 review: the same count in another order scored every label against another CUI's targets.
    labels = json.loads((best / "labels.json").read_text())
    labels["labels"] = labels["labels"][1:2] + labels["labels"][:1] + labels["labels"][2:]
    (published / "labels.json").write_text(json.dumps(labels))
    assert main(["evaluate", "--model", str(published), "--data", str(held_out)]) == 2
    assert "orders the CUIs otherwise than the model's outputs (config.json id2label), first at output 0" in (
        capsys.readouterr().err
    )


def test_a_failed_push_keeps_the_selection_record(capped_run, tmp_path, monkeypatch):
    """The selection job published before writing selection.json (the pipeline's result record)
    and its end event: a push that failed (the Hub unreachable from the node) lost both."""
    import shutil

    from radtrain.cluster.jobs import SelectJob
    from radtrain.hub import PushError

    member = tmp_path / "classify" / "c0"
    shutil.copytree(capped_run / "run", member)
    monkeypatch.chdir(capped_run)  # the member's data.source is relative to where it ran
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 on a node
    job = SelectJob(str(tmp_path), [str(member)], "f1", {"repo_id": "org/name"}, {}, max_requeues=0)
    with pytest.raises(PushError):
        job()
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["member"] == "c0" and selection["published"] is None and "HF_HUB_OFFLINE" in selection["publish_error"]
    assert selection["test"] and (tmp_path / "selected" / "config.json").is_file()
    events = [json.loads(x)["event"] for x in (tmp_path / "select" / "slurm_events.jsonl").read_text().splitlines()]
    assert events == ["start", "end"]


def test_an_offline_selection_job_leaves_the_push_to_a_node_with_internet(capped_run, tmp_path, monkeypatch, capsys):
    """jobs/rocov2_large.yaml (offline: true) with hub.repo_id: the selection job always failed at the
    push (exit 3: HF_HUB_OFFLINE set on the node). It now completes and records the command."""
    import shutil

    from radtrain.cluster.jobfile import load_job
    from radtrain.cluster.jobs import SelectJob
    from radtrain.cluster.submit import dry_run

    member = tmp_path / "classify" / "c0"
    shutil.copytree(capped_run / "run", member)
    monkeypatch.chdir(capped_run)
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    monkeypatch.setenv("RADTRAIN_HUB_RECORDER", str(tmp_path / "calls.jsonl"))  # any call would be recorded
    hub = {"repo_id": "org/name", "revision": "exp1", "private": False, "commit_message": "lr sweep's best"}
    job = SelectJob(str(tmp_path), [str(member)], "f1", hub, {"HF_HUB_OFFLINE": "1"}, max_requeues=0)
    result = job()
    assert not (tmp_path / "calls.jsonl").exists()
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["published"] is None and selection == {**result}
    assert selection["publish_later"] == (
        f"radtrain push {member} --repo-id org/name --revision exp1 --public --message 'lr sweep'\"'\"'s best'"
    )
    assert "not publishing from here" in capsys.readouterr().out
    # The dry run says so too.
    monkeypatch.chdir(REPO)
    pipeline = load_job(REPO / "jobs" / "rocov2_large.yaml", ["hub.repo_id=myorg/rocov2-large",
                                                              f"output_dir={tmp_path / 'root'}"])
    out = dry_run(pipeline)
    assert "offline job (offline: true): not published from the node" in out and "published to" not in out


def test_predict_reads_upper_case_jsonl_as_jsonl(capped_run, tmp_path, capsys):
    """in.JSONL was read as plain text: each JSON line became the 'caption' predicted on."""
    path = tmp_path / "in.JSONL"
    path.write_text(json.dumps({"image_id": "x", "caption": "Axial CT of the chest."}) + "\n", encoding="utf-8")
    assert main(["predict", "--model", str(capped_run / "run" / "best"), "--input", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Axial CT of the chest."]


def test_predict_answers_every_line_and_nothing_for_a_blank_text(capped_run, tmp_path, capsys, monkeypatch):
    """Session 9 hunt: a blank line of a .txt --input was skipped (output line N no longer answered
    input line N); a blank text got a CUI under always_top1; `--input -` was not standard input;
    an empty --input file was reported as no --input at all."""
    import io

    best = capped_run / "run" / "best"
    top1 = tmp_path / "top1"
    shutil.copytree(best, top1)
    thresholds = json.loads((top1 / "thresholds.json").read_text()) if (top1 / "thresholds.json").is_file() else {}
    (top1 / "thresholds.json").write_text(json.dumps({**thresholds, "global": 0.999, "per_label": None, "top1": True}))
    lines = tmp_path / "in.txt"
    lines.write_bytes(b"Chest x-ray.\r\n\r\nCT of the head.\r\n")
    assert main(["predict", "--model", str(top1), "--input", str(lines)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Chest x-ray.", "", "CT of the head."]
    assert [len(r["cuis"]) for r in rows] == [1, 0, 1]  # top1 for a caption, nothing for no caption
    monkeypatch.setattr("sys.stdin", io.StringIO("Axial CT of the chest.\n"))
    assert main(["predict", "--model", str(best), "--input", "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Axial CT of the chest."]
    # Bytes that are not UTF-8 on standard input: a DataError (exit 2), as the same bytes in a file.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe bad\n")))
    assert main(["predict", "--model", str(best), "--input", "-"]) == 2
    assert "standard input: line" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["predict", "--model", str(best), "--input", str(tmp_path / "empty.txt")]) == 2
    assert f"--input {tmp_path / 'empty.txt'} holds no texts" in capsys.readouterr().err


def test_predict_reads_json_lines_from_standard_input_when_told(capped_run, capsys, monkeypatch, caplog):
    """Session 9 left open: `cat captions.jsonl | radtrain predict --input -` scored each JSON line,
    braces and all, as one caption, silently. Now a warning says so and --input-format jsonl reads
    the field."""
    import io

    best = str(capped_run / "run" / "best")
    piped = '{"caption": "Axial CT of the chest.", "cui": ["C0040405"]}\n{"caption": "Chest x-ray."}\n'
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    with caplog.at_level(logging.WARNING, logger="radtrain.predict"):
        assert main(["predict", "--model", best, "--input", "-"]) == 0
    assert "--input-format jsonl" in caplog.text
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    assert main(["predict", "--model", best, "--input", "-", "--input-format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Axial CT of the chest.", "Chest x-ray."]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"caption": "x"}\nnot json\n'))
    assert main(["predict", "--model", best, "--input", "-", "--input-format", "jsonl"]) == 2
    assert "standard input:2: malformed JSON" in capsys.readouterr().err


def test_evaluate_knows_the_runs_own_file_by_content(capped_run, tmp_path, monkeypatch, capsys):
    """Session 9 hunt: a copy of the training file (a download, for a published model, which names
    it only as local:NAME) was scored whole as 'held-out', training captions included, and the
    --split asked for was dropped without a word."""
    best = capped_run / "run" / "best"
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    summary = json.loads((capped_run / "run" / "summary.json").read_text())
    copy = tmp_path / "download" / "roco.jsonl"
    copy.parent.mkdir()
    shutil.copy(capped_run / "roco.jsonl", copy)
    published = tmp_path / "published"
    shutil.copytree(best, published)
    meta = json.loads((published / "radtrain.json").read_text())
    assert len(meta["data_sha256"]) == 64
    (published / "radtrain.json").write_text(json.dumps({**meta, "data": {**meta["data"], "source": "local:roco.jsonl"}}))
    for model in (best, published):
        out = tmp_path / f"{model.name}.json"
        assert main(["evaluate", "--model", str(model), "--data", str(copy), "--split", "test", "--output", str(out)]) == 0
        written = json.loads(out.read_text())
        assert written["split"] == "test" and written["captions"] == summary["split_sizes"]["test"]
        assert written["f1"] == pytest.approx(summary["test"]["f1"], abs=1e-6)
    held_out = write_roco_slice(tmp_path / "held_out.jsonl", 30, start=2000)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(published), "--data", str(held_out), "--split", "validation"]) == 0
    assert "--split validation does not apply" in capsys.readouterr().err
    # The run's own path with other content: neither the run's splits nor held-out data.
    moved = tmp_path / "moved"
    shutil.copytree(best, moved)
    changed = tmp_path / "changed.jsonl"
    changed.write_text((capped_run / "roco.jsonl").read_text() + (held_out.read_text()))
    meta_moved = {**meta, "data": {**meta["data"], "source": str(changed)}}
    (moved / "radtrain.json").write_text(json.dumps(meta_moved))
    for extra in ([], ["--data", str(changed)]):
        assert main(["evaluate", "--model", str(moved), *extra]) == 2
        assert "changed since the run trained on it" in capsys.readouterr().err
    # An export from before the content record: the message does not promise what cannot be done.
    old = {k: v for k, v in json.loads((published / "radtrain.json").read_text()).items() if k != "data_sha256"}
    (published / "radtrain.json").write_text(json.dumps(old))
    assert main(["evaluate", "--model", str(published)]) == 2
    assert "predates radtrain's record" in capsys.readouterr().err


def test_exports_load_with_transformers_4_tokenizer_classes(capped_run):
    """transformers 5 saved tokenizer_class 'TokenizersBackend' (transformers 4 cannot import it:
    a pushed model failed to load there) and this process's local_files_only=True."""
    from transformers import AutoTokenizer

    best = capped_run / "run" / "best"
    config = json.loads((best / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "local_files_only" not in config and "is_local" not in config
    tokenizer = AutoTokenizer.from_pretrained(best)
    reference = AutoTokenizer.from_pretrained(capped_run / "run" / "tokenizer")
    texts = ["Axial CT of the chest showing a [MASK] nodule.", "Chest radiograph."]
    assert tokenizer(texts, padding=True)["input_ids"] == reference(texts, padding=True)["input_ids"]


def test_evaluate_uses_the_precision_the_run_evaluated_in(capped_run, tmp_path, monkeypatch, capsys):
    """On a GPU train.precision=auto is bf16: an fp32 run's export was re-evaluated in bf16 and
    gave other figures than the run's. The export records the precision; evaluate uses it."""
    import shutil

    best = tmp_path / "best"
    shutil.copytree(capped_run / "run" / "best", best)
    meta = json.loads((best / "radtrain.json").read_text())
    assert meta["precision"] == "no"  # this CPU run trained and tested in fp32
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["evaluate", "--model", str(best)]) == 0
    assert "fp32 as the run evaluated" in capsys.readouterr().out
    (best / "radtrain.json").write_text(json.dumps({**meta, "precision": "bf16"}))  # as a GPU run writes it
    # A process of its own: accelerate's precision is fixed once per process.
    done = subprocess.run(
        [PYTHON, "-m", "radtrain", "evaluate", "--model", str(best), "--output", str(tmp_path / "bf16.json")],
        capture_output=True, text=True, timeout=300, env=subprocess_env(RADTRAIN_CACHE=str(capped_run / "cache")),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bf16 as the run evaluated" in done.stdout
    # Session 8 review: predict ran in fp32 whatever the export's precision, so its decisions were
    # not evaluate's (nor those the thresholds were tuned on). It now takes the export's precision.
    from radtrain.data.labels import LabelSpace
    from radtrain.evaluate import export_config
    from radtrain.metrics import multilabel_metrics
    from radtrain.predict import Predictor
    from radtrain.thresholds import apply_thresholds

    monkeypatch.chdir(capped_run)  # the run's relative data.source
    test = load_splits(export_config(json.loads((best / "radtrain.json").read_text()), None).data)["test"]
    labels = LabelSpace.load(best / "labels.json")
    evaluated = json.loads((tmp_path / "bf16.json").read_text())
    predictor, fp32 = Predictor(best, device="cpu"), Predictor(best, device="cpu", precision="fp32")
    assert predictor.precision == "bf16"
    probs = predictor.probabilities(test.texts, batch_size=7)
    assert not np.allclose(probs, fp32.probabilities(test.texts, batch_size=7), atol=1e-4)  # the gap was real
    decided = apply_thresholds(probs, predictor.thresholds, predictor.top1)
    got = multilabel_metrics(labels.encode(test.labels), decided, labels.count_outside(test.labels))
    suffix = "_tuned" if "f1_tuned" in evaluated else ""
    for key, value in got.items():
        assert value == pytest.approx(evaluated[f"{key}{suffix}"], abs=1e-9), key


def test_a_bf16_export_predicts_in_bf16_unless_fp32_is_asked(capped_run, tmp_path):
    """A DeepSpeed bf16 run's export holds bf16 weights: loaded as saved, it computes as the run
    did; --precision fp32 used to turn off autocast only, leaving the weights (and the compute)
    in bf16 (session 8 review)."""
    from transformers import AutoModelForSequenceClassification

    from radtrain.predict import Predictor

    best = tmp_path / "bf16"
    shutil.copytree(capped_run / "run" / "best", best)
    model = AutoModelForSequenceClassification.from_pretrained(best, dtype=torch.bfloat16)
    model.save_pretrained(best)  # as DeepSpeed's bf16 engine leaves it
    meta = json.loads((best / "radtrain.json").read_text())
    (best / "radtrain.json").write_text(json.dumps({**meta, "precision": "bf16"}))
    texts = ["Axial CT of the abdomen showing a liver cyst.", "Chest radiograph: no pneumothorax."]
    as_run, fp32 = Predictor(best, device="cpu"), Predictor(best, device="cpu", precision="fp32")
    assert next(as_run.model.parameters()).dtype == torch.bfloat16
    assert next(fp32.model.parameters()).dtype == torch.float32
    assert not np.array_equal(as_run.probabilities(texts), fp32.probabilities(texts))


def test_predict_reads_csv_input_as_training_does_and_strips_texts(capped_run, tmp_path, capsys):
    """A .csv --input was read as raw lines (the header and quoted commas became captions); texts
    were not stripped, though training strips every caption (other tokens, other predictions)."""
    from radtrain.predict import Predictor

    best = str(capped_run / "run" / "best")
    table = tmp_path / "in.csv"
    table.write_text('caption,cui\n"Axial CT, chest",C1\nChest radiograph.,C2\n', encoding="utf-8")
    assert main(["predict", "--model", best, "--threshold", "0.0", "--input", str(table)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["Axial CT, chest", "Chest radiograph."]
    probs = Predictor(best).probabilities(["Axial CT of the chest.", "  Axial CT of the chest.\n"])
    np.testing.assert_allclose(probs[0], probs[1], rtol=0, atol=1e-6)  # rows of one batch: same tokens now


def test_predict_reads_the_text_column_the_model_was_trained_on_and_streams(capped_run, tmp_path, capsys,
                                                                           monkeypatch):
    """A model trained with data.text_column=findings could not predict on files of its own format
    ('caption' was hard-coded); every probability was held until the last text was scored."""
    import radtrain.predict as predict

    best = tmp_path / "best"
    shutil.copytree(capped_run / "run" / "best", best)
    meta = json.loads((best / "radtrain.json").read_text())
    meta["data"]["text_column"] = "findings"
    (best / "radtrain.json").write_text(json.dumps(meta))
    path = tmp_path / "reports.jsonl"
    texts = [f"Axial CT of the chest, finding {i}." for i in range(5)]
    path.write_text("".join(json.dumps({"findings": t}) + "\n" for t in texts), encoding="utf-8")
    monkeypatch.setattr(predict, "PREDICT_CHUNK", 2)
    assert main(["predict", "--model", str(best), "--input", str(path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == texts
    # --text-column names another field; chunks of 2 give the lines of one batch
    path.write_text("".join(json.dumps({"impression": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["predict", "--model", str(best), "--input", str(path), "--text-column", "impression"]) == 0
    chunked = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    monkeypatch.setattr(predict, "PREDICT_CHUNK", 1024)
    assert main(["predict", "--model", str(best), "--input", str(path), "--text-column", "impression"]) == 0
    whole = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert chunked == whole and len(whole) == 5
    # A file in the usual caption format still works for that model (its column, then text, then caption).
    path.write_text("".join(json.dumps({"caption": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["predict", "--model", str(best), "--input", str(path)]) == 0
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines() if x.startswith("{")] == texts
    # Streamed: the first line comes out before the input is read to its end.
    consumed = []

    def endless():
        for i in range(10_000):
            consumed.append(i)
            yield f"CT of the chest {i}."

    monkeypatch.setattr(predict, "PREDICT_CHUNK", 4)
    first = next(predict.predict_lines(best, endless()))
    assert json.loads(first)["text"] == "CT of the chest 0." and len(consumed) <= 8


def test_predict_into_a_closed_pipe_ends_quietly(capped_run, tmp_path):
    """`radtrain predict ... | head -1` ended with a BrokenPipeError traceback."""
    path = tmp_path / "many.txt"
    path.write_text("".join(f"Axial CT of the chest number {i}.\n" for i in range(3000)), encoding="utf-8")
    proc = subprocess.Popen(
        [PYTHON, "-m", "radtrain", "predict", "--model", str(capped_run / "run" / "best"), "--input", str(path),
         "--threshold", "0.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(),
    )
    assert proc.stdout.readline().startswith(b'{"text"')
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_predict_threshold_override_replaces_the_rule(capped_run, capsys):
    best = str(capped_run / "run" / "best")
    assert main(["predict", "--model", best, "--threshold", "0.0", "CT of the chest"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    labels = json.loads((capped_run / "run" / "best" / "config.json").read_text())["id2label"]
    assert len(row["cuis"]) == len(labels)  # every label clears 0.0
    assert main(["predict", "--model", best, "--threshold", "1.0", "CT of the chest"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["cuis"] == []  # and no top1 forced in


def test_cli_works_without_an_optional_extra_dependency():
    """A GPU image without submitit (found on the lent H100s) must still train and benchmark:
    `radtrain bench` works, and the help says which command is unavailable and what to install."""
    code = (
        "import sys; sys.modules['submitit'] = None\n"  # makes `import submitit` fail as if absent
        "from radtrain.cli import main\n"
        "assert main(['bench', '--help']) == 0\n"
    )
    bench = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "--variant" in bench.stdout
    code = "import sys; sys.modules['submitit'] = None\nfrom radtrain.cli import main\nmain(['--help'])\n"
    top = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert "unavailable here: radtrain.cluster (needs submitit: pip install submitit)" in top.stdout, top.stderr[-2000:]


# -- session 13: the inference-side review ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("thresholds.json", '{"global": null}', "'global' is None, not a threshold in [0, 1]"),
        ("thresholds.json", '{"global": 0.3,', "thresholds.json: cannot read"),
        ("thresholds.json", "[0.3]", "not a thresholds file"),
        ("thresholds.json", '{"per_label": {"C0040405": "high"}}', "'per_label' must map CUIs to thresholds"),
        ("labels.json", "{not json", "not a radtrain labels.json"),
        ("labels.json", "[1, 2]", "not a radtrain labels.json"),
        ("radtrain.json", "{not json", "radtrain.json: cannot read"),
        ("model.safetensors", None, "incomplete model directory, no weights file"),
        ("tokenizer.json", None, "incomplete model directory, no tokenizer file"),
        ("config.json", "{not json", "config.json: cannot read"),
    ],
)
def test_a_damaged_export_file_is_named_by_predict_and_evaluate(capped_run, tmp_path, monkeypatch, capsys, name,
                                                                content, message):
    """A null global threshold predicted nothing for every text (exit 0); the other damages were
    tracebacks (exit 1), or 'Offline? Run radtrain prefetch' for a damaged config.json."""
    best = tmp_path / "best"
    shutil.copytree(capped_run / "run" / "best", best)
    if content is None:
        (best / name).unlink()
    else:
        (best / name).write_text(content)
    monkeypatch.setenv("RADTRAIN_CACHE", str(capped_run / "cache"))
    assert main(["predict", "--model", str(best), "Axial CT of the chest."]) == 2
    err = capsys.readouterr().err
    if name != "labels.json":  # predict reads labels.json only for names
        assert message in err and "Traceback" not in err
    assert main(["evaluate", "--model", str(best)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_reads_a_byte_order_mark_as_training_does_and_refuses_non_utf8_arguments(capped_run, tmp_path,
                                                                                         capsys, monkeypatch):
    """A .jsonl with a UTF-8 BOM was 'malformed JSON' (training reads it); in a .txt the BOM was
    part of the first text (other probabilities); a non-UTF-8 argument was a tokenizer traceback."""
    import io

    best = str(capped_run / "run" / "best")
    text = "Axial CT of the chest."
    plain = tmp_path / "plain.txt"
    plain.write_text(text + "\n", encoding="utf-8")
    assert main(["predict", "--model", best, "--input", str(plain)]) == 0
    expected = capsys.readouterr().out
    for suffix, body in ((".txt", text + "\n"), (".jsonl", json.dumps({"caption": text}) + "\n")):
        path = tmp_path / f"bom{suffix}"
        path.write_text(body, encoding="utf-8-sig")
        assert main(["predict", "--model", best, "--input", str(path)]) == 0
        assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbf" + text.encode() + b"\n")))
    assert main(["predict", "--model", best, "--input", "-"]) == 0
    assert capsys.readouterr().out == expected
    undecodable = b"caf\xe9 CT".decode("utf-8", "surrogateescape")  # how Python hands over such an argument
    assert main(["predict", "--model", best, undecodable]) == 2
    assert "text argument 1 is not UTF-8" in capsys.readouterr().err


def test_evaluate_without_a_record_of_the_data_asks_for_it(capped_run, tmp_path, capsys):
    """An export without radtrain.json was scored on DataConfig's default Hub dataset."""
    best = tmp_path / "best"
    shutil.copytree(capped_run / "run" / "best", best)
    (best / "radtrain.json").unlink()
    assert main(["evaluate", "--model", str(best)]) == 2
    assert "pass the data to score with --data SOURCE" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(capped_run / "run" / "best"), "data.max_length=100000"]) == 2
    assert "above the model's limit" in capsys.readouterr().err


def test_push_of_an_unfinished_run_or_from_best_reads_the_run(capped_run, tmp_path, capsys):
    """`push RUN/best` ignored RUN/config.yaml (hub.repo_id and revision); a run without
    summary.json was published as finished ('the test split was read once'); --preview onto the
    export or a file was a traceback."""
    run = tmp_path / "run"
    shutil.copytree(capped_run / "run", run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("repo_id: null", "repo_id: me/from-config")
                      .replace("revision: null", "revision: v2"))
    assert main(["push", str(run / "best"), "--preview", str(tmp_path / "p1")]) == 0
    assert "# from-config\n" in (tmp_path / "p1" / "README.md").read_text()  # the card of hub.repo_id's repo
    capsys.readouterr()
    assert main(["push", str(run), "--preview", str(run / "best")]) == 2
    assert "is the export's own directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["push", str(run), "--preview", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (run / "summary.json").unlink()
    assert main(["push", str(run), "--preview", str(tmp_path / "p2")]) == 2
    assert "has no summary.json: the run has not finished" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()
    bare = tmp_path / "bare"
    shutil.copytree(run / "best", bare)
    assert main(["push", str(bare), "--repo-id", "me/x", "--preview", str(tmp_path / "p3")]) == 0
    card = (tmp_path / "p3" / "README.md").read_text()
    assert "No test evaluation is published" in card and "read once" not in card


def test_card_lineage_of_an_older_export_with_a_relative_init_from(tmp_path, monkeypatch):
    """Exports before session 13 recorded init_from as typed: read from another directory,
    'mlm/best' was taken for a Hub model (base_model: mlm/best, 'MLM phase ran: no')."""
    from radtrain.model_card import lineage

    monkeypatch.chdir(tmp_path)
    origin = lineage({"init_from": "mlm/best", "base_model": "scratch:tiny"})
    assert origin["base_model"] == "scratch:tiny" and origin["mlm_ran"] is None
    origin = lineage({"init_from": "answerdotai/ModernBERT-base", "base_model": "answerdotai/ModernBERT-base"})
    assert origin["base_model"] == "answerdotai/ModernBERT-base" and origin["mlm_ran"] is False
