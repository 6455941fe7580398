"""Resumable state checkpoints: written under a temporary name, renamed when complete.

Layout: ``checkpoints/step-00000123/`` holds accelerate's state (model, optimizer, scheduler,
RNG per rank), ``trainer_state.json`` and, written last, ``COMPLETE`` (a manifest with the
config fingerprint, a digest of the training data, world size and the size and sha256 of
every file). A directory without a valid manifest is never resumed from, so a kill mid-write
costs at most the steps since the previous checkpoint. Rotation keeps ``train.save_total_limit`` checkpoints and never touches ``best/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from radtrain import faults

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "COMPLETE"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything (besides tensors) that a resumed run needs to continue at the exact batch."""

    global_step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0  # optimizer steps done in `epoch` (the batch plan is per epoch)
    best_metric: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    nan_steps_skipped: int = 0
    consecutive_nan_steps: int = 0
    captions_seen: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    total_steps: int = 0  # the run's planned optimizer steps (0: written before radtrain recorded it)

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class CheckpointError(RuntimeError):
    pass


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank: a collective (one all-reduce of a scalar).

    A failure inside a collective write or load must be agreed, or the ranks that did not fail
    wait forever for the one that raised (and ranks that fall back alone resume from different
    steps). Every rank must call it the same number of times.
    """
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return bool(count.item() > 0)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest_for(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _sha256(path: Path) -> str:
    # ~1 GB/s: a ModernBERT-base checkpoint (weights + Adam moments, ~1.8 GB) costs ~2 s to hash,
    # next to minutes of training between checkpoints. Sizes alone miss garbage of the same size.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    manifest: dict

    @property
    def world_size(self) -> int:
        return int(self.manifest.get("world_size", 1))


class CheckpointManager:
    def __init__(self, run_dir: Path, fingerprint: str, world_size: int, keep: int, data_digest: str | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.fingerprint = fingerprint
        self.data_digest = data_digest  # the training split's TokenizedSplit.digest()
        self.world_size = world_size
        self.keep = keep
        # The step of the newest checkpoint this process wrote or resumed from: a second save of
        # the same state (a stop signal on an evaluation step) is skipped instead of replacing it.
        self.last_saved_step: int | None = None

    # -- reading -------------------------------------------------------------------------------

    def _validate(self, path: Path) -> CheckpointInfo | None:
        match = STEP_DIR.match(path.name)
        manifest_path = path / MANIFEST
        if not match or not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("checkpoint %s: unreadable manifest, skipped", path)
            return None
        for rel, size in manifest.get("files", {}).items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != size:
                log.warning("checkpoint %s: %s is missing or truncated, skipped", path, rel)
                return None
        return CheckpointInfo(path=path, step=int(match.group(1)), manifest=manifest)

    def complete_checkpoints(self) -> list[CheckpointInfo]:
        """Valid checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [self._validate(p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((c for c in found if c is not None), key=lambda c: c.step, reverse=True)

    def check_compatible(self, info: CheckpointInfo) -> None:
        if info.manifest.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{info.path.parent.parent} holds checkpoints of a different configuration "
                f"(fingerprint {info.manifest.get('fingerprint')} != {self.fingerprint}; the saved one is in "
                f"{info.path.parent.parent / 'config.yaml'}). Use a new output_dir, or the same settings to resume."
            )
        if info.world_size != self.world_size:
            raise CheckpointError(
                f"{info.path} was written by {info.world_size} processes and this run has {self.world_size}: "
                "optimizer shards resume only at the same world size. Relaunch with "
                f"{info.world_size} processes, or start a new output_dir with model.init_from=<run>/best "
                "to continue from the exported weights."
            )
        saved = info.manifest.get("data_digest")
        if saved and self.data_digest and saved != self.data_digest:
            raise CheckpointError(
                f"{info.path} was trained on other data: the training captions, their tokenization or the "
                f"label space differ from this run's (data digest {saved} != {self.data_digest}), although the "
                "configuration is the same (data.source points at changed files?). Resuming would mix two "
                "datasets in one schedule. Restore the original data to resume, or start a new output_dir "
                "(model.init_from=<run>/best continues from the exported weights)."
            )

    def verify(self, info: CheckpointInfo) -> None:
        """Deep check before loading: every file's sha256 against the manifest. (Listing and
        rotation check sizes only, which is cheap; this reads every byte once.)"""
        for rel, expected in info.manifest.get("sha256", {}).items():
            if _sha256(info.path / rel) != expected:
                raise CheckpointError(f"{info.path / rel} does not match its checksum in {MANIFEST} (corrupted)")

    def load_state(self, info: CheckpointInfo) -> TrainerState:
        return TrainerState.from_dict(json.loads((info.path / STATE_FILE).read_text()))

    # -- writing -------------------------------------------------------------------------------

    def save(self, accelerator, state: TrainerState) -> Path:
        """Collective: every rank must call it (DeepSpeed shards are written by their owners).

        A failure on any rank is agreed by all ranks (:func:`any_rank`), so every rank raises the
        same CheckpointError instead of the healthy ones waiting forever; only the main rank
        deletes the partial write (on a shared filesystem it holds every rank's shards)."""
        final = self.root / f"step-{state.global_step:08d}"
        tmp = self.root / f".tmp-step-{state.global_step:08d}"
        if self.last_saved_step == state.global_step:  # the same on every rank
            # This exact step is already saved (a stop signal right after an evaluation's save):
            # keep it rather than replace it. The main rank's view of the directory decides.
            missing = accelerator.is_main_process and self._validate(final) is None
            if not any_rank(accelerator, missing):
                return final
        error: BaseException | None = None
        try:
            if accelerator.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
        except Exception as exc:
            error = exc
        if not any_rank(accelerator, error is not None):  # also the barrier before the write
            try:
                accelerator.save_state(str(tmp), safe_serialization=True)
            except Exception as exc:
                error = exc
        if not any_rank(accelerator, error is not None) and accelerator.is_main_process:
            try:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
                faults.hit("checkpoint-write")  # test hook: tensors written, manifest not yet
                files = _manifest_for(tmp)
                manifest = {
                    "fingerprint": self.fingerprint,
                    "data_digest": self.data_digest,
                    "world_size": self.world_size,
                    "global_step": state.global_step,
                    "written_at": time.time(),
                    "files": files,
                    "sha256": {rel: _sha256(tmp / rel) for rel in files},
                }
                with open(tmp / MANIFEST, "w") as handle:
                    json.dump(manifest, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
            except Exception as exc:
                error = exc
        if any_rank(accelerator, error is not None):
            # A full disk surfaces as OSError, torch.save's RuntimeError or a SafetensorError:
            # whichever, drop the partial write (its space may be what the next try needs) and
            # say which checkpoint the next start will resume from.
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete_checkpoints()
            kept = (
                f"The previous checkpoint {previous[0].path} is intact; the next start resumes from it."
                if previous
                else "There is no earlier checkpoint; the next start begins at step 0."
            )
            if error is None:
                error = RuntimeError("another process failed to write its part of the checkpoint")
            raise CheckpointError(write_failed(final, error, kept)) from error
        if accelerator.is_main_process:
            if final.exists():  # an older write of this step (e.g. one that did not load on resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate(state.global_step)
        accelerator.wait_for_everyone()
        self.last_saved_step = state.global_step
        return final

    def _rotate(self, written_step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to the one just written. Only
        ``checkpoints/`` is touched: ``best/`` is a separate export and never rotated.

        A checkpoint of a later step can only be one that failed to load when this run resumed
        from an older one: it neither counts nor is deleted here (training overwrites it when it
        reaches that step). Counting it would let a corrupt checkpoint push out the one just
        written (with keep=1, every good checkpoint)."""
        complete = [c for c in self.complete_checkpoints() if c.step <= written_step]
        for old in complete[self.keep :]:
            shutil.rmtree(old.path, ignore_errors=True)
        # Leftovers of writes that were killed.
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)


def write_failed(target: Path, exc: BaseException, kept: str) -> str:
    """The message for a failed write of a checkpoint or export: what, why, and what is safe."""
    where = target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free on that filesystem"
    except OSError:
        free = "free space unknown"
    return (
        f"could not write {target}: {type(exc).__name__}: {exc} ({free}). Free some space (or make "
        f"{where} writable, or choose another output_dir) and run the same command again. {kept}"
    )
