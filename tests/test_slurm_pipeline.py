"""The SLURM pipeline on a real one-node SLURM (slurm/local/start.sh): `radtrain submit` with
submitit, and the plain sbatch scripts.

One demo-sized submitit pipeline runs once for the module (~3 min on 2 cores): an MLM array of 2
(seeds 1 and 2), a classifier array of 2 identical members ("twins": same settings, both from the
best MLM export, each 2 CPU ranks over gloo under DeepSpeed ZeRO-2), and the selection job with a
recording Hub client. While it runs, the fixture preempts twin 1 after its first checkpoint with
the signal submitit and SLURM use (USR2): it must save, requeue itself, resume, and end with
exactly twin 0's metrics. The tests then read what the jobs left: run directories, their
slurm_events.jsonl (start/end times per run of a job), logs, selection.json.

Skipped (with the reason) only when sinfo does not answer, and failed instead under
RADTRAIN_REQUIRE_SLURM=1 (tests/run.sh); every wait is bounded.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, subprocess_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

CMD_TIMEOUT_S = 60
PIPELINE_TIMEOUT_S = 480  # measured ~3.5 min on 2 busy cores (the requeue alone waits ~35-70 s)
PLAIN_TIMEOUT_S = 300
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

TWIN_OVERRIDES = [
    "classify.init_from=best",
    "classify.sweep=[{tracking.run_name: a}, {tracking.run_name: b}]",  # identical maths, two run dirs
    "classify.resources.tasks_per_node=2",
    "classify.accelerate_config=accelerate_configs/deepspeed_zero2_cpu.yaml",
    "classify.train.epochs=3",
    "classify.train.save_every_steps=2",
    "hub.repo_id=radtrain-ci/demo-selected",
]


def _run(args: list[str], timeout: float = CMD_TIMEOUT_S, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _jobs_state(job_ids: list[str]) -> list[dict[str, str]]:
    rows = []
    for job in job_ids:
        out = _run(["scontrol", "show", "job", "-o", job]).stdout
        rows += [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]
    return rows


def _cancel(job_ids: list[str]) -> None:
    for job in job_ids:
        _run(["scancel", job])


def _logs(root: Path, limit: int = 3000) -> str:
    parts = []
    for path in sorted(root.glob("logs/**/*_log.*")) + sorted(root.glob("logs/*.out")):
        text = path.read_text(errors="replace")
        parts.append(f"--- {path.relative_to(root)}\n{text[-limit:]}")
    return "\n".join(parts)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(predicate, timeout: float, what: str, job_ids: list[str], root: Path, poll_s: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        bad = [
            r
            for r in _jobs_state(job_ids)
            if r.get("JobState") in FAILED_STATES or r.get("Reason") == "DependencyNeverSatisfied"
        ]
        if bad:
            _cancel(job_ids)
            pytest.fail(
                f"while waiting for {what}: job(s) failed: "
                f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in bad]}\n{_logs(root)}"
            )
        time.sleep(poll_s)
    _cancel(job_ids)
    pytest.fail(
        f"timed out after {timeout}s waiting for {what}; squeue:\n"
        f"{_run(['squeue', '-o', '%i %j %T %r']).stdout}\n{_logs(root)}"
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm") / "pipe"
    recorder = root.parent / "hub" / "calls.jsonl"
    res = _run(
        [
            PYTHON,
            "-m",
            "radtrain",
            "submit",
            "jobs/demo.yaml",
            f"output_dir={root}",
            *TWIN_OVERRIDES,
            f"env.RADTRAIN_HUB_RECORDER={recorder}",
            f"env.RADTRAIN_CACHE={root.parent / 'cache'}",
        ],
        timeout=180,
        cwd=REPO,
        env=subprocess_env(),
    )
    assert res.returncode == 0, f"radtrain submit failed:\n{res.stdout}\n{res.stderr}"
    record = json.loads((root / "pipeline.json").read_text())
    steps = record["steps"]
    job_ids = [steps[s]["job_id"] for s in ("mlm", "classify", "select")]
    twin = steps["classify"]["members"][1]
    twin_dir = Path(twin["run_dir"])
    try:
        _wait(
            lambda: list(twin_dir.glob("checkpoints/step-*/COMPLETE")),
            PIPELINE_TIMEOUT_S,
            "the first checkpoint of classifier twin 1",
            job_ids,
            root,
            poll_s=0.2,
        )
        # What SLURM sends signal_delay_s before the time limit, and what a preemption sends.
        sig = _run(["scancel", "--signal=USR2", twin["job_id"]])
        assert sig.returncode == 0, sig.stderr
        signalled_at = time.time()
        _wait(
            lambda: (root / "selection.json").is_file(), PIPELINE_TIMEOUT_S, "selection.json", job_ids, root
        )
        _wait(
            lambda: all(r.get("JobState") == "COMPLETED" for r in _jobs_state(job_ids)),
            60,
            "every job to be COMPLETED",
            job_ids,
            root,
        )
    except BaseException:
        _cancel(job_ids)
        raise
    return {
        "root": root,
        "record": record,
        "recorder": recorder,
        "signalled_at": signalled_at,
        "stdout": res.stdout,
    }


def _member_dirs(pipeline: dict, step: str) -> list[Path]:
    return [Path(m["run_dir"]) for m in pipeline["record"]["steps"][step]["members"]]


def test_pipeline_runs_in_dependency_order(pipeline):
    root = pipeline["root"]
    assert "mlm      job " in pipeline["stdout"] and "afterok:" in pipeline["stdout"]
    mlm = [_events(d) for d in _member_dirs(pipeline, "mlm")]
    classify = [_events(d) for d in _member_dirs(pipeline, "classify")]
    select = _events(root / "select")
    for events in (*mlm, *classify, select):
        assert events and events[-1]["event"] == "end" and events[-1]["outcome"] == "completed", events
    mlm_ended = max(e[-1]["time"] for e in mlm)
    classify_started = min(e[0]["time"] for e in classify)
    classify_ended = max(e[-1]["time"] for e in classify)
    assert classify_started > mlm_ended, "a classifier member started before every MLM member had ended"
    assert select[0]["time"] > classify_ended, (
        "the selection started before every classifier member had ended"
    )
    # Each member in its own run dir with its own logs (one folder per array task, one file per rank).
    for step, ranks in (("mlm", 1), ("classify", 2)):
        info = pipeline["record"]["steps"][step]
        for member in info["members"]:
            logs = sorted(p.name for p in (root / "logs" / member["job_id"]).glob("*_log.out"))
            assert logs == [f"{member['job_id']}_{r}_log.out" for r in range(ranks)], logs
            assert (Path(member["run_dir"]) / "summary.json").is_file()


def test_preempted_member_resumes_and_matches_uninterrupted_twin(pipeline):
    twin0, twin1 = _member_dirs(pipeline, "classify")
    events = _events(twin1)
    assert [(e["event"], e.get("outcome"), e["restart"]) for e in events] == [
        ("start", None, 0),
        ("end", "requeued", 0),
        ("start", None, 1),
        ("end", "completed", 1),
    ], events
    assert events[0]["job_id"] == events[2]["job_id"], "a requeued member must keep its job id"
    assert events[1]["time"] >= pipeline["signalled_at"] - 1
    job = pipeline["record"]["steps"]["classify"]["members"][1]["job_id"]
    rank0_log = (pipeline["root"] / "logs" / job / f"{job}_0_log.err").read_text()
    resumed = re.findall(r"resumed from \S+/checkpoints/step-(\d+)", rank0_log)
    assert len(resumed) == 1 and int(resumed[0]) >= 2, rank0_log[-3000:]
    assert [e["restart"] for e in _events(twin0)] == [0, 0], "the twin must have run uninterrupted"

    a = json.loads((twin0 / "summary.json").read_text())
    b = json.loads((twin1 / "summary.json").read_text())
    assert a["global_steps"] == b["global_steps"] and a["best_step"] == b["best_step"]
    # Only the selection reads the test split, for the member it picks (twin 0: ties go to the first).
    assert a["test"] is not None and a.get("test_evaluated_by") == "selection" and b["test"] is None
    for split in ("validation",):
        for key, value in a[split].items():
            assert math.isclose(value, b[split][key], rel_tol=1e-6, abs_tol=1e-7), (
                split,
                key,
                value,
                b[split][key],
            )
    a_rows = [json.loads(x) for x in (twin0 / "metrics.jsonl").read_text().splitlines()]
    b_rows = [json.loads(x) for x in (twin1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]


def test_two_task_member_is_one_deepspeed_job(pipeline):
    for run_dir in _member_dirs(pipeline, "classify"):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train"]["processes"] == 2
        assert _events(run_dir)[0]["world_size"] == 2
        newest = sorted(run_dir.glob("checkpoints/step-*"))[-1]
        # The accelerate YAML named in the job file took effect in-process: a DeepSpeed checkpoint.
        assert (newest / "pytorch_model").is_dir() and (newest / "zero_to_fp32.py").is_file(), list(
            newest.iterdir()
        )
        assert {p.name for p in newest.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }
    for run_dir in _member_dirs(pipeline, "mlm"):
        assert json.loads((run_dir / "summary.json").read_text())["train"]["processes"] == 1


def test_selection_tests_the_best_member_once_and_publishes_it(pipeline):
    root = pipeline["root"]
    selection = json.loads((root / "selection.json").read_text())
    members = {
        d.name: json.loads((d / "summary.json").read_text()) for d in _member_dirs(pipeline, "classify")
    }
    scores = {name: s["validation"]["f1"] for name, s in members.items()}
    assert selection["metric"] == "f1" and selection["validation"] == pytest.approx(scores)
    best = max(scores.values())
    assert selection["member"] == next(n for n, v in scores.items() if v == best)  # ties: the first member
    # The one test evaluation of the pipeline (radtrain evaluate's code, by the selection job): the
    # members skipped the test split, and the chosen member's summary.json now carries the selection's
    # figures, which the published card and commit message show.
    assert all(s["test"] is None for name, s in members.items() if name != selection["member"])
    chosen = members[selection["member"]]
    assert chosen["test"] == selection["test"] and chosen["test_evaluated_by"] == "selection"
    assert set(selection["test"]) >= {"f1", "f1_macro", "f1_samples"}
    assert (root / "selected" / "config.json").is_file() and (root / "selected" / "labels.json").is_file()
    # Published by the selection job only (members have no hub.repo_id): one commit.
    calls = [json.loads(x) for x in pipeline["recorder"].read_text().splitlines()]
    commits = [c for c in calls if c["call"] == "create_commit"]
    assert len(commits) == 1 and commits[0]["repo_id"] == "radtrain-ci/demo-selected"
    assert f"test f1={selection['test']['f1']:.4f}" in commits[0]["commit_message"], commits[0]
    cards = list(Path(f"{pipeline['recorder']}.files").glob("*/README.md"))
    assert len(cards) == 1 and f"{selection['test']['f1']:.4f}" in cards[0].read_text()
    assert selection["repo_id"] == "radtrain-ci/demo-selected" and selection["published"]


def test_plain_sbatch_pipeline_script(tmp_path):
    """slurm/pipeline.sh: MLM then classifier (afterok), each srun + accelerate launch with 2 CPU
    processes over gloo, on the same cluster."""
    from radtrain.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", 300, 60, 60, seed=1)
    root = tmp_path / "plain"
    env = subprocess_env(
        SBATCH_ARGS="--partition=debug --gpus-per-node=0 --cpus-per-task=2 --time=10",
        ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml",
        PROCS_PER_NODE="2",
        MLM_ARGS="train.epochs=1",
        CLASSIFY_ARGS="train.epochs=2",
        RADTRAIN_CACHE=str(tmp_path / "cache"),
    )
    res = _run(
        [
            "bash",
            "slurm/pipeline.sh",
            str(root),
            f"data.source={data}",
            "model.name=scratch:tiny",
            "train.lr=1e-3",
            "train.batch_size=16",
            "data.max_length=64",
        ],
        cwd=REPO,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"job (\d+)", res.stdout)
    assert len(ids) == 2 and f"afterok:{ids[0]}" in res.stdout, res.stdout
    _wait(
        lambda: (root / "classify" / "summary.json").is_file(),
        PLAIN_TIMEOUT_S,
        "the plain classifier job",
        ids,
        root,
    )
    _wait(
        lambda: all(r.get("JobState") == "COMPLETED" for r in _jobs_state(ids)),
        60,
        "both jobs COMPLETED",
        ids,
        root,
    )
    mlm = json.loads((root / "mlm" / "summary.json").read_text())
    classify = json.loads((root / "classify" / "summary.json").read_text())
    assert mlm["train"]["processes"] == 2 and classify["train"]["processes"] == 2
    assert classify["test"] is not None
    config = (root / "classify" / "config.yaml").read_text()
    assert f"init_from: {root}/mlm/best" in config
    log = (root / "logs" / f"classify-{ids[1]}.out").read_text()
    assert "classify on 1 node(s) x 2 process(es)" in log


def test_plain_sbatch_pipeline_cancels_the_classifier_when_mlm_fails(tmp_path):
    """An MLM job that fails (here: a bad setting, exit 2) left the classifier pending forever as
    DependencyNeverSatisfied; --kill-on-invalid-dep cancels it."""
    env = subprocess_env(SBATCH_ARGS="--partition=debug --gpus-per-node=0 --cpus-per-task=1 --time=5",
                         PROCS_PER_NODE="1", MLM_ARGS="train.lr=-1", RADTRAIN_CACHE=str(tmp_path / "cache"))
    root = tmp_path / "plain"
    res = _run(["bash", "slurm/pipeline.sh", str(root), "data.source=/nowhere.jsonl", "model.name=scratch:tiny"],
               cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"job (\d+)", res.stdout)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = {r.get("JobId"): (r.get("JobState"), r.get("Reason")) for r in _jobs_state(ids)}
        if states.get(ids[1], ("",))[0] == "CANCELLED":
            break
        time.sleep(0.5)
    else:
        _cancel(ids)
        pytest.fail(f"the classifier was not cancelled after the MLM job failed: {states}\n{_logs(root)}")
    assert states[ids[0]][0] == "FAILED"


def _submit_plain_mlm(tmp_path, n_train: int, epochs: int, batch_size: int, extra: list[str] = ()):
    """sbatch slurm/mlm.sbatch on synthetic captions (1 CPU rank); returns (run dir, log, job id)."""
    from radtrain.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", n_train, 40, 40, seed=1)
    out_dir = tmp_path / "mlm"
    log = tmp_path / "mlm.out"
    env = subprocess_env(PROCS_PER_NODE="1", RADTRAIN_CACHE=str(tmp_path / "cache"))
    res = _run(
        [
            "sbatch", "--parsable", "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", f"--output={log}", "slurm/mlm.sbatch", "--output-dir", str(out_dir),
            f"data.source={data}", "model.name=scratch:tiny", f"train.epochs={epochs}",
            f"train.batch_size={batch_size}", "data.max_length=64", *extra,
        ],
        cwd=REPO,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    return out_dir, log, res.stdout.strip().split(";")[0]


def test_plain_sbatch_requeues_only_after_exit_75(tmp_path):
    """slurm/mlm.sbatch gets USR2 before the training loop has its handler (the processes ignore it
    then): training runs to the end and exits 0, so the script must NOT requeue the job (it used to
    requeue whenever a stop had been requested, whatever the exit code)."""
    out_dir, log, job = _submit_plain_mlm(tmp_path, n_train=200, epochs=1, batch_size=16)
    # The script's start line comes right after its USR2 trap is set (and before srun starts the
    # training processes, which import for seconds before the training loop installs its handler).
    _wait(
        lambda: log.is_file() and f"job {job} restart 0" in log.read_text(),
        120,
        "the batch script to start",
        [job],
        tmp_path,
        poll_s=0.05,
    )
    sig = _run(["scancel", "--signal=USR2", "--batch", job])
    assert sig.returncode == 0, sig.stderr
    _wait(
        lambda: all(r.get("JobState") == "COMPLETED" for r in _jobs_state([job])),
        PLAIN_TIMEOUT_S,
        "the signalled job to complete",
        [job],
        tmp_path,
    )
    (row,) = _jobs_state([job])
    text = log.read_text()
    assert row.get("Restarts") == "0", (row, text[-3000:])
    assert "USR2: asking every training process" in text and "not requeueing" in text, text[-3000:]
    assert "requeueing job" not in text, text[-3000:]
    assert (out_dir / "summary.json").is_file()


def test_plain_sbatch_requeues_and_resumes_after_exit_75(tmp_path):
    """The other side: USR2 inside the training loop -> checkpoint, exit 75 (seen through accelerate
    launch by radtrain.cluster.run_rank's marker) -> the script requeues -> the rerun resumes."""
    out_dir, log, job = _submit_plain_mlm(
        tmp_path, n_train=300, epochs=3, batch_size=8, extra=["train.save_every_steps=2"]
    )
    _wait(
        lambda: list(out_dir.glob("checkpoints/step-*/COMPLETE")),
        PLAIN_TIMEOUT_S,
        "a checkpoint",
        [job],
        tmp_path,
    )
    sig = _run(["scancel", "--signal=USR2", "--batch", job])
    assert sig.returncode == 0, sig.stderr
    _wait(
        lambda: (
            (out_dir / "summary.json").is_file()
            and all(r.get("JobState") == "COMPLETED" for r in _jobs_state([job]))
        ),
        PLAIN_TIMEOUT_S,
        "the requeued job to complete",
        [job],
        tmp_path,
    )
    (row,) = _jobs_state([job])
    text = log.read_text()
    assert row.get("Restarts") == "1", (row, text[-3000:])
    assert f"requeueing job {job}" in text and "resumed from" in text, text[-3000:]


def test_scancel_of_a_submitit_member_stays_cancelled(tmp_path):
    """scancel sends SIGTERM: the member saves a checkpoint and ends, recorded as stopped. It used
    to requeue itself (as after USR2) and train to the end for a pipeline already cancelled.
    While it runs, a second submit into the same root is refused (both trained the same run
    directories at once, and the second record replaced the first)."""
    root = tmp_path / "pipe"
    command = [PYTHON, "-m", "radtrain", "submit", "jobs/demo.yaml", f"output_dir={root}", "mlm=null",
               "classify.init_from=null", "select=null", "classify.train.epochs=100",
               "classify.train.save_every_steps=2", f"env.RADTRAIN_CACHE={tmp_path / 'cache'}"]
    res = _run(command, timeout=180, cwd=REPO, env=subprocess_env())
    assert res.returncode == 0, f"radtrain submit failed:\n{res.stdout}\n{res.stderr}"
    member = json.loads((root / "pipeline.json").read_text())["steps"]["classify"]["members"][0]
    job, run_dir = member["job_id"], Path(member["run_dir"])
    try:
        again = _run(command, timeout=180, cwd=REPO, env=subprocess_env())
        assert again.returncode == 2 and "still queued or running" in again.stderr, again.stderr
        assert f"scancel {job}" in again.stderr
        assert json.loads((root / "pipeline.json").read_text())["steps"]["classify"]["job_id"] == job
        _wait(lambda: list(run_dir.glob("checkpoints/step-*/COMPLETE")), PLAIN_TIMEOUT_S, "a checkpoint", [job], root)
        assert _run(["scancel", job]).returncode == 0
        _wait(lambda: any(e.get("event") == "end" for e in _events(run_dir)) or None, 120, "the member's end",
              [], root)
        time.sleep(5)  # a requeue (the bug) shows as PENDING with Restarts=1 within a second or two
        states = _jobs_state([job])
        assert [r.get("JobState") for r in states] == ["CANCELLED"] and states[0].get("Restarts") == "0", (
            states, _logs(root))
        events = _events(run_dir)
        assert [(e["event"], e.get("outcome")) for e in events] == [("start", None), ("end", "stopped")], events
        assert "not requeued" in _logs(root)
    finally:
        _cancel([job])


def test_a_recorded_job_id_now_held_by_another_job_does_not_block_a_submit(tmp_path):
    """SLURM reuses job ids (a wrap, a reset state, a root copied from another cluster): a
    pipeline.json naming an id that is now someone else's job must not refuse the submit and
    tell the user to scancel that job."""
    other = _run(["sbatch", "--parsable", "-J", "unrelated", "-o", str(tmp_path / "o.out"), "--wrap", "sleep 60"])
    assert other.returncode == 0, other.stderr
    job = other.stdout.strip().split(";")[0]
    try:
        root = tmp_path / "pipe"
        root.mkdir()
        (root / "pipeline.json").write_text(json.dumps({"steps": {"mlm": {"job_id": job}}}))
        res = _run([PYTHON, "-m", "radtrain", "submit", "jobs/demo.yaml", "--dry-run", f"output_dir={root}"],
                   timeout=180, cwd=REPO, env=subprocess_env())
        assert res.returncode == 0, res.stderr
    finally:
        _cancel([job])
