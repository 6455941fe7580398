"""Experiment tracking behind one small interface; wandb is imported only when asked for.

Only the main process logs. wandb runs offline unless ``tracking.mode=online``; the run id is
derived from the run directory so a resumed or requeued job continues the same wandb run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


class NoOpTracker:
    def log(self, values: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg, run_dir: Path, phase: str):
        import wandb

        run_id = "rt-" + hashlib.sha1(f"{run_dir.resolve()}|{phase}".encode()).hexdigest()[:12]
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.tracking.project,
            name=cfg.tracking.run_name or f"{run_dir.name}-{phase}",
            id=run_id,
            resume="allow",
            mode=cfg.tracking.mode,
            dir=str(run_dir),
            config=_public_config(cfg),
        )

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if summary:
            for split in ("validation", "test"):
                for key, value in (summary.get(split) or {}).items():
                    if isinstance(value, (int, float)):
                        self.run.summary[f"{split}/{key}"] = value
        self.run.finish()


def _public_config(cfg) -> dict[str, Any]:
    """The run config as logged: it holds no secrets (tokens come from the environment only)."""
    return cfg.to_dict()


def make_tracker(cfg, accelerator, run_dir: Path, phase: str):
    if cfg.tracking.backend == "none" or not accelerator.is_main_process:
        return NoOpTracker()
    return WandbTracker(cfg, run_dir, phase)
