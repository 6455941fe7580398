"""`radtrain submit`: the job file -> members, sbatch scripts and dependency graph (no SLURM needed).

The sbatch text is what submitit will submit (rendered by submitit's own function); it is compared
with reviewed files in tests/expected/ after replacing the pipeline root and the Python path.
Regenerate them after an intended change with RADTRAIN_UPDATE_EXPECTED=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, subprocess_env

from radtrain.cli import main
from radtrain.cluster.jobfile import load_job

EXPECTED = REPO / "tests" / "expected"


def _submit(capsys, *args: str) -> tuple[int, str, str]:
    old = os.getcwd()
    os.chdir(REPO)  # job files name repo-relative paths (accelerate configs), as a user would run it
    try:
        rc = main(["submit", *args])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _scripts(text: str) -> dict[str, str]:
    parts = re.split(r"^----- sbatch script: (\w+) -----$", text, flags=re.M)
    scripts = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        scripts[name] = body.split("(dry run: nothing submitted)")[0].strip() + "\n"
    return scripts


def _normalise(text: str, root: Path) -> str:
    return text.replace(str(root), "<ROOT>").replace(sys.executable, "<PYTHON>")


def _check_expected(name: str, text: str) -> None:
    path = EXPECTED / name
    if os.environ.get("RADTRAIN_UPDATE_EXPECTED") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing (RADTRAIN_UPDATE_EXPECTED=1 writes it)"
    assert text == path.read_text(), f"sbatch text differs from {path}:\n{text}"


def test_demo_sbatch_scripts_match_expected(tmp_path, capsys):
    root = tmp_path / "pipe"
    rc, out, _ = _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}")
    assert rc == 0
    scripts = _scripts(out)
    assert sorted(scripts) == ["classify", "mlm", "select"]
    for name, text in scripts.items():
        _check_expected(f"demo_{name}.sbatch", _normalise(text, root))
    # The parts that matter, spelled out (the expected files pin the rest).
    mlm, classify, select = scripts["mlm"], scripts["classify"], scripts["select"]
    assert "#SBATCH --array=0-1%2" in mlm and "--dependency" not in mlm
    assert "#SBATCH --dependency='afterok:<mlm job id>'" in classify and "#SBATCH --array=0-1%2" in classify
    assert "#SBATCH --dependency='afterok:<classify job id>'" in select and "--array" not in select
    for text in scripts.values():
        assert "#SBATCH --signal=USR2@60" in text
        assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
        # A failed dependency cancels the job instead of leaving it pending forever.
        assert "#SBATCH --kill-on-invalid-dep=yes" in text
    # Members never share a log file: one folder per array task, one file per rank.
    assert f"--output={root}/logs/%A_%a/%A_%a_0_log.out" in mlm
    assert f"--output {root}/logs/%A_%a/%A_%a_%t_log.out" in mlm
    assert not (root / "data").exists(), "a dry run must not write anything"


def test_large_job_asks_for_nodes_gpus_and_time(tmp_path, capsys):
    root = tmp_path / "large"
    rc, out, _ = _submit(capsys, "jobs/rocov2_large.yaml", "--dry-run", f"output_dir={root}")
    assert rc == 0
    scripts = _scripts(out)
    for name, text in scripts.items():
        _check_expected(f"rocov2_large_{name}.sbatch", _normalise(text, root))
    mlm = scripts["mlm"]
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=720",
        "--signal=USR2@300",
        "--array=0-1%2",
        "--partition=gpu",
    ):
        assert f"#SBATCH {line}" in mlm
    assert "#SBATCH --array=0-3%4" in scripts["classify"]  # 2 lr x 2 seeds
    assert (
        "#SBATCH --gpus-per-node=1" in scripts["select"]
        and "#SBATCH --ntasks-per-node=1" in scripts["select"]
    )
    # The DeepSpeed config reaches every training rank as accelerate launch's variables.
    assert "ACCELERATE_USE_DEEPSPEED=true" in out
    ds = re.search(r"ACCELERATE_DEEPSPEED_CONFIG_FILE=(\S+)", out).group(1)
    assert (
        Path(ds).is_absolute()
        and Path(ds).is_file()
        and json.loads(Path(ds).read_text())["zero_optimization"]["stage"] == 3
    )
    assert "HF_HUB_OFFLINE=1" in out


def test_members_run_dirs_and_init_from(tmp_path, capsys):
    root = tmp_path / "p"
    rc, out, _ = _submit(
        capsys,
        "jobs/demo.yaml",
        "--dry-run",
        f"output_dir={root}",
        "mlm.sweep.train.seed=[1,2,3]",
        "mlm.sweep.train.lr=[1e-3,3e-3]",
    )
    assert rc == 0
    assert "mlm      job <mlm job id> (array 0-5)" in out
    assert "[5] m5_seed3_lr0.003: train.seed=3 train.lr=0.003" in out
    # init_from: own -> classifier member i from MLM member i.
    assert f"[5] m5_seed3_lr0.003: (no sweep) init_from={root}/mlm/m5_seed3_lr0.003/best" in out
    assert f"run dir {root}/classify/m5_seed3_lr0.003" in out

    rc, out, _ = _submit(
        capsys,
        "jobs/demo.yaml",
        "--dry-run",
        f"output_dir={root}",
        "classify.init_from=best",
        "classify.sweep.train.lr=[1e-3,2e-3,3e-3]",
        "select=null",
    )
    assert rc == 0
    assert "classify job <classify job id> (array 0-2, afterok:<mlm job id>)" in out
    assert out.count("init_from=best MLM member by validation loss") == 3
    assert "select" not in _scripts(out)


def test_a_shared_override_reaches_every_step_that_sets_the_key_itself(tmp_path):
    """`train.epochs=1` on the command line is for both phases: it replaced the shared value only,
    and each phase's own `train: {epochs: ...}` kept its value without a word."""
    job = REPO / "jobs" / "rocov2_large.yaml"
    pipeline = load_job(job, [f"output_dir={tmp_path}", "train.epochs=1", "cluster.time_min=30"])
    steps = {step.name: step for step in pipeline.steps}
    assert {m.config.train.epochs for s in ("mlm", "classify") for m in steps[s].members} == {1}
    assert {step.resources.time_min for step in pipeline.steps} == {30}
    # The sweeps still vary what they vary.
    assert sorted({m.config.train.lr for m in steps["classify"].members}) == [3.0e-5, 5.0e-5]

    # A step's own key on the command line is more specific and wins.
    pipeline = load_job(job, [f"output_dir={tmp_path}", "train.epochs=1", "classify.train.epochs=2"])
    epochs = {step.name: {m.config.train.epochs for m in step.members} for step in pipeline.steps[:2]}
    assert epochs == {"mlm": {1}, "classify": {2}}

    demo = load_job(REPO / "jobs" / "demo.yaml", [f"output_dir={tmp_path}", "train.lr=1e-4"])
    assert {m.config.train.lr for step in demo.steps[:2] for m in step.members} == {1e-4}
    assert demo.replaced == ["train.lr=1e-4 replaces classify.train.lr=0.003 of the job file"]

    # A step's own resources on the command line, in any order, and a mapping-valued override
    # (it sets its keys: the file's other train settings stay, batch_size 32 among them).
    pipeline = load_job(job, [
        f"output_dir={tmp_path}", "classify.resources={time_min: 120}", "cluster.time_min=30",
        "train={epochs: 1}", "classify.train={epochs: 2}",
    ])
    steps = {step.name: step for step in pipeline.steps}
    assert {name: step.resources.time_min for name, step in steps.items()} == {"mlm": 30, "classify": 120, "select": 30}
    assert {m.config.train.epochs for m in steps["mlm"].members} == {1}
    assert {m.config.train.epochs for m in steps["classify"].members} == {2}
    assert {m.config.train.batch_size for s in ("mlm", "classify") for m in steps[s].members} == {32}


def test_job_file_env_and_sbatch_options_merge_key_by_key(tmp_path):
    """A step's sbatch `additional` options used to replace the cluster's whole mapping, and the
    accelerate config's variables beat the job file's own env."""
    job = REPO / "jobs" / "rocov2_large.yaml"
    pipeline = load_job(job, [
        f"output_dir={tmp_path}", "cluster.additional.exclude=node12", "classify.resources.additional.mail-type=END",
        "env.ACCELERATE_USE_DEEPSPEED=false",
    ])
    steps = {step.name: step for step in pipeline.steps}
    assert steps["classify"].resources.additional == {"exclude": "node12", "mail-type": "END"}
    assert steps["mlm"].resources.additional == {"exclude": "node12"}
    assert {step.env["ACCELERATE_USE_DEEPSPEED"] for step in pipeline.steps[:2]} == {"false"}


def test_a_shared_override_of_a_swept_key_is_refused(tmp_path, capsys):
    rc, _, err = _submit(capsys, "jobs/rocov2_large.yaml", "--dry-run", f"output_dir={tmp_path}", "train.lr=1e-4")
    assert rc == 2
    # Both sweeps named at once: following a hint that named only the first met the second.
    assert "the mlm and classify sweeps vary train.lr" in err
    assert "give mlm.sweep.train.lr=[1e-4] classify.sweep.train.lr=[1e-4] instead of train.lr=1e-4" in err


def test_job_file_mistakes_fail_before_anything_is_queued(tmp_path, capsys):
    rc, _, err = _submit(
        capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={tmp_path}", "mlm.sweep.train.lrr=[1]"
    )
    assert rc == 2 and "train.lrr" in err
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "classfy.train.lr=1")
    assert rc == 2 and "classfy" in err
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "mlm=null")
    assert rc == 2 and "classify.init_from=own needs an mlm section" in err
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "classify.resources.tasks_per_node=0")
    assert rc == 2 and "tasks_per_node" in err
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "mlm.accelerate_config=nope.yaml")
    assert rc == 2 and "nope.yaml does not exist" in err
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "classify.init_from=bset")
    assert rc == 2 and "classify.init_from='bset'" in err
    rc, _, err = _submit(capsys, "jobs/missing.yaml", "--dry-run")
    assert rc == 2 and "does not exist" in err


def test_classifier_only_job_from_an_existing_export(tmp_path, capsys):
    export = tmp_path / "mlm_best"
    export.mkdir()
    rc, out, _ = _submit(
        capsys,
        "jobs/demo.yaml",
        "--dry-run",
        f"output_dir={tmp_path / 'p'}",
        "mlm=null",
        f"classify.init_from={export}",
        "classify.sweep.train.seed=[1,2]",
    )
    assert rc == 0, out
    scripts = _scripts(out)
    assert sorted(scripts) == ["classify", "select"]
    assert "--dependency" not in scripts["classify"]
    assert out.count(f"init_from={export}") == 2


@pytest.mark.slow
def test_accelerate_env_is_what_accelerate_launch_sets(tmp_path):
    """The variables a submitit rank gets from an accelerate YAML equal those `accelerate launch`
    itself gives its processes (DeepSpeed ZeRO-3 on 2 CPU processes, launched for real)."""
    from radtrain.cluster import accelerate_env

    config = "accelerate_configs/deepspeed_zero3_cpu.yaml"
    dump = tmp_path / "env.py"
    dump.write_text(
        "import json, os, sys\n"
        "rank = os.environ['RANK']\n"
        "keys = {k: v for k, v in os.environ.items() if k.startswith(('ACCELERATE_', 'FSDP_'))}\n"
        "open(sys.argv[1] + '.' + rank, 'w').write(json.dumps(keys))\n"
    )
    out = tmp_path / "launched"
    res = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--config_file", config, str(dump), str(out)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    launched = json.loads(Path(f"{out}.0").read_text())
    assert json.loads(Path(f"{out}.1").read_text()) == launched

    old = os.getcwd()
    os.chdir(REPO)
    try:
        ours = accelerate_env(config)
    finally:
        os.chdir(old)
    # accelerate launch passes the JSON path as written (relative to the launch directory).
    launched["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(
        (REPO / launched["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).resolve()
    )
    assert ours == launched
    assert ours["ACCELERATE_USE_DEEPSPEED"] == "true" and ours["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"


def test_requeue_cap_is_the_job_files_max_requeues(monkeypatch):
    """submitit's signal handler asks checkpoint() how to rerun a member: itself (it resumes from its
    run dir) until SLURM_RESTART_COUNT reaches max_requeues, then None (no requeue: the job fails)."""
    from submitit.core.utils import DelayedSubmission

    from radtrain.cluster import MemberJob

    job = MemberJob("mlm", "m0", {"output_dir": "x"}, {}, max_requeues=2)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    again = job.checkpoint()
    assert isinstance(again, DelayedSubmission) and again.function is job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job.checkpoint() is not None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


def test_plain_sbatch_scripts_share_one_launch_block():
    """slurm/mlm.sbatch and slurm/classify.sbatch differ only in their header and PHASE (each must be
    self-contained: sbatch copies the script to the node's spool directory)."""
    marker = "# ---- identical in mlm.sbatch and classify.sbatch from here on ----"
    texts = {name: (REPO / "slurm" / f"{name}.sbatch").read_text() for name in ("mlm", "classify")}
    assert texts["mlm"].split(marker)[1] == texts["classify"].split(marker)[1]
    for name, text in texts.items():
        assert f"PHASE={name}\n" in text
        for directive in ("--signal=B:USR2@", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
            assert f"#SBATCH {directive}" in text, (name, directive)
        assert '--machine_rank "$SLURM_NODEID"' in text and "scontrol show hostnames" in text
    for script in ("mlm.sbatch", "classify.sbatch", "pipeline.sh"):
        res = subprocess.run(
            ["bash", "-n", str(REPO / "slurm" / script)], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0, res.stderr


def test_select_metric_is_checked_at_submit_time(capsys):
    """A typo in select.metric fails on the login node, naming the valid metrics, not in the
    selection job after every member has trained."""
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", "select.metric=f1_micro")
    assert rc == 2 and "select.metric='f1_micro'" in err and "f1_macro" in err and "loss" in err
    rc, out, _ = _submit(capsys, "jobs/demo.yaml", "--dry-run", "select.metric=hamming_loss")
    assert rc == 0, out


def test_submitit_ranks_follow_the_one_slurm_rule(monkeypatch):
    """A submitit member's ranks come from radtrain.distributed (the srun path's rules): SLURM's
    task variables win over inherited ranks, and MASTER_PORT is slurm_master_port()."""
    from radtrain.cluster.jobs import _prepare_process
    from radtrain.distributed import slurm_master_port

    # setenv then delenv: monkeypatch then restores every variable _prepare_process writes (a stray
    # LOCAL_RANK would make later tests and their subprocesses try to start torch.distributed).
    for key in (
        "MASTER_PORT",
        "MASTER_ADDR",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_CPUS_PER_TASK",
    ):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NPROCS": "2",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_STEP_NODELIST": "localhost",
        "RANK": "7",  # inherited from a parent job: must be replaced
        "WORLD_SIZE": "9",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    _prepare_process({})
    assert os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "2" and os.environ["LOCAL_RANK"] == "1"
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"] == "localhost"
    assert os.environ["MASTER_PORT"] == str(slurm_master_port()) == str(20000 + 4242 * 7 % 20000)


def test_slurm_tests_fail_instead_of_skipping_when_slurm_is_required(tmp_path):
    """tests/run.sh sets RADTRAIN_REQUIRE_SLURM=1: a SLURM that does not answer must fail the slurm
    tests (a green CI run with no SLURM coverage otherwise); without it they skip."""
    assert (
        "export RADTRAIN_REQUIRE_SLURM=${RADTRAIN_REQUIRE_SLURM:-1}"
        in (REPO / "tests" / "run.sh").read_text()
    )
    test = "tests/test_local_slurm.py::test_scontrol_requeue_reruns_job_with_same_id"
    results = {}
    for required in ("1", "0"):
        # No SLURM client on PATH (the interpreter is called by its full path).
        env = subprocess_env(PATH=str(tmp_path), RADTRAIN_REQUIRE_SLURM=required)
        res = subprocess.run(
            [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        results[required] = res
    assert results["1"].returncode != 0 and "sinfo not found" in results["1"].stdout, results["1"].stdout
    assert "1 error" in results["1"].stdout, results["1"].stdout
    assert results["0"].returncode == 0 and "1 skipped" in results["0"].stdout, results["0"].stdout


def test_members_leave_the_test_split_to_the_selection(tmp_path, roco_path, monkeypatch):
    """With a selection step the members skip the test split (run_phase(evaluate_test=False)); the
    selection job evaluates the chosen member once and writes those metrics into its summary.json,
    which the published model card and commit message read."""
    from conftest import TINY, write_roco_slice

    from radtrain.cluster import SelectJob, load_job
    from radtrain.cluster.submit import _callables
    from radtrain.config import load_config
    from radtrain.phase import run_phase

    pipeline = load_job(REPO / "jobs" / "demo.yaml", [f"output_dir={tmp_path / 'p'}"])
    members = [c for step in pipeline.steps if step.name != "select" for c in _callables(pipeline, step)]
    assert members and not any(m.evaluate_test for m in members)
    pipeline = load_job(REPO / "jobs" / "demo.yaml", [f"output_dir={tmp_path / 'q'}", "select=null"])
    assert all(m.evaluate_test for step in pipeline.steps for m in _callables(pipeline, step))

    data = write_roco_slice(tmp_path / "roco.jsonl", 300)
    monkeypatch.setenv("RADTRAIN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "root" / "classify" / "m0"
    cfg = load_config(
        None,
        [*TINY, f"data.source={data}", "train.epochs=1", "data.max_length=64", "data.min_label_count=3"],
    )
    cfg.output_dir = str(run_dir)
    summary = run_phase(cfg, "classify", evaluate_test=False)
    assert summary["test"] is None
    assert json.loads((run_dir / "summary.json").read_text())["test"] is None

    recorder = tmp_path / "hub" / "calls.jsonl"
    monkeypatch.setenv("RADTRAIN_HUB_RECORDER", str(recorder))
    result = SelectJob(str(tmp_path / "root"), [str(run_dir)], "f1", {"repo_id": "org/sel"}, {}, 0)()
    test = result["test"]
    assert test and set(test) >= {"f1", "f1_macro"}
    assert json.loads((run_dir / "summary.json").read_text())["test"] == test
    commit = [json.loads(x) for x in recorder.read_text().splitlines() if '"create_commit"' in x]
    assert len(commit) == 1 and f"test f1={test['f1']:.4f}" in commit[0]["commit_message"], commit
    cards = list(Path(f"{recorder}.files").glob("*/README.md"))
    assert len(cards) == 1, cards
    card = cards[0].read_text()
    assert f"{test['f1']:.4f}" in card


def test_resubmitting_a_best_mode_pipeline_continues_its_classifiers(tmp_path, capsys):
    """classify.init_from=best (jobs/rocov2_large.yaml) plans members without init_from and picks
    the MLM member when each starts; a resubmission compared that plan with the started member's
    saved init_from and refused it ("other settings"), so a member past max_requeues could never
    be continued. The dry run said yes to the same command."""
    import dataclasses

    root = tmp_path / "p"
    overrides = [f"output_dir={root}", "classify.init_from=best"]
    member = next(s for s in load_job(REPO / "jobs" / "demo.yaml", overrides).steps if s.name == "classify").members[0]
    parent = member.init_from_best[1]
    started = dataclasses.replace(member.config, model=dataclasses.replace(member.config.model, init_from=str(parent / "best")))
    (member.run_dir / "checkpoints").mkdir(parents=True)
    (member.run_dir / "config.yaml").write_text(started.to_yaml())
    (member.run_dir / "summary.json").write_text("{}")

    from radtrain.cluster.submit import _check_existing_runs

    _check_existing_runs(load_job(REPO / "jobs" / "demo.yaml", overrides))  # what submit checks: raised
    rc, out, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", *overrides)
    assert rc == 0, err
    # Another choice is still refused, now at the dry run too.
    other = dataclasses.replace(started, train=dataclasses.replace(started.train, lr=0.5))
    (member.run_dir / "config.yaml").write_text(other.to_yaml())
    rc, out, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", *overrides)
    assert rc == 2 and "other settings" in err and "train.lr" in err


def test_other_synthetic_data_settings_for_an_existing_root_are_refused(tmp_path, capsys):
    """synthetic_data.n_train=100 for a root whose data was written with 400 was ignored without a
    word: the members resumed on the old data."""
    from radtrain.data.synthetic import write_dataset

    root = tmp_path / "p"
    write_dataset(root / "data", n_train=400, n_validation=80, n_test=80, seed=0)  # jobs/demo.yaml's
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}")
    assert rc == 0, err
    # Data written before the settings were recorded: the split sizes are compared.
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}", "synthetic_data.n_train=100")
    assert rc == 2 and "n_train: 400 -> 100" in err and "Use a new output_dir" in err
    # Recorded settings (what submit writes with the data): the seed too.
    record = {"n_train": 400, "n_validation": 80, "n_test": 80, "seed": 0}
    (root / "data" / "synthetic.json").write_text(json.dumps(record))
    rc, _, err = _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}", "synthetic_data.seed=5")
    assert rc == 2 and "seed: 0 -> 5" in err
    # A record without a setting (one write_dataset gained later) compares what it holds; a torn
    # record falls back to the split sizes instead of a JSONDecodeError traceback.
    (root / "data" / "synthetic.json").write_text(json.dumps({"n_train": 400}))
    assert _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}")[0] == 0
    (root / "data" / "synthetic.json").write_text('{"n_train": 4')
    assert _submit(capsys, "jobs/demo.yaml", "--dry-run", f"output_dir={root}")[0] == 0
