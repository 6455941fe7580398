"""Fault injection: kills, corrupt checkpoints, stop signals, NaN losses, full disks (issue 8).

Every run is a real ``python -m radtrain classify`` subprocess (scratch tiny ModernBERT, fp32,
300 real ROCO captions: 225 train / 45 validation / 30 test, batch 16 -> 15 steps per epoch,
2 epochs = 30 steps, a checkpoint every 4 steps and at each epoch's evaluation), bounded by a
timeout. Faults land at exact moments through the RADTRAIN_FAULT test hook (radtrain/faults.py):
SIGKILL inside a step, an evaluation, a checkpoint write or the best/ swap; a real signal sent to
the process inside a step; NaN losses; ENOSPC. A killed-and-resumed run must end bitwise equal
to one never killed: same metrics, same weights. Every run also gets an HF_TOKEN sentinel and is
scanned for it and for caption text afterwards (promise 8).

The promises and the tests that hold them: docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from radtrain.checkpoint import MANIFEST, CheckpointError, CheckpointManager
from radtrain.io import sha256_file
from tests.conftest import PYTHON, TINY, subprocess_env, write_roco_slice

pytestmark = pytest.mark.slow

SENTINEL = "hf_RadtrainSentinelTokenDoNotLeak0123456789"
# lr 3e-3 without warmup and a 0.2 decision threshold: the tiny model has f1 > 0 after one epoch,
# so equal metrics are a real comparison (at 0.5 it predicts no label at all in 30 steps).
ARGS = [
    *TINY, "train.lr=3e-3", "train.warmup_ratio=0", "train.threshold=0.2", "train.epochs=2",
    "train.precision=fp32", "train.save_every_steps=4",
]
TOTAL_STEPS = 30
TIMEOUT = 300  # per run; a healthy one takes ~20 s on 2 free cores
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pkl", ".pt")


@dataclass
class Env:
    data: Path
    cache: Path
    probes: list[bytes]  # the first 40 characters of every longer caption


@pytest.fixture(scope="module")
def env(tmp_path_factory, roco_path) -> Env:
    root = tmp_path_factory.mktemp("faults")
    data = write_roco_slice(root / "roco300.jsonl", 300)
    captions = [json.loads(line)["caption"] for line in data.read_text(encoding="utf-8").splitlines()]
    probes = [c[:40].encode() for c in captions if len(c) >= 40 and c[:40].count(" ") >= 3]
    return Env(data=data, cache=root / "token-cache", probes=probes)


def radtrain(env: Env, run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    child_env = subprocess_env(RADTRAIN_CACHE=str(env.cache), HF_TOKEN=SENTINEL, HUGGING_FACE_HUB_TOKEN=SENTINEL)
    child_env.pop("RADTRAIN_FAULT", None)
    if fault:
        child_env["RADTRAIN_FAULT"] = fault
    result = subprocess.run(
        [PYTHON, "-m", "radtrain", "classify", "--output-dir", str(run_dir), f"data.source={env.data}", *ARGS, *extra],
        capture_output=True, text=True, timeout=TIMEOUT, env=child_env,
    )
    assert_nothing_leaked(env, run_dir, result.stdout + result.stderr)
    return result


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-4000:]


def expect(result: subprocess.CompletedProcess, code: int) -> subprocess.CompletedProcess:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{output(result)}"
    return result


def assert_nothing_leaked(env: Env, run_dir: Path, text: str) -> None:
    """No token anywhere (any file, stdout, stderr); no caption text in logs, metadata or tracking."""
    token = SENTINEL.encode()
    assert SENTINEL not in text
    assert not any(p.decode() in text for p in env.probes), "caption text in the run's output"
    for path in run_dir.rglob("*") if run_dir.exists() else []:
        if not path.is_file():
            continue
        data = path.read_bytes()
        assert token not in data, f"the HF token sentinel was written to {path}"
        if not path.name.endswith(TENSOR_SUFFIXES):
            leaked = next((p for p in env.probes if p in data), None)
            assert leaked is None, f"caption text {leaked!r} in {path}"


def manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir, "unused", 1, keep=3)


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(c.step for c in manager(run_dir).complete_checkpoints())


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_readers_see_whole_files(run_dir: Path) -> None:
    """What a reader can open is whole: every step-* directory is a complete checkpoint (partial
    writes only under .tmp-* names), best/ is absent or a full export, every log line parses."""
    root = run_dir / "checkpoints"
    step_dirs = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
    assert step_dirs == [f"step-{s:08d}" for s in complete_steps(run_dir)]
    best = run_dir / "best"
    if best.exists():
        from safetensors.torch import load_file

        for name in ("config.json", "model.safetensors", "radtrain.json", "labels.json", "tokenizer.json"):
            assert (best / name).is_file(), f"best/ lacks {name}"
        assert all(torch.isfinite(t).all() for t in load_file(best / "model.safetensors").values())
    for name in ("metrics.jsonl", "train_log.jsonl"):
        read_rows(run_dir / name)  # raises on a torn line
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())


def assert_same_result(run: Path, ref: Path) -> None:
    """Bitwise: metrics, the evaluation history, the exported weights and the final state."""
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    for key in ("validation", "test", "best_step", "best_epoch", "global_steps", "nan_steps_skipped"):
        assert got[key] == want[key], key
    assert read_rows(run / "metrics.jsonl") == read_rows(ref / "metrics.jsonl")
    # The train log too, loss for loss: a resume between two of its rows (every 10 steps) used to
    # log the mean of the steps since the resume only.
    def losses(path: Path) -> list[tuple]:
        return [(r["step"], r["epoch"], r["train_loss"], r["lr"]) for r in read_rows(path)]

    assert losses(run / "train_log.jsonl") == losses(ref / "train_log.jsonl")
    for rel in ("best/model.safetensors", "best/thresholds.json", f"checkpoints/step-{TOTAL_STEPS:08d}/model.safetensors"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), f"{rel} differs"


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    """The run that is never disturbed."""
    run = tmp_path_factory.mktemp("reference") / "run"
    expect(radtrain(env, run), 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_steps"] == TOTAL_STEPS and summary["nan_steps_skipped"] == 0
    assert summary["validation"]["f1"] > 0  # it learns something, so equal metrics mean something
    return run


# -- promise 7: same seed, same config, same machine -> the same metrics --------------------------


def test_same_seed_same_config_gives_bitwise_equal_results(env, reference, tmp_path):
    """Also a security check of tracking and the model card: the second run logs to wandb
    (offline) and the card is built; neither holds the token or caption text."""
    run = tmp_path / "again"
    expect(radtrain(env, run, "tracking.backend=wandb", "tracking.mode=offline"), 0)
    assert_same_result(run, reference)
    assert any((run / "wandb").rglob("*.wandb")), "wandb wrote nothing: the tracking check checked nothing"
    # Rotation keeps train.save_total_limit checkpoints and never touches best/.
    assert complete_steps(run) == [24, 28, 30]
    assert (run / "best" / "model.safetensors").is_file()
    # Readable as the umask allows, weights included (safetensors creates its files mode 0600).
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(run / "best").iterdir(), *(run / "checkpoints" / "step-00000030").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

    from radtrain.model_card import build_card

    card = build_card(run / "best", run, "org/radtrain-test")
    assert SENTINEL not in card
    leaked = [p.decode() for p in env.probes if p.decode() in card]
    assert not leaked, f"training captions in the model card: {leaked[:3]}"


# -- promise 1 and 3: kill at any moment; graceful stop signals -----------------------------------


def test_killed_at_every_moment_resumes_to_the_same_result(env, reference, tmp_path):
    """One run directory, killed again and again at different moments; each start resumes from
    the newest complete checkpoint; the last start ends bitwise equal to the reference."""
    run = tmp_path / "run"

    # A: SIGKILL inside optimizer step 7. The checkpoint of step 4 is the newest complete one.
    result = expect(radtrain(env, run, fault="step:7"), -signal.SIGKILL)
    assert "RADTRAIN_FAULT: kill at step #7" in result.stderr
    assert complete_steps(run) == [4]
    assert_readers_see_whole_files(run)

    # B: SIGKILL inside the first evaluation (end of epoch 1, step 15): no metrics row yet.
    result = expect(radtrain(env, run, fault="eval:1"), -signal.SIGKILL)
    assert "resumed from" in result.stderr and "step-00000004" in result.stderr
    assert complete_steps(run) == [4, 8, 12]  # lost at most the 3 steps since step 12
    assert read_rows(run / "metrics.jsonl") == []
    assert_readers_see_whole_files(run)

    # C: SIGKILL inside the checkpoint write of step 15: tensors on disk, no manifest.
    result = expect(radtrain(env, run, fault="checkpoint-write:1"), -signal.SIGKILL)
    assert (run / "checkpoints" / ".tmp-step-00000015" / "model.safetensors").is_file()
    assert not (run / "checkpoints" / ".tmp-step-00000015" / MANIFEST).exists()
    assert complete_steps(run) == [4, 8, 12]
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [15]  # written before the kill
    assert (run / "best" / "model.safetensors").is_file()
    assert_readers_see_whole_files(run)
    # What a kill in the middle of appending a row leaves (too short a window to hit on purpose):
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 15, "epoch": 1.0, "precision_mi')

    # D: SIGKILL between the two renames of the best/ swap: best/ moved to best.old, the new
    # export complete in best.tmp. The resume dropped the torn row and the row of step 15 (after
    # its checkpoint, step 12) and wrote step 15's row again.
    result = expect(radtrain(env, run, fault="export:1"), -signal.SIGKILL)
    assert "step-00000012" in result.stderr
    assert read_rows(run / "metrics.jsonl") == read_rows(reference / "metrics.jsonl")[:1]
    assert not (run / "best").exists()
    assert (run / "best.old" / "model.safetensors").is_file() and (run / "best.tmp" / "model.safetensors").is_file()
    assert_readers_see_whole_files(run)

    # E: SIGTERM (a real signal, delivered to the real handler) inside step 18: checkpoint at
    # that step boundary, exit 75 = "start me again". The start put best/ back first.
    result = expect(radtrain(env, run, fault="step:18:SIGTERM"), 75)
    assert "run the same command again to resume" in result.stderr
    assert complete_steps(run)[-1] == 18
    assert not (run / "best.old").exists() and not (run / "best.tmp").exists()
    assert_readers_see_whole_files(run)

    # F: undisturbed to the end.
    result = expect(radtrain(env, run), 0)
    assert "step-00000018" in result.stderr
    assert_readers_see_whole_files(run)
    assert_same_result(run, reference)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # leftovers cleaned by rotation


def test_a_stop_signal_during_the_last_evaluation_is_not_lost(env, reference, tmp_path):
    """SIGTERM inside the last step's evaluation: the loop had ended, so the signal was dropped
    and the run went on to its test evaluation (a scheduler's warning lost, a Ctrl-C ignored).
    Now it stops with exit 75 and the rerun only evaluates; a resume-safe key may change."""
    run = tmp_path / "run"
    result = expect(radtrain(env, run, fault="eval:2:SIGTERM"), 75)
    assert f"after the last step ({TOTAL_STEPS}); checkpoint saved" in result.stderr
    assert not (run / "summary.json").exists()
    expect(radtrain(env, run, "train.save_total_limit=2", "train.max_nan_steps=3"), 0)
    assert_same_result(run, reference)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGUSR1", "SIGUSR2"])
def test_stop_signals_checkpoint_at_the_step_boundary_and_exit_75(env, tmp_path, signame):
    """SIGINT (Ctrl-C), SIGUSR1 (SLURM --signal), SIGUSR2 (submitit's preemption/timeout notice).
    SIGTERM is covered, with the resume, by the kill test above."""
    run = tmp_path / "run"
    result = expect(radtrain(env, run, "train.epochs=1", fault=f"step:3:{signame}"), 75)
    signum = int(getattr(signal, signame))
    assert f"stopped on signal {signum} ({signame}) at step 3; checkpoint saved" in result.stderr
    assert complete_steps(run) == [3]
    manager(run).verify(manager(run).complete_checkpoints()[0])


# -- promise 4: NaN / inf losses --------------------------------------------------------------------


def test_nan_steps_are_skipped_and_counted(env, tmp_path):
    run = tmp_path / "run"
    result = expect(radtrain(env, run, "train.epochs=1", fault="nan:5-6"), 0)
    assert "step 5: non-finite loss or gradient; step skipped (1 in a row)" in result.stderr
    assert "step 6: non-finite loss or gradient; step skipped (2 in a row)" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nan_steps_skipped"] == 2 and summary["global_steps"] == 15
    assert_readers_see_whole_files(run)  # includes: best/ weights are all finite


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(env, tmp_path):
    run = tmp_path / "run"
    result = expect(radtrain(env, run, "train.epochs=1", "train.max_nan_steps=3", fault="nan:5-15"), 1)
    assert "3 optimizer steps in a row had a non-finite loss or gradient (train.max_nan_steps=3)" in result.stderr
    assert "The last good checkpoint is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert complete_steps(run) == [4]
    info = manager(run).complete_checkpoints()[0]
    manager(run).verify(info)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(info.path / "model.safetensors").values())
    assert not (run / "summary.json").exists()


def test_out_of_memory_stops_with_the_fix_and_keeps_the_checkpoints(env, tmp_path):
    run = tmp_path / "run"
    # The 7th forward pass (step 7, batch 16 = one micro-batch per step) raises what the CUDA
    # allocator raises when a batch does not fit.
    result = expect(radtrain(env, run, "train.epochs=1", fault="forward:7:oom"), 1)
    assert "out of memory on cpu in optimizer step 7 (largest micro-batch on this process: 16 captions" in result.stderr
    assert re.search(r"16 captions, \d+ real tokens, 16 x \d+ padded\)", result.stderr), result.stderr[-2000:]
    assert "train.batch_size=16 per process does not fit: halve train.batch_size and double train.grad_accum" in (
        result.stderr
    )
    assert "the checkpoint of step 4 in" in result.stderr and "is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert complete_steps(run) == [4]
    manager(run).verify(manager(run).complete_checkpoints()[0])


# -- promise 5: disk full, unwritable output directory --------------------------------------------


def assert_clean_write_failure(run: Path, result: subprocess.CompletedProcess, kept_step: int) -> None:
    assert "could not write" in result.stderr and "MiB free on that filesystem" in result.stderr
    assert f"step-{kept_step:08d} is intact; the next start resumes from it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((run / "checkpoints").glob(".tmp-*")), "the partial checkpoint was left behind"
    assert complete_steps(run) == [kept_step]
    manager(run).verify(manager(run).complete_checkpoints()[0])


def test_disk_full_in_a_checkpoint_write_keeps_the_previous_one(env, tmp_path):
    run = tmp_path / "run"
    result = expect(radtrain(env, run, "train.epochs=1", fault="checkpoint-write:2:enospc"), 2)
    assert "step-00000008: OSError: [Errno 28] No space left on device" in result.stderr
    assert_clean_write_failure(run, result, 4)


def test_disk_full_writing_a_log_row_or_the_summary_is_a_clean_error(env, reference, tmp_path):
    """A full disk while appending a metrics.jsonl row or writing summary.json was a Python
    traceback (exit 1); it is now the checkpoint write's error (exit 2, what to free, what the
    next start resumes from), and the run, started again, ends as if nothing happened."""
    run = tmp_path / "run"
    # Hit 1 is train_log.jsonl's row of step 10, hit 2 the metrics row of the evaluation at step 15.
    result = expect(radtrain(env, run, fault="result-write:2:enospc"), 2)
    assert f"could not write {run / 'metrics.jsonl'}" in result.stderr and "MiB free on that filesystem" in result.stderr
    assert "step-00000012 is intact; the next start resumes from it" in result.stderr
    assert "Traceback" not in result.stderr
    assert complete_steps(run) == [4, 8, 12]
    assert read_rows(run / "metrics.jsonl") == []

    # summary.json is written last: after every row of the steps after the resumed checkpoint.
    rows = [r for name in ("train_log.jsonl", "metrics.jsonl") for r in read_rows(reference / name) if r["step"] > 12]
    result = expect(radtrain(env, run, fault=f"result-write:{len(rows) + 1}:enospc"), 2)
    assert f"could not write {run / 'summary.json'}" in result.stderr
    assert "repeats only the test evaluation" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "summary.json").exists()
    assert (run / "best" / "model.safetensors").is_file()

    expect(radtrain(env, run), 0)
    assert_same_result(run, reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 16 MiB filesystem: one checkpoint (~10 MiB) fits, the second does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    ).returncode != 0:
        pytest.skip("needs root and mount (tmpfs); the injected ENOSPC test covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_keeps_the_previous_checkpoint(env, small_tmpfs):
    run = small_tmpfs / "run"
    result = expect(radtrain(env, run, "train.epochs=1"), 2)
    # torch.save reports a full disk as a RuntimeError, safetensors as a SafetensorError:
    # whichever it was, the message is ours.
    assert "could not write" in result.stderr and "step-00000008" in result.stderr
    assert_clean_write_failure(run, result, 4)


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("root without mount: cannot make a directory root cannot write")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_output_dir_fails_at_start_with_a_clear_error(env, read_only_dir):
    result = expect(radtrain(env, read_only_dir / "run"), 2)
    assert f"output_dir='{read_only_dir / 'run'}' is not writable" in result.stderr
    assert "[radtrain] classify:" not in result.stdout  # refused before training started


# -- promise 2: corrupt or partial newest checkpoint; promise 8: no unpickling ---------------------


class _Payload:
    """A pickle that creates a file when unpickled: stands in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_manifest(step_dir: Path) -> None:
    """Make the manifest agree with the files again, as an attacker with write access could."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for rel in manifest["files"]:
        manifest["files"][rel] = (step_dir / rel).stat().st_size
        manifest["sha256"][rel] = sha256_file(step_dir / rel)
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


def test_corrupt_newest_checkpoints_fall_back_to_an_older_one(env, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpts = run / "checkpoints"
    assert complete_steps(run) == [24, 28, 30]

    # Newest: garbage of the same size inside the tensor data (the header still parses, so only
    # the checksum can tell).
    weights = ckpts / "step-00000030" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(4096)
    weights.write_bytes(bytes(data))
    # Second newest: an optimizer state that runs code when unpickled, manifest made consistent.
    marker = tmp_path / "payload-ran"
    torch.save({"state": {}, "param_groups": _Payload(marker)}, ckpts / "step-00000028" / "optimizer.bin")
    _rewrite_manifest(ckpts / "step-00000028")
    # The payload is live: unpickled the unsafe way, it does run.
    probe = tmp_path / "probe-ran"
    torch.save(_Payload(probe), tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert probe.exists()

    result = expect(radtrain(env, run), 0)
    assert "step-00000030/model.safetensors does not match its checksum" in result.stderr
    assert "step-00000028 could not be loaded (UnpicklingError" in result.stderr
    assert "resumed from" in result.stderr and "step-00000024" in result.stderr
    assert not marker.exists(), "resuming unpickled an arbitrary object"
    assert_same_result(run, reference)  # steps 25-30 trained again, bitwise the same


def test_every_checkpoint_damaged_stops_instead_of_starting_over(env, reference, tmp_path):
    """Optimizer states deleted to save space (or any file missing or truncated) in every
    checkpoint: no checkpoint can be resumed from, so the run stops with exit 2, and its logs,
    best/ and checkpoints stay as they were. It used to start over at step 0 silently, emptying
    metrics.jsonl and train_log.jsonl."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for optimizer in (run / "checkpoints").glob("step-*/optimizer.bin"):
        optimizer.unlink()
    before = {rel: (run / rel).read_bytes() for rel in ("metrics.jsonl", "train_log.jsonl", "best/model.safetensors")}
    result = expect(radtrain(env, run), 2)
    assert "no checkpoint in" in result.stderr and "optimizer.bin is missing or truncated" in result.stderr
    assert "aside to start this run from step 0" in result.stderr
    assert {rel: (run / rel).read_bytes() for rel in before} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (24, 28, 30)]


def test_a_damaged_checkpoint_is_reported_once_and_removed_once_passed(env, reference, tmp_path):
    """A damaged stop checkpoint (step 29, off the save grid) newer than a good one: the run
    resumes from the good one (step 28), reports the damaged one once, and drops it when it saves
    a later step (no save ever replaces step 29; it used to stay, warned about at every save)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step-00000030")
    shutil.copytree(ckpts / "step-00000028", ckpts / "step-00000029")
    weights = ckpts / "step-00000029" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    result = expect(radtrain(env, run), 0)
    assert result.stderr.count("step-00000029 cannot be resumed from") == 1
    assert "resumed from" in result.stderr and "step-00000028" in result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:08d}" for s in (24, 28, 30)]
    assert_same_result(run, reference)


def test_another_runs_results_are_never_overwritten(env, reference, tmp_path):
    """Other settings in a directory with checkpoints: refused, naming the settings. The same
    with the checkpoints deleted (a finished run cleaned up): it used to start over silently and
    replace best/ and the logs."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {rel: (run / rel).read_bytes() for rel in ("metrics.jsonl", "summary.json", "best/model.safetensors")}
    result = expect(radtrain(env, run, "train.lr=1e-3"), 2)
    assert "train.lr: 0.003 -> 0.001" in result.stderr and "Resume with the saved settings" in result.stderr
    shutil.rmtree(run / "checkpoints")
    result = expect(radtrain(env, run, "train.lr=1e-3"), 2)
    assert "no checkpoint to resume" in result.stderr and "train.lr: 0.003 -> 0.001" in result.stderr
    assert {rel: (run / rel).read_bytes() for rel in before} == before


def test_checkpoints_hashed_by_another_version_resume_when_no_setting_differs(env, reference, tmp_path):
    """A radtrain version with other resume-safe keys hashes configs differently: its checkpoints
    resume as long as every setting that changes the maths equals the run's config.yaml."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    step_dir = run / "checkpoints" / f"step-{TOTAL_STEPS:08d}"
    manifest = json.loads((step_dir / MANIFEST).read_text())
    manifest["fingerprint"], manifest["task"] = "0123456789abcdef", None  # as written before the task was recorded
    (step_dir / MANIFEST).write_text(json.dumps(manifest))
    result = expect(radtrain(env, run), 0)
    assert "fingerprint from another radtrain version" in result.stderr
    assert_same_result(run, reference)


def test_an_old_manifest_still_names_the_task_that_wrote_it(reference, tmp_path):
    """Checkpoints from before manifests recorded their task, hashed with other resume-safe keys:
    neither the manifest nor the hash says the phase, so the run's summary.json must (an MLM
    start there was told 'fingerprint from another version, it resumes', then 'other data')."""
    from radtrain.config import load_config

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    info = manager(run).complete_checkpoints()[0]
    info.manifest.update(fingerprint="0123456789abcdef", task=None)
    cfg = load_config(run / "config.yaml")
    mlm = CheckpointManager(run, cfg.fingerprint("mlm"), 1, keep=3, config=cfg, task="mlm")
    with pytest.raises(CheckpointError, match="holds a classify run's checkpoints and this is a mlm run"):
        mlm.check_compatible(info)


def test_a_missing_best_export_is_named(env, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "best")
    result = expect(radtrain(env, run), 2)
    assert "best is missing (deleted after the run?)" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_best_swap_puts_the_previous_export_back(env, tmp_path):
    """A full disk between the two renames of the best/ swap: the previous best/ is back at once,
    as the message says (it used to be left in best.old until the next start)."""
    run = tmp_path / "run"
    result = expect(radtrain(env, run, fault="export:2:enospc"), 2)
    assert "The previous best/ is unchanged" in result.stderr
    assert (run / "best" / "model.safetensors").is_file() and not (run / "best.old").exists()
    assert json.loads((run / "best" / "radtrain.json").read_text())["step"] == 15


def test_partial_checkpoints_are_never_listed(reference, tmp_path):
    """Truncated file, missing manifest, unparsable manifest: not complete, not resumed from."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    ckpts = run / "checkpoints"
    optimizer = ckpts / "step-00000030" / "optimizer.bin"
    with open(optimizer, "r+b") as handle:
        handle.truncate(optimizer.stat().st_size // 2)
    (ckpts / "step-00000028" / MANIFEST).unlink()
    assert complete_steps(run) == [24]
    (ckpts / "step-00000024" / MANIFEST).write_text('{"files": {"model.safe')
    assert complete_steps(run) == []


def test_a_newer_checkpoint_that_failed_to_load_never_pushes_out_the_one_just_written(tmp_path):
    """After a resume fell back past a corrupt newest checkpoint (step 30), the run saves older
    steps again. Rotation must keep what it just wrote: with keep=1 it used to keep the corrupt
    step 30 and delete every good checkpoint, so the next start could resume from nothing."""
    from accelerate import Accelerator

    from radtrain.checkpoint import TrainerState

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    ckpt = CheckpointManager(tmp_path / "run", "fp", 1, keep=1)
    ckpt.save(accelerator, TrainerState(global_step=30))  # stands in for the corrupt newest one
    ckpt.save(accelerator, TrainerState(global_step=24))  # the resumed run's next saves
    assert complete_steps(tmp_path / "run") == [24, 30]
    ckpt.save(accelerator, TrainerState(global_step=28))
    assert complete_steps(tmp_path / "run") == [28, 30]  # 24 rotated out, 28 kept; 30 left to be overwritten
    ckpt.save(accelerator, TrainerState(global_step=30))  # reaching step 30 replaces it
    assert complete_steps(tmp_path / "run") == [30]


def test_resume_state_loads_without_unpickling(reference):
    """Every pickle in a checkpoint loads with weights_only=True (accelerate allow-lists only the
    numpy types of the RNG state), and the weights are safetensors."""
    from accelerate.utils.other import load

    step_dir = reference / "checkpoints" / f"step-{TOTAL_STEPS:08d}"
    names = sorted(p.name for p in step_dir.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("pytorch_model") for n in names)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert isinstance(load(step_dir / name, weights_only=True), dict), name
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(step_dir / name, weights_only=True)  # plain torch, no allow-list needed


def test_remote_code_is_not_run_unless_asked(tmp_path):
    from radtrain import models
    from radtrain.config import ModelConfig, load_config

    assert load_config(None, []).model.trust_remote_code is False
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "remote-code-ran"
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "not-a-transformers-model",
        "auto_map": {"AutoConfig": "custom_code.Config", "AutoModelForSequenceClassification": "custom_code.Model"},
    }))
    (model_dir / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.source_config(ModelConfig(name=str(model_dir)))
    assert not marker.exists()
