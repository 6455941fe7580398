"""Tests against a real one-node SLURM cluster (see slurm/local/README.md).

CI runs ``slurm/local/start.sh`` before pytest; these tests never start or reconfigure the
cluster themselves. They are skipped only when there is no SLURM to talk to (``sinfo`` missing
or not answering), and fail instead under RADTRAIN_REQUIRE_SLURM=1 (tests/run.sh, CI). A cluster that answers but cannot run jobs makes them fail, within the
per-test time bounds below, instead of hanging.

Jobs run on this same machine, so the batch scripts write straight into ``tmp_path``.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# Bound for a single client command (sbatch without --wait, scontrol, squeue, scancel).
CMD_TIMEOUT_S = 30
# Bound for an `sbatch --wait` job that should finish in a few seconds on an idle node.
WAIT_JOB_TIMEOUT_S = 120
# A requeued job is held for the credential lifetime + 1 s before it may start again
# (30 s with start.sh's AuthInfo=cred_expire=30, 120 s on a default SLURM), then waits for
# the next scheduler pass; 150 s covers a default-configured cluster too.
REQUEUE_RESTART_TIMEOUT_S = 150
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _run(
    args: list[str], timeout: float = CMD_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def _job_name() -> str:
    # Unique, so a timed-out test can cancel exactly its own job by name.
    return f"radtrain-test-{uuid.uuid4().hex[:10]}"


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def _cancel(name: str) -> None:
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=CMD_TIMEOUT_S, check=False)


def _sbatch_wait(script: Path, *opts: str, timeout: float = WAIT_JOB_TIMEOUT_S) -> str:
    """Submit with ``--wait`` and return the job id; cancel and fail if it outlives ``timeout``."""
    name = _job_name()
    args = [
        "sbatch",
        "--parsable",
        "--wait",
        f"--job-name={name}",
        # SLURM's own limit (minutes) as a second line of defence behind the client timeout.
        "--time=2",
        f"--chdir={script.parent}",
        f"--output={script.parent}/slurm-%j.out",
        *opts,
        str(script),
    ]
    try:
        res = _run(args, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        _cancel(name)
        pytest.fail(f"job {name} did not finish within {timeout}s (cancelled); squeue:\n{_squeue()}")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(script.parent.glob("slurm-*.out")))
    assert res.returncode == 0, (
        f"sbatch --wait rc={res.returncode}\nstdout={res.stdout}\nstderr={res.stderr}\n{logs}"
    )
    return res.stdout.strip().splitlines()[0].split(";")[0]


def _squeue() -> str:
    try:
        return _run(["squeue", "-o", "%i %j %T %r"], check=False).stdout
    except subprocess.TimeoutExpired:
        return "(squeue timed out)"


def _job_fields(job_id: str) -> dict[str, str]:
    res = _run(["scontrol", "show", "job", "-o", job_id], check=False)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def _wait_for(predicate, timeout: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; squeue:\n{_squeue()}")


def test_the_node_has_every_cpu_of_this_machine():
    """slurm/local/start.sh used GNU nproc, which honours OMP_NUM_THREADS: started from a shell
    with OMP_NUM_THREADS=1 it made a 1-CPU node, and 2-CPU jobs stayed pending forever."""
    import os

    node = _run(["scontrol", "show", "node", "-o"]).stdout
    assert f"CPUTot={len(os.sched_getaffinity(0))} " in node, node


def test_array_tasks_each_write_a_file_and_run_concurrently(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Each task leaves a marker, then waits (bounded) to see its sibling's marker: that only
    # happens if both 1-CPU array tasks run at the same time on the 2-CPU node.
    script = _write_script(
        tmp_path / "array.sh",
        f"""out={out}
touch "$out/started_${{SLURM_ARRAY_TASK_ID}}"
shopt -s nullglob
for _ in $(seq 1 60); do
    markers=("$out"/started_*)
    [ "${{#markers[@]}}" -ge 2 ] && break
    sleep 1
done
echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID ${{#markers[@]}}" > "$out/task_${{SLURM_ARRAY_TASK_ID}}.txt"
""",
    )
    job_id = _sbatch_wait(script, "--array=0-1", "--ntasks=1", "--cpus-per-task=1")

    results = sorted(p.name for p in out.glob("task_*.txt"))
    assert results == ["task_0.txt", "task_1.txt"]
    for task in (0, 1):
        array_job, task_id, seen = (out / f"task_{task}.txt").read_text().split()
        assert array_job == job_id
        assert int(task_id) == task
        assert int(seen) == 2, f"array task {task} never saw its sibling running: not concurrent"


def test_two_task_job_runs_srun_with_procid_0_and_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = _write_script(
        tmp_path / "ntasks.sh",
        f"""srun bash -c 'echo "$SLURM_PROCID $SLURM_NTASKS $SLURM_JOB_ID" > "{out}/proc_$SLURM_PROCID.txt"'
""",
    )
    job_id = _sbatch_wait(script, "--ntasks=2", "--cpus-per-task=1")

    rows = sorted(p.read_text().split() for p in out.glob("proc_*.txt"))
    assert rows == [["0", "2", job_id], ["1", "2", job_id]]


def test_scontrol_requeue_reruns_job_with_same_id(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    # First run records itself and sleeps until requeued; the rerun (SLURM_RESTART_COUNT=1,
    # which SLURM leaves unset on a first run) records itself and exits 0.
    script = _write_script(
        tmp_path / "requeue.sh",
        f"""echo "${{SLURM_RESTART_COUNT:-0}} $SLURM_JOB_ID" >> "{runs}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -eq 0 ]; then
    sleep 300
fi
""",
    )
    name = _job_name()
    res = _run(
        [
            "sbatch",
            "--parsable",
            "--requeue",
            f"--job-name={name}",
            "--time=5",
            f"--chdir={tmp_path}",
            f"--output={tmp_path}/slurm-%j.out",
            "--open-mode=append",
            str(script),
        ]
    )
    job_id = res.stdout.strip().split(";")[0]
    try:
        _wait_for(
            lambda: runs.exists() and runs.read_text().strip(),
            timeout=60,
            what=f"job {job_id} to start",
        )
        assert _job_fields(job_id).get("JobState") == "RUNNING"

        _run(["scontrol", "requeue", job_id])

        def finished() -> dict[str, str] | None:
            fields = _job_fields(job_id)
            return fields if fields.get("JobState") in TERMINAL_STATES else None

        fields = _wait_for(
            finished, timeout=REQUEUE_RESTART_TIMEOUT_S, what=f"requeued job {job_id} to rerun"
        )
    finally:
        _cancel(name)

    assert runs.read_text().splitlines() == [f"0 {job_id}", f"1 {job_id}"]
    assert fields["JobState"] == "COMPLETED", fields
    assert fields.get("Restarts") == "1", fields


def test_submit_failing_partway_cancels_and_records_what_was_queued(tmp_path: Path) -> None:
    """`radtrain submit` whose second step sbatch refuses (unknown partition): the MLM array already
    queued is cancelled and <root>/pipeline.json records its id, the failed step and the cancel."""
    import json
    import sys

    root = tmp_path / "pipe"
    res = _run(
        [
            sys.executable,
            "-m",
            "radtrain",
            "submit",
            str(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"),
            f"output_dir={root}",
            "classify.resources.partition=no-such-partition",
        ],
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "submitting step 'classify' failed" in res.stderr and "cancelled them" in res.stderr, res.stderr
    record = json.loads((root / "pipeline.json").read_text())
    assert list(record["steps"]) == ["mlm"] and record["complete"] is False
    mlm = record["steps"]["mlm"]["job_id"]
    assert record["failed"]["step"] == "classify" and record["failed"]["cancelled"] == [mlm]
    deadline = time.monotonic() + 30
    states: set[str] = set()
    while time.monotonic() < deadline:
        out = _run(["scontrol", "show", "job", "-o", mlm], check=False).stdout
        states = set(re.findall(r"JobState=(\S+)", out))
        if states and states <= {"CANCELLED"}:
            break
        time.sleep(0.5)
    assert states == {"CANCELLED"}, out
