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

    resumed = subprocess.run(command(killed, roco_dir), timeout=600, env=subprocess_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
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
