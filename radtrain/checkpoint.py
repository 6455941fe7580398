"""Resumable state checkpoints: written under a temporary name, renamed when complete.

Layout: ``checkpoints/step-00000123/`` holds accelerate's state (model, optimizer, scheduler,
RNG per rank), ``trainer_state.json`` and, written last, ``COMPLETE`` (a manifest with the
config fingerprint, a digest of the training data, world size and the size and sha256 of
every file). A directory without a valid manifest is never resumed from, so a kill mid-write
costs at most the steps since the previous checkpoint. Rotation keeps ``train.save_total_limit`` checkpoints and never touches ``best/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from radtrain import faults
from radtrain.io import apply_umask, sha256_file

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
    # Wall-clock seconds of the run's starts, each counted up to its last checkpoint (what a stopped
    # start did after it is redone, and the time between starts is a queue's, so neither counts).
    wall_time_s: float = 0.0
    starts: int = 1
    history: list[dict] = field(default_factory=list)
    total_steps: int = 0  # the run's planned optimizer steps (0: written before radtrain recorded it)
    warmup_steps: int | None = None  # the run's warm-up (None: written before radtrain recorded it)
    # The train loss summed since the last train_log row: a resume between two rows must log
    # the same mean as a run that was never stopped.
    log_window_loss: float = 0.0
    log_window_items: int = 0

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


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    manifest: dict

    @property
    def world_size(self) -> int:
        return int(self.manifest.get("world_size", 1))


class CheckpointManager:
    def __init__(
        self,
        run_dir: Path,
        fingerprint: str,
        world_size: int,
        keep: int,
        data_digest: str | None = None,
        config=None,
        task: str | None = None,
        layout: str | None = None,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.fingerprint = fingerprint
        # This run's RunConfig and phase: with them a refused resume names the keys that differ.
        self.config, self.task = config, task
        self.layout = layout  # checkpoint_layout(accelerator): how the optimizer state is sharded
        self.data_digest = data_digest  # the training split's TokenizedSplit.digest()
        self.world_size = world_size
        self.keep = keep
        # The step of the newest checkpoint this process wrote or resumed from: a second save of
        # the same state (a stop signal on an evaluation step) is skipped instead of replacing it.
        self.last_saved_step: int | None = None

    # -- reading -------------------------------------------------------------------------------

    def _inspect(self, path: Path) -> CheckpointInfo | str | None:
        """A ``step-N`` directory's CheckpointInfo, or why it cannot be resumed from (a string);
        None for anything that is not a checkpoint directory (``.tmp-step-*`` work in progress)."""
        match = STEP_DIR.match(path.name)
        if not match:
            return None
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"no {MANIFEST} manifest"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return f"unreadable {MANIFEST} manifest"
        for rel, size in manifest.get("files", {}).items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != size:
                return f"{rel} is missing or truncated"
        return CheckpointInfo(path=path, step=int(match.group(1)), manifest=manifest)

    def _validate(self, path: Path) -> CheckpointInfo | None:
        found = self._inspect(path)
        return found if isinstance(found, CheckpointInfo) else None

    def _scan(self) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
        """One pass over ``checkpoints/``: the valid checkpoints and the damaged ``step-N``
        directories (with why), both newest first."""
        complete: list[CheckpointInfo] = []
        damaged: list[tuple[Path, str]] = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            found = self._inspect(path) if path.is_dir() else None
            if isinstance(found, CheckpointInfo):
                complete.append(found)
            elif found is not None:
                damaged.append((path, found))
        complete.sort(key=lambda c: c.step, reverse=True)
        damaged.sort(key=lambda x: x[0].name, reverse=True)
        return complete, damaged

    def complete_checkpoints(self) -> list[CheckpointInfo]:
        """Valid checkpoints, newest first."""
        return self._scan()[0]

    def damaged_checkpoints(self) -> list[tuple[Path, str]]:
        """``step-N`` directories that cannot be resumed from, and why, newest first. Only a
        finished write is renamed to ``step-N``, so each of these was damaged afterwards (a file
        deleted or truncated): never a kill mid-write, whose ``.tmp-step-N`` is not listed."""
        return self._scan()[1]

    def check_compatible(self, info: CheckpointInfo) -> None:
        if info.manifest.get("fingerprint") != self.fingerprint:
            why = self._other_configuration(info)
            if why is not None:
                raise CheckpointError(why)
            log.info("checkpoint %s: fingerprint from another radtrain version; every setting that changes the "
                     "maths equals the run's saved config.yaml, so it resumes", info.path)
        saved_layout = info.manifest.get("layout")
        layout_differs = bool(saved_layout and self.layout and saved_layout != self.layout)
        if info.world_size != self.world_size or layout_differs:
            written = f"{info.world_size} {'process' if info.world_size == 1 else 'processes'}"
            now = f"{self.world_size}"
            if saved_layout and self.layout:
                written += f" under {_describe_layout(saved_layout)}"
                now += f" under {_describe_layout(self.layout)}"
            config = " and the accelerate config it was written with (accelerate_configs/)" if layout_differs else ""
            raise CheckpointError(
                f"{info.path} was written by {written} and this run has {now}: model and optimizer state resume "
                f"only with the same processes and layout. Relaunch with {info.world_size} processes{config}, or "
                "start a new output_dir with model.init_from=<run>/best to continue from the exported weights."
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

    def _other_configuration(self, info: CheckpointInfo) -> str | None:
        """Why a checkpoint whose fingerprint is not this run's belongs to another run, naming the
        task or the settings that differ (from the run directory's config.yaml, which is the
        checkpoints' own: it is written only once a start has passed these checks). None when no
        setting that changes the maths differs: a fingerprint hashed by another radtrain version
        (one with other resume-safe keys, or without a key added since)."""
        from radtrain.config import PHASES, config_differences, read_saved_config

        run_dir = self.root.parent
        saved_path = run_dir / "config.yaml"
        fingerprint = info.manifest.get("fingerprint")
        saved = read_saved_config(run_dir) if self.config is not None else None
        # Recorded in manifests since radtrain wrote it; else from the hash, or from the run's
        # summary.json / best/radtrain.json (older manifests, hashed with other resume-safe keys).
        written_by = info.manifest.get("task")
        if written_by is None and saved is not None:
            written_by = next((t for t in PHASES if saved.fingerprint(t) == fingerprint), None)
        if written_by is None:
            written_by = recorded_task(run_dir)
        if self.task is not None and written_by not in (None, self.task):
            return (
                f"{run_dir} holds a {written_by} run's checkpoints and this is a {self.task} run: it would "
                f"overwrite them. Use a new output_dir (model.init_from={run_dir / 'best'} starts from that "
                "run's export)."
            )
        if saved is None:
            return (
                f"{run_dir} holds checkpoints of a different configuration (fingerprint {fingerprint} != "
                f"{self.fingerprint}; the saved one is in {saved_path}). Use a new output_dir, or the same "
                "settings to resume."
            )
        differences = config_differences(saved, self.config)
        if not differences:
            return None
        return (
            f"{run_dir} holds checkpoints of a run with other settings ({'; '.join(differences)}; saved in "
            f"{saved_path}). Resume with the saved settings, or use a new output_dir for these."
        )

    def verify(self, info: CheckpointInfo) -> None:
        """Deep check before loading: every file's sha256 against the manifest. (Listing and
        rotation check sizes only, which is cheap; this reads every byte once.)"""
        for rel, expected in info.manifest.get("sha256", {}).items():
            if sha256_file(info.path / rel) != expected:
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
                faults.hit("checkpoint-shard")  # test hook: this rank's part of the write fails
                accelerator.save_state(str(tmp), safe_serialization=True)
            except Exception as exc:
                error = exc
                if _collective_save(accelerator):
                    self._abandon(accelerator, final, tmp, exc)
        if not any_rank(accelerator, error is not None) and accelerator.is_main_process:
            try:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
                apply_umask(tmp)
                faults.hit("checkpoint-write")  # test hook: tensors written, manifest not yet
                files = _manifest_for(tmp)
                manifest = {
                    "fingerprint": self.fingerprint,
                    "task": self.task,
                    "layout": self.layout,
                    "data_digest": self.data_digest,
                    "world_size": self.world_size,
                    "global_step": state.global_step,
                    "written_at": time.time(),
                    "files": files,
                    "sha256": {rel: sha256_file(tmp / rel) for rel in files},
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
            if error is None:
                error = RuntimeError("another process failed to write its part of the checkpoint")
            raise CheckpointError(write_failed(final, error, self.kept_message())) from error
        if accelerator.is_main_process:
            if final.exists():  # an older write of this step (e.g. one that did not load on resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate(state.global_step)
        accelerator.wait_for_everyone()
        self.last_saved_step = state.global_step
        return final

    def kept_message(self) -> str:
        """What a failed write leaves to resume from, for its error message."""
        previous = self.complete_checkpoints()
        if previous:
            return f"The previous checkpoint {previous[0].path} is intact; the next start resumes from it."
        return "There is no earlier checkpoint; the next start begins at step 0."

    def _abandon(self, accelerator, final: Path, tmp: Path, error: BaseException) -> NoReturn:
        """This rank's part of a DeepSpeed checkpoint failed. DeepSpeed's save ends in a barrier
        (and ZeRO-3's may gather) that the other ranks are waiting in: any collective of ours now
        would be paired with one of theirs and hang, or worse. So say what failed, here, and end
        this process: the launcher (torchrun; srun --kill-on-bad-exit) ends the others, whose
        collectives fail once this process is gone. The main rank drops the partial write; so
        does the next successful save."""
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        message = write_failed(final, error, self.kept_message())
        if not isinstance(error, OSError):  # e.g. gloo/NCCL: the collective failed because a peer ended
            message += " If another process reported a write error, that error is the cause."
        print(f"radtrain: error: process {accelerator.process_index}: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # EXIT_USAGE, as for any write failure; no atexit or collective clean-up can run safely

    def _rotate(self, written_step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to the one just written. Only
        ``checkpoints/`` is touched: ``best/`` is a separate export and never rotated.

        A checkpoint of a later step can only be one that failed to load when this run resumed
        from an older one: it neither counts nor is deleted here (training overwrites or removes
        it when it reaches that step). Counting it would let a corrupt checkpoint push out the one
        just written (with keep=1, every good checkpoint)."""
        complete, damaged = self._scan()
        for old in [c for c in complete if c.step <= written_step][self.keep :]:
            shutil.rmtree(old.path, ignore_errors=True)
        # Damaged ones (reported when the run resumed past them) up to this step: no resume can
        # use them, and a stop checkpoint's step may never be written again to replace it.
        for path, _ in damaged:
            if int(STEP_DIR.match(path.name).group(1)) <= written_step:
                shutil.rmtree(path, ignore_errors=True)
        # Leftovers of writes that were killed.
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)


def recorded_task(run_dir: Path) -> str | None:
    """The task a run directory's results were written by ('mlm', 'classify', 'baseline', ...),
    from its summary.json or best/radtrain.json; None when neither says."""
    for path in (Path(run_dir) / "summary.json", Path(run_dir) / "best" / "radtrain.json"):
        try:
            task = json.loads(path.read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(task, str) and task:
            return task
    return None


def checkpoint_layout(accelerator) -> str:
    """How a checkpoint's model and optimizer state are stored: 'plain' (one process or DDP:
    whole tensors) or 'deepspeed-zero<stage>' (sharded files of DeepSpeed's own). A resume must
    use the same; the world size is checked separately."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "plain"


def _describe_layout(layout: str) -> str:
    if layout.startswith("deepspeed-zero"):
        return f"DeepSpeed ZeRO-{layout.removeprefix('deepspeed-zero')}"
    return "plain data parallelism (one process or DDP, no DeepSpeed)"


def _collective_save(accelerator) -> bool:
    """Whether the ranks meet in collectives inside save_state (DeepSpeed across processes)."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.DEEPSPEED


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
