"""Resume at the exact batch: a run killed mid-epoch and started again ends with the same
weights as a run that was never interrupted (fp32, CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, TINY, subprocess_env

pytestmark = pytest.mark.slow

# 600 captions / batch 16 = 38 steps per epoch; checkpoints every 7 steps land mid-epoch.
ARGS = [*TINY, "train.epochs=2", "train.save_every_steps=7", "train.save_total_limit=20"]


def command(out, roco_dir):
    return [PYTHON, "-m", "radtrain", "classify", "--output-dir", str(out), f"data.source={roco_dir}", *ARGS]


def final_weights(run):
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return newest.name, load_file(newest / "model.safetensors")


def test_killed_mid_epoch_then_resumed_matches_uninterrupted(tmp_path, roco_dir):
    straight = tmp_path / "straight"
    subprocess.run(command(straight, roco_dir), check=True, timeout=600, env=subprocess_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, roco_dir), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    target = killed / "checkpoints" / "step-00000014" / "COMPLETE"
    while not target.exists():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "no mid-epoch checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait(timeout=60)
    interrupted_at = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*")
                         if (p / "COMPLETE").exists())
    assert 14 <= interrupted_at < 76
    first_start = json.loads((killed / "checkpoints" / f"step-{interrupted_at:08d}" / "trainer_state.json").read_text())

    resume_began = time.time()
    resumed = subprocess.run(command(killed, roco_dir), timeout=600, env=subprocess_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_for = time.time() - resume_began
    assert f"resumed from {killed / 'checkpoints'}" in resumed.stderr

    name_a, weights_a = final_weights(straight)
    name_b, weights_b = final_weights(killed)
    assert name_a == name_b == "step-00000076"
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-6, atol=1e-7, msg=key)

    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # no evaluation row twice
    summary_a = json.loads((straight / "summary.json").read_text())
    summary_b = json.loads((killed / "summary.json").read_text())
    assert summary_b["test"] == pytest.approx(summary_a["test"], abs=1e-6)
    # wall_time_s was the last start's alone: a preempted run looked as fast as one never stopped.
    assert (summary_a["starts"], summary_b["starts"]) == (1, 2)
    assert first_start["wall_time_s"] > 0
    assert first_start["wall_time_s"] < summary_b["wall_time_s"] <= first_start["wall_time_s"] + resumed_for


def _stopped_at_step_4(run, data) -> tuple[list[str], object]:
    """An 8-step classify run stopped by SIGTERM at step 4 (checkpoint, exit 75): the command that
    resumes it and its checkpoint directory."""
    cmd = [PYTHON, "-m", "radtrain", "classify", "--output-dir", str(run), f"data.source={data}", *TINY,
           "train.max_steps=8", "train.save_every_steps=4"]
    stopped = subprocess.run(cmd, timeout=600, env=subprocess_env(RADTRAIN_FAULT="step:4:SIGTERM"),
                             capture_output=True, text=True)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    return cmd, run / "checkpoints" / "step-00000004"


def test_resume_refuses_a_checkpoint_trained_on_other_data(tmp_path, roco_dir):
    """Same config, changed training file (one caption edited): the config fingerprint matches, but
    resuming would continue one schedule on two datasets. Exit 2 with a message that names the data,
    and the checkpoint is left as it was; with the original data back it resumes."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(roco_dir, data)
    cmd, checkpoint = _stopped_at_step_4(tmp_path / "run", data)
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    assert len(manifest["data_digest"]) == 16
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    # The run's saved settings and label space: a refused start must leave them as they were (it
    # used to write the new data's label space before the check refused the data).
    saved = {name: (tmp_path / "run" / name).read_bytes() for name in ("labels.json", "config.yaml")}

    train = data / "train.jsonl"
    original = train.read_text(encoding="utf-8")
    rows = original.splitlines()
    first = json.loads(rows[0])
    first["caption"] = first["caption"] + " with an added finding"
    train.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n", encoding="utf-8")
    refused = subprocess.run(cmd, timeout=600, env=subprocess_env(), capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "was trained on other data" in refused.stderr and "data digest" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before
    assert {name: (tmp_path / "run" / name).read_bytes() for name in saved} == saved

    train.write_text(original, encoding="utf-8")
    resumed = subprocess.run(cmd, timeout=600, env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr


def _rewrite_state(checkpoint, edit) -> None:
    """Edit trainer_state.json and re-seal the manifest (sizes and sha256), as a checkpoint written
    by another radtrain version would look: valid, but with other contents."""
    import hashlib

    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state, indent=1))
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    manifest["files"]["trainer_state.json"] = state_file.stat().st_size
    manifest["sha256"]["trainer_state.json"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest))


def test_resume_refuses_a_checkpoint_planned_for_another_step_count(tmp_path, roco_dir):
    """A checkpoint whose run planned another number of optimizer steps (same config and data: a
    radtrain version that plans epochs differently) would make the LR schedule jump: exit 2, the
    checkpoint kept. One written before radtrain recorded the plan (no total_steps) still resumes."""
    cmd, checkpoint = _stopped_at_step_4(tmp_path / "run", roco_dir)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["total_steps"] == 8

    _rewrite_state(checkpoint, lambda state: state.update(total_steps=9))
    refused = subprocess.run(cmd, timeout=600, env=subprocess_env(), capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "planned for 9 optimizer steps" in refused.stderr and "this run plans 8" in refused.stderr
    assert (checkpoint / "COMPLETE").is_file()

    _rewrite_state(checkpoint, lambda state: state.pop("total_steps"))
    resumed = subprocess.run(cmd, timeout=600, env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
