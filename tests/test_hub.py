"""Publishing best/ to the Hub, the model card, and inference with the export.

The Hub is unreachable here, so only the client boundary is replaced: ``RADTRAIN_HUB_RECORDER``
makes radtrain.hub use its RecordingApi (calls appended to a jsonl file, committed files copied
next to it), or a test passes/monkeypatches an API object. Everything else is real: a 2-process
``accelerate launch`` classifier run on the shared ROCO captions with a scratch tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO, TINY, subprocess_env, write_roco_slice

from radtrain import hub
from radtrain.cli import EXIT_PUSH_FAILED, main
from radtrain.model_card import EXAMPLE_CAPTIONS, model_index_metrics, read_front_matter

SENTINEL = "hf_SENTINELtokenDoNotLeak0123456789"
REPO_ID = "radtrain-test/roco-tiny"


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def http_error(status: int):
    """A real HfHubHTTPError with a response of the given status (what HfApi raises)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2 uses httpx
        import httpx
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A real 2-process classifier run with hub.repo_id set, publishing through the recorder,
    with HF_TOKEN set to a sentinel that must appear nowhere."""
    root = tmp_path_factory.mktemp("hub")
    data = write_roco_slice(root / "roco.jsonl", 300)
    run_dir, recorder = root / "run", root / "calls.jsonl"
    env = subprocess_env(
        RADTRAIN_HUB_RECORDER=str(recorder),
        HF_TOKEN=SENTINEL,
        HF_HOME=str(root / "hf"),
        RADTRAIN_CACHE=str(root / "cache"),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        PYTHON,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs/cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "radtrain",
        "classify",
        "--output-dir",
        str(run_dir),
        f"data.source={data}",
        *TINY,
        "train.epochs=2",
        f"hub.repo_id={REPO_ID}",
        "hub.revision=exp1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"run": run_dir, "recorder": recorder, "data": data, "proc": proc, "root": root}


@pytest.mark.slow
def test_two_process_run_publishes_once_from_main(published):
    run, calls = published["run"], records(published["recorder"])
    assert [c["call"] for c in calls] == ["create_repo", "create_branch", "create_commit"]
    assert {c["rank"] for c in calls} == {"0"} and len({c["pid"] for c in calls}) == 1
    create, branch, commit = calls
    assert create["repo_id"] == REPO_ID and create["private"] is True and create["exist_ok"] is True
    assert branch["branch"] == "exp1" and commit["revision"] == "exp1"

    best = run / "best"
    files = {f["path"]: f for f in commit["files"]}
    expected = {p.name for p in best.iterdir()} | {"README.md"}
    assert set(files) == expected
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "labels.json",
        "thresholds.json",
        "radtrain.json",
        "README.md",
    } <= expected
    for name, entry in files.items():
        if name not in ("README.md", "radtrain.json"):  # uploaded byte for byte from best/
            assert entry["sha256"] == hashlib.sha256((best / name).read_bytes()).hexdigest(), name
    # radtrain.json is published without local paths (they can name users); best/ keeps them.
    uploaded = json.loads((Path(f"{published['recorder']}.files") / "2" / "radtrain.json").read_text())
    local = json.loads((best / "radtrain.json").read_text())
    assert str(published["root"]) in local["data"]["source"]
    assert uploaded["data"]["source"] == f"local:{published['data'].name}"
    assert {k: v for k, v in uploaded.items() if k != "data"} == {k: v for k, v in local.items() if k != "data"}
    assert str(published["root"]) not in json.dumps(uploaded)
    config = json.loads((best / "config.json").read_text())
    cuis = [row["cui"] for row in json.loads((best / "labels.json").read_text())["labels"]]
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(len(cuis))] == cuis
    assert config["label2id"] == {c: i for i, c in enumerate(cuis)}

    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    for key in ("f1", "f1_macro", "f1_samples"):
        assert f"{key}={test[key]:.4f}" in commit["commit_message"]
    assert "test " in commit["commit_message"]
    assert "published best/ to" in published["proc"].stdout
    assert not (best / "README.md").exists()  # the card is committed, not written into best/


@pytest.mark.slow
def test_token_never_written_or_logged(published):
    proc = published["proc"]
    assert SENTINEL not in proc.stdout and SENTINEL not in proc.stderr
    roots = [published["run"], Path(f"{published['recorder']}.files")]
    checked = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                checked += 1
                assert SENTINEL.encode() not in path.read_bytes(), path
    assert checked > 10
    assert SENTINEL not in published["recorder"].read_text()


@pytest.mark.slow
def test_card_front_matter_and_metrics_match_summary(published):
    card = (Path(f"{published['recorder']}.files") / "2" / "README.md").read_text()
    front = read_front_matter(card)
    summary = json.loads((published["run"] / "summary.json").read_text())
    assert model_index_metrics(front) == {"validation": summary["validation"], "test": summary["test"]}
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    assert "base_model" not in front  # scratch model: no Hub base to link
    # Readable parts: split sizes, label space, config, limits, the working snippet.
    sizes = summary["split_sizes"]
    assert f"{sizes['train']} / {sizes['validation']} / {sizes['test']}" in card
    labels = json.loads((published["run"] / "best" / "labels.json").read_text())
    assert f"{len(labels['labels'])} CUIs: those seen at least {labels['min_label_count']} times" in card
    assert "Radiology MLM phase ran: no" in card
    assert "automatic concept extractor" in card and "Not for clinical decisions" in card
    assert (
        'pipeline("text-classification", model=repo, revision="exp1", top_k=None, '
        'function_to_apply="sigmoid")' in card
    )
    assert f"| F1 (micro) (`f1`) | {summary['validation']['f1']:.4f} | {summary['test']['f1']:.4f} |" in card
    # No caption of the data appears in the card; the examples are the fixed made-up ones.
    captions = [json.loads(line)["caption"] for line in published["data"].read_text().splitlines()]
    assert not [c for c in captions if c.strip() and c.strip() in card]
    assert all(text in card for text in EXAMPLE_CAPTIONS)
    assert not set(EXAMPLE_CAPTIONS) & set(captions)
    assert str(published["root"]) not in card  # local paths are shortened


@pytest.mark.slow
def test_card_usage_snippet_runs_on_the_export(published, monkeypatch, tmp_path, capsys):
    """Execute the card's own snippet against the local export (hf_hub_download -> local file),
    and check it agrees with `radtrain predict`, which reads the same thresholds.json."""
    import huggingface_hub

    export = tmp_path / "export"
    shutil.copytree(published["run"] / "best", export)
    card = (Path(f"{published['recorder']}.files") / "2" / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'repo = "radtrain-test/roco-tiny"' in snippet
    from radtrain.predict import Predictor

    text = "Axial CT of the abdomen showing a large hepatic cyst."
    assert text in snippet
    predictor = Predictor(export, device="cpu")
    probs = predictor.probabilities([text])[0]
    cuis = predictor.cuis
    rare, best = cuis[int(np.argmin(probs))], cuis[int(np.argmax(probs))]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: os.path.join(repo, name))
    code = snippet.replace('"radtrain-test/roco-tiny"', repr(str(export))).replace(', revision="exp1"', "")
    rules = [  # (thresholds.json, what the rule must predict)
        # global at the 80th percentile, plus the least probable CUI by its own threshold
        ({"global": float(np.quantile(probs, 0.8)), "per_label": {rare: 0.0}}, None),
        # nothing passes the global threshold, but top1 always emits the most probable CUI
        ({"global": 0.999, "per_label": None, "top1": True}, {best}),
    ]
    for thresholds, expected in rules:
        (export / "thresholds.json").write_text(json.dumps(thresholds))
        namespace: dict = {}
        exec(code, namespace)
        scores, predicted = namespace["scores"], {p["label"] for p in namespace["predicted"]}
        assert sorted(s["label"] for s in scores) == sorted(cuis)
        by_cui = {s["label"]: s["score"] for s in scores}
        assert all(0.0 <= v <= 1.0 for v in by_cui.values())
        assert np.allclose([by_cui[c] for c in cuis], probs, atol=1e-5)  # pipeline == radtrain's sigmoid
        if expected is None:
            assert 0 < len(predicted) < len(cuis) and rare in predicted
        else:
            assert predicted == expected
        capsys.readouterr()
        assert main(["predict", "--model", str(export), text]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {c["cui"] for c in line["cuis"]} == predicted  # radtrain predict applies the same rule
    # A text longer than training's max_length: the snippet truncates as radtrain predict does.
    long_text = " ".join([text] * 60)
    namespace = {}
    assert f'"{text}"' in code
    exec(code.replace(f'"{text}"', f'"{long_text}"'), namespace)
    by_cui = {s["label"]: s["score"] for s in namespace["scores"]}
    assert np.allclose([by_cui[c] for c in cuis], predictor.probabilities([long_text])[0], atol=1e-5)
    # A blank text: no CUI, as radtrain predict (top1 applies to captions only).
    namespace = {}
    exec(code.replace(f'"{text}"', '""'), namespace)
    assert namespace["predicted"] == []
    # Surrounding whitespace (a line read with its newline): stripped, as training and predict strip it.
    namespace = {}
    exec(code.replace(f'"{text}"', json.dumps(f"  {text}\n")), namespace)
    by_cui = {s["label"]: s["score"] for s in namespace["scores"]}
    assert np.allclose([by_cui[c] for c in cuis], probs, atol=1e-5)


@pytest.mark.slow
def test_push_offline_fails_clearly_and_changes_nothing(published):
    run = published["run"]
    before = tree_hashes(run)
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_TOKEN=SENTINEL, HF_HOME=str(published["root"] / "hf"))
    env.pop(hub.RECORDER_ENV, None)
    proc = subprocess.run(
        [PYTHON, "-m", "radtrain", "push", str(run)], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == EXIT_PUSH_FAILED, proc.stderr[-3000:]
    assert "HF_HUB_OFFLINE" in proc.stderr
    assert f"radtrain push {run} --repo-id {REPO_ID} --revision exp1" in proc.stderr  # from config.yaml
    assert "Traceback" not in proc.stderr and SENTINEL not in proc.stderr + proc.stdout
    assert tree_hashes(run) == before


def test_training_run_exits_3_when_push_fails(tmp_path, monkeypatch, capsys):
    """A Hub that keeps answering 503: retried with backoff, then exit 3; training results stay."""
    data = write_roco_slice(tmp_path / "roco.jsonl", 160, start=2000)
    run = tmp_path / "run"
    monkeypatch.setenv("RADTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "FIRST_DELAY_S", 0.0)
    seen: dict = {"calls": 0}

    class DownHub:
        def create_repo(self, repo_id, **kwargs):
            if seen["calls"] == 0:
                seen["before"] = tree_hashes(run)  # the run as it stood when publishing began
            seen["calls"] += 1
            raise http_error(503)

    monkeypatch.setattr(hub, "make_api", DownHub)
    code = main(
        [
            "classify",
            "--output-dir",
            str(run),
            f"data.source={data}",
            *TINY,
            "train.epochs=1",
            f"hub.repo_id={REPO_ID}",
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_PUSH_FAILED, err[-2000:]
    # Here the suite runs with HF_HUB_OFFLINE=1 (tests/run.sh) and no token: said at start, before training.
    assert "then fail to publish (exit 3" in err.split("epoch")[0]
    assert seen["calls"] == hub.MAX_TRIES
    assert "publishing failed" in err and f"still failing after {hub.MAX_TRIES} tries" in err
    assert f"radtrain push {run} --repo-id {REPO_ID}" in err
    assert tree_hashes(run) == seen["before"]
    assert (run / "summary.json").is_file() and (run / "best" / "model.safetensors").is_file()
    assert not (run / "best" / "README.md").exists()  # the card lives in the commit only


@pytest.mark.slow
def test_publish_retries_transient_errors_but_not_refused_tokens(published, tmp_path):
    class FlakyHub(hub.RecordingApi):
        def __init__(self, path, failures):
            super().__init__(path)
            self.failures = list(failures)

        def create_commit(self, *args, **kwargs):
            if self.failures:
                raise self.failures.pop(0)
            return super().create_commit(*args, **kwargs)

    flaky = FlakyHub(tmp_path / "flaky.jsonl", [http_error(502), ConnectionError("reset")])
    url = hub.publish(published["run"], REPO_ID, api=flaky, first_delay_s=0.0)
    assert url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")
    assert [c["call"] for c in records(tmp_path / "flaky.jsonl")] == ["create_repo", "create_commit"]

    refused = FlakyHub(tmp_path / "refused.jsonl", [http_error(401)] * 5)
    with pytest.raises(hub.PushError, match="HF_TOKEN") as info:
        hub.publish(published["run"], REPO_ID, api=refused, first_delay_s=0.0)
    assert len(refused.failures) == 4  # tried once: a refused token is not retried
    assert "Nothing local was changed" in str(info.value)


@pytest.mark.parametrize("repo_id", ["myorg/radiology model v1", "org/na..me", "-org/x", "org/x.git", "org/" + "a" * 97])
def test_a_repo_id_the_hub_refuses_is_refused_before_training(repo_id, tmp_path, capsys):
    """It used to pass the 'org/name' check, train the whole run, and fail at create_repo (exit 3)."""
    assert main(["classify", "--output-dir", str(tmp_path / "run"), "data.source=nowhere.jsonl", *TINY,
                 f"hub.repo_id={repo_id}"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    for revision in ("my branch", "a.lock/b", "HEAD", "x/"):
        assert main(["classify", "--output-dir", str(tmp_path / "run"), "data.source=nowhere.jsonl", *TINY,
                     f"hub.repo_id={REPO_ID}", f"hub.revision={revision}"]) == 2
        assert "not a valid git branch name" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "0"])
def test_a_bad_hub_timeout_is_refused_before_training(value, tmp_path, monkeypatch, capsys):
    data = write_roco_slice(tmp_path / "roco.jsonl", 60)
    monkeypatch.setenv(hub.TIMEOUT_ENV, value)
    assert main(["classify", "--output-dir", str(tmp_path / "run"), f"data.source={data}", *TINY,
                 f"hub.repo_id={REPO_ID}"]) == 2
    assert hub.TIMEOUT_ENV in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_hub_that_never_answers_times_out(published, monkeypatch):
    """huggingface_hub's client waits forever by default: a proxy that accepts the connection and
    never answers hung the push (and the end of a run) with nothing printed."""
    from huggingface_hub import constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel's backlog; nothing ever answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv(hub.TIMEOUT_ENV, "1.5")
    monkeypatch.delenv(hub.RECORDER_ENV, raising=False)
    try:
        with pytest.raises(hub.PushError, match="still failing after 2 tries") as info:
            hub.publish(published["run"], REPO_ID, tries=2, first_delay_s=0.0)
    finally:
        silent.close()
        monkeypatch.undo()
        hub.make_api()  # restore the default per-operation bound for later tests
    assert "Timeout" in str(info.value)


def test_offline_job_names_what_is_not_cached(tmp_path, monkeypatch, capsys):
    """With HF_HUB_OFFLINE=1 a job needing an uncached dataset fails at start, naming it and the fix;
    prefetch refuses to run offline and has nothing to fetch for local data."""
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "radtrain",
            "classify",
            "--output-dir",
            str(tmp_path / "run"),
            "data.source=radtrain-test/not-cached",
            "model.name=scratch:tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "radtrain-test/not-cached" in proc.stderr and "radtrain prefetch --data" in proc.stderr
    from huggingface_hub import constants

    data = write_roco_slice(tmp_path / "roco.jsonl", 10)
    # tests/run.sh runs the suite with HF_HUB_OFFLINE=1: prefetch is for where the Hub is reachable.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert main(["prefetch", "--data", str(data)]) == 0
    assert "local, nothing to fetch" in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["prefetch", "--model", "radtrain-test/m"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_prefetch_reads_a_job_file(tmp_path, monkeypatch, capsys):
    """`radtrain prefetch --config jobs/rocov2_large.yaml` failed with "unknown config key 'name'":
    it read only run configs, though a job file is what an offline pipeline needs prefetched."""
    from huggingface_hub import constants

    from radtrain.hub import prefetch_targets

    job = str(REPO / "jobs" / "rocov2_large.yaml")
    models, data, _ = prefetch_targets(job, [f"output_dir={tmp_path / 'p'}"])
    # The classifiers start from the pipeline's own MLM exports: nothing of theirs is on the Hub.
    assert set(models) == {"answerdotai/ModernBERT-large"}
    assert {d.source for d in data} == {"eltorio/ROCOv2-radiology"} and {d.label_column for d in data} == {"cui"}
    # Remote code is trusted for the downloads if any run trusts it (it came from the first member only).
    _, _, cfg = prefetch_targets(job, [f"output_dir={tmp_path / 'p'}", "classify.model.trust_remote_code=true"])
    assert cfg.model.trust_remote_code is True

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    demo = str(REPO / "jobs" / "demo.yaml")
    assert main(["prefetch", "--config", demo, f"output_dir={tmp_path / 'd'}"]) == 0
    out = capsys.readouterr().out
    assert "model scratch:tiny: local" in out and "local, nothing to fetch" in out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["prefetch", "--config", job]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
