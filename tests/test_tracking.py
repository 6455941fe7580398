"""Experiment tracking (wandb, offline): it must never stop or crash a training run.

The real wandb client and its real service process (wandb-core) run here, offline.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from accelerate import PartialState

from radtrain.config import ConfigError, load_config
from radtrain.tracking import WandbTracker


def _children_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and name.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_killed_wandb_service_turns_tracking_off_instead_of_crashing(tmp_path, monkeypatch, caplog):
    """SIGTERM sent to a job's whole process tree (scancel, a time limit) also kills wandb-core; the
    next log call raised ConnectionResetError in the training loop, so the run died with exit 1
    instead of saving its stop checkpoint and exiting 75."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    PartialState(cpu=True)
    cfg = load_config(None, ["tracking.backend=wandb", f"output_dir={tmp_path}"])
    tracker = WandbTracker(cfg, tmp_path, "classify")
    tracker.log({"train/loss": 1.0}, step=1)
    services = _children_named("wandb-core")
    assert services, "wandb-core is not a child of this process: the test cannot kill it"
    for pid in services:
        os.kill(pid, signal.SIGTERM)
    for pid in services:
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="radtrain.tracking"):
        for step in range(2, 5):
            tracker.log({"train/loss": 0.5}, step=step)
        tracker.finish({"validation": {"f1": 0.5}})
    warnings = [r for r in caplog.records if "tracking is off" in r.getMessage()]
    assert len(warnings) == 1  # reported once, not at every step


def test_an_online_run_without_credentials_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    PartialState(cpu=True)
    cfg = load_config(None, ["tracking.backend=wandb", "tracking.mode=online", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="wandb login"):
        WandbTracker(cfg, tmp_path, "classify")


def test_a_run_whose_wandb_died_exits_without_a_traceback(tmp_path):
    """After the tracker switched itself off, wandb's exit hook printed the broken connection again
    as a ~20-line traceback at the end of an otherwise successful run."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    script = f"""
import os, signal, time
from pathlib import Path
from accelerate import PartialState
PartialState(cpu=True)
from radtrain.config import load_config
from radtrain.tracking import WandbTracker
cfg = load_config(None, ["tracking.backend=wandb", "output_dir={tmp_path}"])
tracker = WandbTracker(cfg, Path("{tmp_path}"), "classify")
tracker.log({{"loss": 1.0}}, step=1)
for entry in Path("/proc").iterdir():  # this process's wandb service (its child)
    if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
        os.kill(int(entry.name), signal.SIGTERM)
time.sleep(1.0)
tracker.log({{"loss": 0.5}}, step=2)
tracker.finish(None)
print("done")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=subprocess_env(WANDB_MODE="offline"))
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
    assert "tracking is off" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
