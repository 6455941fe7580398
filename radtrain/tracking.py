"""Experiment tracking behind one small interface: ``log(values, step)`` and ``finish(summary)``.

``tracking.backend=wandb`` goes through Accelerate's own ``WandBTracker`` (the class that
``Accelerator(log_with="wandb")`` would build), created here rather than at Accelerator
construction so that the launcher-agnostic ``make_accelerator`` stays untouched:

- offline unless ``tracking.mode=online`` (no account, no network; ``wandb sync RUN/wandb/offline-*``
  uploads later); ``tracking.backend=none`` (the default) turns tracking off;
- main process only: the other ranks get a no-op tracker;
- the wandb run id is drawn once and stored in the run directory (``wandb/radtrain-<phase>.id``),
  so a resumed or requeued job logs to the same run id, while a fresh run directory gets a new one
  even at a path used before. Online, the resumed job continues the run. Offline, wandb cannot
  resume: each start writes its own ``offline-run-*`` folder under that id, and
  ``wandb sync RUN/wandb/offline-run-*`` uploads them one after another, in start order, into the
  one run. A resumed segment logs again from its checkpoint's step, so the steps between that
  checkpoint and the stop appear twice in the local files. A SIGKILLed start may leave an empty
  folder (wandb's own process dies with it);
- tracking never stops training: an error inside wandb while logging (its service killed by a
  signal sent to the whole process tree, a full disk, a lost connection) is reported once and
  tracking is switched off; metrics.jsonl and train_log.jsonl hold every figure anyway. An error
  at start (online mode without credentials or network) is a ConfigError naming the fix.
- only numbers are logged (losses, metrics, learning rate, throughput) plus the run config, and
  wandb's console capture and code saving are off: caption text never reaches wandb, whatever a
  library prints to stdout.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

from radtrain.config import ConfigError

log = logging.getLogger(__name__)


class NoOpTracker:
    def log(self, values: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


def _numbers(values: dict[str, Any]) -> dict[str, float | int]:
    """Numeric scalars only: a string (a caption, a path) can never be logged by accident."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value
    return out


def stable_run_id(run_dir: Path, phase: str) -> str:
    """The wandb run id of this run directory and phase: created once, then read back."""
    path = Path(run_dir) / "wandb" / f"radtrain-{phase}.id"
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"rt-{phase}-{uuid.uuid4().hex[:10]}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class WandbTracker:
    """Accelerate's WandBTracker with radtrain's run id, mode and privacy settings."""

    def __init__(self, cfg, run_dir: Path, phase: str):
        import wandb
        from accelerate.tracking import WandBTracker as AccelerateWandB

        run_dir = Path(run_dir)
        self.run_id = stable_run_id(run_dir, phase)
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = wandb.Settings(
            console="off",  # stdout/stderr are not captured: nothing printed can leak text
            save_code=False,
            disable_code=True,
            disable_git=True,
            x_save_requirements=False,
        )
        try:
            self.tracker = AccelerateWandB(
                cfg.tracking.project,
                name=cfg.tracking.run_name or f"{run_dir.name}-{phase}",
                id=self.run_id,
                resume="allow",
                mode=cfg.tracking.mode,
                dir=str(run_dir),
                config=_public_config(cfg, phase),
                settings=settings,
            )
            self.tracker.start()
        except Exception as exc:  # noqa: BLE001 - wandb raises its own error types (UsageError, CommError)
            raise ConfigError(
                f"wandb could not start its run (tracking.mode={cfg.tracking.mode}; {type(exc).__name__}: {str(exc).strip()[:300]}); "
                "run `wandb login` or set WANDB_API_KEY, or use tracking.mode=offline (sync later with "
                "`wandb sync`), or tracking.backend=none"
            ) from exc
        self.run = self.tracker.run
        self.failed = False
        log.info("wandb run %s (%s) in %s", self.run_id, cfg.tracking.mode, run_dir / "wandb")

    def _guarded(self, what: str, call) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a training run
            self.failed = True
            try:  # wandb's exit hook would print the same broken connection again, as a traceback
                import wandb

                wandb.teardown()
            except Exception:  # noqa: BLE001 - the service is already gone
                pass
            log.warning("wandb: %s failed (%s: %s); tracking is off for the rest of this run (metrics.jsonl and "
                        "train_log.jsonl have every figure)", what, type(exc).__name__, str(exc)[:200])

    def log(self, values: dict[str, Any], step: int) -> None:
        numbers = _numbers(values)
        if numbers:
            self._guarded("log", lambda: self.tracker.log(numbers, step=step))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        self._guarded("finish", lambda: self._finish(summary))

    def _finish(self, summary: dict[str, Any] | None) -> None:
        if summary:
            for split in ("validation", "test"):
                for key, value in _numbers(summary.get(split) or {}).items():
                    self.run.summary[f"{split}/{key}"] = value
            for key, value in _numbers(summary.get("throughput") or {}).items():
                self.run.summary[f"throughput/{key}"] = value
            for key in ("best_step", "best_epoch", "global_steps"):
                if isinstance(summary.get(key), (int, float)):
                    self.run.summary[key] = summary[key]
        self.tracker.finish()


def _public_config(cfg, phase: str) -> dict[str, Any]:
    """The run config as logged: settings only (no captions; tokens come from the environment)."""
    return {**cfg.to_dict(), "phase": phase}


def make_tracker(cfg, accelerator, run_dir: Path, phase: str):
    """A wandb tracker on the main process when tracking.backend=wandb, else a no-op."""
    if cfg.tracking.backend == "none" or not accelerator.is_main_process:
        return NoOpTracker()
    return WandbTracker(cfg, run_dir, phase)
