"""Shared fixtures: the real ROCO captions from ../shared/data, small slices of them, and the
overrides that make a scratch tiny ModernBERT learn something in seconds on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared real captions beside the checkout; RADTRAIN_ROCO points elsewhere (a lent GPU machine
# gets the checkout alone, so tests/gpu/bench_gpu.sh passes the copy it carried).
ROCO = Path(os.environ.get("RADTRAIN_ROCO") or REPO.parent / "shared" / "data" / "roco_v1_radiology.jsonl")

# Fast, learnable settings for a scratch tiny model on a few hundred captions.
TINY = [
    "model.name=scratch:tiny",
    "train.lr=1e-3",
    "train.batch_size=16",
    "train.warmup_ratio=0.1",
    "data.max_length=96",
    "data.min_label_count=5",
]


@pytest.fixture(scope="session")
def roco_path() -> Path:
    if not ROCO.is_file():
        pytest.fail(f"the shared real captions are missing: {ROCO}")
    return ROCO


def write_roco_slice(path: Path, n: int, start: int = 0) -> Path:
    with ROCO.open(encoding="utf-8") as src:
        lines = [line for i, line in enumerate(src) if start <= i < start + n]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def roco_dir(tmp_path_factory, roco_path) -> Path:
    """A directory of real captions split into train/validation/test jsonl files (600/150/150)."""
    root = tmp_path_factory.mktemp("roco")
    rows = [json.loads(line) for line in roco_path.read_text(encoding="utf-8").splitlines()[:900]]
    for name, part in (("train", rows[:600]), ("validation", rows[600:750]), ("test", rows[750:900])):
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("RADTRAIN_PROGRESS", "0")
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RADTRAIN_PROGRESS": "0", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """The local SLURM (slurm/local/start.sh) must answer. Without it the `slurm` tests skip, unless
    RADTRAIN_REQUIRE_SLURM=1 (tests/run.sh, i.e. CI): then they FAIL, so a cluster that did not
    start cannot turn into a green run with no SLURM coverage."""
    import shutil
    import subprocess

    required = os.environ.get("RADTRAIN_REQUIRE_SLURM") == "1"
    give_up = pytest.fail if required else pytest.skip
    if shutil.which("sinfo") is None:
        give_up("sinfo not found: no SLURM client here (CI starts one with slurm/local/start.sh)")
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        give_up("sinfo did not answer within 15 s: slurmctld not running (run slurm/local/start.sh)")
    if res.returncode != 0 or not res.stdout.strip():
        give_up(
            f"sinfo does not respond (rc={res.returncode}): {res.stderr.strip() or 'no partitions'}"
            " -- run slurm/local/start.sh"
        )


def train_logs_one_vs_two_processes(tmp_path: Path, phase: str, common: list[str], port: int,
                                    timeout: int = 600, **env: str) -> dict[str, list[dict]]:
    """Train ``phase`` with batch 16 on one process and with batch 8 on two (accelerate launch,
    gloo): the same global batch. Returns each run's train_log.jsonl rows under "one" and "two"."""
    logs = {}
    for name, launcher, batch in (
        ("one", (), "train.batch_size=16"),
        ("two", ("accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
                 "--main_process_port", str(port), "-m"), "train.batch_size=8"),
    ):
        out = tmp_path / name
        result = subprocess.run(
            [PYTHON, "-m", *launcher, "radtrain", phase, "--output-dir", str(out), *common, batch],
            capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return logs
