"""What runs inside the SLURM jobs (submitit callables): array members and the selection."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable

from radtrain.cluster.jobfile import EVENTS_FILE, SELECTION_FILE
from radtrain.config import config_from_dict
from radtrain.io import write_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- inside the job


def _job_env():
    import submitit

    return submitit.JobEnvironment()


def restart_count() -> int:
    """How many times SLURM has requeued this job (unset on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _prepare_process(env: dict[str, str]) -> None:
    """Environment first (before transformers/accelerate are imported), then ranks and threads."""
    os.environ.update(env)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RADTRAIN_PROGRESS", "0")  # a log file, not a terminal: no progress bars
    from radtrain.distributed import export_slurm_env

    # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM's task variables (each submitit
    # task is one SLURM task), by the same rules as a plain srun launch.
    export_slurm_env(overwrite=True)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch

        # Without this each rank starts one thread per core of the node: N ranks x all cores.
        torch.set_num_threads(max(1, int(cpus)))


def _record(run_dir: Path, event: str, **fields: Any) -> None:
    """One line per job event in the member's own run directory (rank 0 only): the tests and a
    person read start/end times, job ids and restarts from here."""
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {
        "event": event,
        "time": time.time(),
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart": restart_count(),
        **fields,
    }
    with open(run_dir / EVENTS_FILE, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise RuntimeError(f"{run_dir} has no summary.json: that member did not finish")
    return json.loads(path.read_text())


def chosen_parent(run_dir: Path, candidates: list[Path]) -> Path | None:
    """The MLM run a classifier member in 'best' mode started from, if it has started: its saved
    config names that run's best/. A resumed or resubmitted member continues from it (its
    checkpoints were trained from it) instead of choosing again."""
    from radtrain.config import read_saved_config

    saved = read_saved_config(run_dir)
    if saved is None or saved.model.init_from is None:
        return None
    return next((Path(p) for p in candidates if Path(saved.model.init_from) == Path(p) / "best"), None)


def pick_best(run_dirs: list[Path], metric: str | None = None) -> tuple[Path, float, dict[str, float]]:
    """The run whose validation ``metric`` (default: each run's own best_metric) is best; ties go to
    the first run in the list, so every member choosing makes the same choice."""
    from radtrain.metrics import is_better

    best: tuple[Path, float] | None = None
    scores: dict[str, float] = {}
    for run_dir in run_dirs:
        summary = _read_summary(run_dir)
        name = metric or summary["best_metric"]
        value = (summary.get("validation") or {}).get(name)
        if value is None:
            raise RuntimeError(f"{run_dir}/summary.json has no validation {name!r}")
        scores[Path(run_dir).name] = float(value)
        if best is None or is_better(name, float(value), best[1]):
            best = (Path(run_dir), float(value))
    assert best is not None
    return best[0], best[1], scores


class MemberJob(Checkpointable):
    """One array member: ``run_phase`` in its own run directory, on every task of the job."""

    def __init__(
        self,
        phase: str,
        name: str,
        config: dict[str, Any],
        env: dict[str, str],
        max_requeues: int,
        init_from_best: list[str] | None = None,
        evaluate_test: bool = True,
    ) -> None:
        self.phase = phase
        self.name = name
        self.config = config
        self.env = env
        self.max_requeues = max_requeues
        self.init_from_best = init_from_best
        # False when the pipeline has a selection step: the test split is then read once, by the
        # selection job, for the selected member only (not once per member and again for the winner).
        self.evaluate_test = evaluate_test

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's USR2 handler (rank 0, outside the training loop) asks how to rerun: the same
        callable, which resumes from the run directory. None (no requeue) past max_requeues."""
        if restart_count() >= self.max_requeues:
            log.warning(
                "%s: not requeued: already requeued %d times (max_requeues)", self.name, restart_count()
            )
            return None
        return super().checkpoint(*args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        _prepare_process(self.env)
        from radtrain.phase import run_phase
        from radtrain.trainer import ResumeRequested

        job = _job_env()
        config = copy.deepcopy(self.config)
        if self.init_from_best:
            candidates = [Path(p) for p in self.init_from_best]
            parent = chosen_parent(Path(config["output_dir"]), candidates)
            if parent is not None:
                why = "chosen when this member started"
            else:
                parent, value, scores = pick_best(candidates)
                why = f"MLM validation {scores}"
            config["model"]["init_from"] = str(parent / "best")
            if job.global_rank == 0:
                print(f"[radtrain] {self.name}: starting from {parent / 'best'} ({why})", flush=True)
        cfg = config_from_dict(config)
        run_dir = Path(cfg.output_dir)
        main = job.global_rank == 0
        if main:
            _record(
                run_dir,
                "start",
                member=self.name,
                phase=self.phase,
                world_size=job.num_tasks,
                slurm_job=job.job_id,
                init_from=cfg.model.init_from,
            )
        try:
            # getattr: a member pickled before evaluate_test existed (a requeue across an upgrade).
            summary = run_phase(cfg, self.phase, evaluate_test=getattr(self, "evaluate_test", True))
        except ResumeRequested as exc:
            if not exc.requeue:
                self._stopped(exc, run_dir, job)
            self._requeue(exc, run_dir, job)
            raise AssertionError("unreachable") from exc  # _stopped and _requeue exit or raise
        except BaseException as exc:
            if main:
                _record(run_dir, "end", outcome="failed", error=repr(exc)[:500])
            raise
        if main:
            _record(run_dir, "end", outcome="completed", best_step=summary.get("best_step"))
        return {
            "member": self.name,
            "run_dir": str(run_dir),
            "best_metric": summary.get("best_metric"),
            "validation": summary.get("validation"),
            "test": summary.get("test"),
        }

    def _stopped(self, exc: BaseException, run_dir: Path, job) -> None:
        """SIGTERM/SIGINT: ``scancel`` ends the job, so it is not requeued (the member used to
        requeue itself and train on, with nothing left to use it). A preemption that requeues
        the job has SLURM requeue it; the rerun resumes from this checkpoint all the same."""
        from radtrain.trainer import EXIT_RESUME

        if job.global_rank == 0:
            _record(run_dir, "end", outcome="stopped", reason=str(exc))
            print(
                f"[radtrain] {self.name}: {exc}; not requeued by radtrain (a TERM/INT signal: scancel, or a "
                "scontrol requeue / preemption that SLURM reruns itself). After a scancel, resubmit the same job "
                "file to continue from this checkpoint.",
                flush=True,
            )
        sys.stdout.flush()
        sys.exit(EXIT_RESUME)

    def _requeue(self, exc: BaseException, run_dir: Path, job) -> None:
        """Every rank saved the checkpoint (the save is collective and ends in a barrier) before any
        rank raised ResumeRequested, so rank 0 may requeue now; the others just leave."""
        from radtrain.trainer import EXIT_RESUME

        main = job.global_rank == 0
        restarts = restart_count()
        if restarts >= self.max_requeues:
            if main:
                _record(run_dir, "end", outcome="requeue_limit", reason=str(exc))
            raise RuntimeError(
                f"{self.name}: stopped on a preemption/timeout signal with a checkpoint saved in {run_dir}, "
                f"but it was already requeued {restarts} times (max_requeues={self.max_requeues}). "
                "Resubmit the "
                "same job file (or raise max_requeues / the time limit) to continue from that checkpoint."
            ) from exc
        if main:
            _record(run_dir, "end", outcome="requeued", reason=str(exc))
            res = subprocess.run(
                ["scontrol", "requeue", job.job_id], capture_output=True, text=True, timeout=60
            )
            if res.returncode != 0:  # e.g. already requeued by the scheduler itself (preemption)
                log.warning("scontrol requeue %s: rc=%d %s", job.job_id, res.returncode, res.stderr.strip())
            print(
                f"[radtrain] {self.name}: checkpoint saved; requeued job {job.job_id} "
                f"(requeue {restarts + 1} of at most {self.max_requeues})",
                flush=True,
            )
        sys.stdout.flush()
        # SystemExit is not an Exception: submitit writes no result file, the job is not over.
        sys.exit(EXIT_RESUME)


class SelectJob(Checkpointable):
    """The last step: best classifier member by validation metric, one test evaluation, publish."""

    def __init__(
        self,
        root: str,
        candidates: list[str],
        metric: str,
        hub: dict[str, Any],
        env: dict[str, str],
        max_requeues: int,
    ) -> None:
        self.root = root
        self.candidates = candidates
        self.metric = metric
        self.hub = hub
        self.env = env
        self.max_requeues = max_requeues

    def checkpoint(self, *args: Any, **kwargs: Any):
        return None if restart_count() >= self.max_requeues else super().checkpoint(*args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        _prepare_process(self.env)
        from radtrain.evaluate import evaluate_model
        from radtrain.export import replace_dir

        root = Path(self.root)
        work = root / "select"
        _record(work, "start", phase="select")
        run_dir, value, scores = pick_best([Path(c) for c in self.candidates], self.metric)
        print(
            f"[radtrain] select: {run_dir.name} has the best validation {self.metric}={value:.4f} "
            f"(all: {scores})",
            flush=True,
        )
        # The one test evaluation of the pipeline's result, on the split nothing before looked at.
        test = evaluate_model(run_dir / "best", None, "test", output=work / "test_metrics.json")
        _record_test(run_dir, test)
        selected = root / "selected"
        tmp = root / "selected.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run_dir / "best", tmp)
        replace_dir(tmp, selected)
        result = {
            "member": run_dir.name,
            "run_dir": str(run_dir),
            "metric": self.metric,
            "value": value,
            "validation": scores,
            "test": test,
            "model_dir": str(selected),
            "published": None,
            "repo_id": self.hub.get("repo_id"),
        }
        # The pipeline's result is recorded before the upload, which can fail on its own (the
        # Hub unreachable from the node): the selection stands, and `radtrain push` retries.
        write_json(root / SELECTION_FILE, result)
        if self.hub.get("repo_id") and offline_env(self.env):
            # `offline: true`: this node has no internet, so a push could only fail (exit 3). The
            # selection is complete; the upload is one command on a node that reaches the Hub.
            from radtrain.hub import push_command

            later = push_command(run_dir, self.hub["repo_id"], self.hub.get("revision"), self.hub.get("private", True),
                                 self.hub.get("commit_message"))
            result["publish_later"] = later
            write_json(root / SELECTION_FILE, result)
            print(f"[radtrain] select: offline job, not publishing from here; from a node with internet run: {later}",
                  flush=True)
        elif self.hub.get("repo_id"):
            from radtrain.hub import PushError

            try:
                result["published"] = _publish(run_dir, self.hub)
            except PushError as exc:
                write_json(root / SELECTION_FILE, {**result, "publish_error": str(exc)})
                _record(work, "end", outcome="completed", member=run_dir.name, published=False)
                raise
            write_json(root / SELECTION_FILE, result)
        _record(work, "end", outcome="completed", member=run_dir.name)
        print(
            f"[radtrain] select: wrote {root / SELECTION_FILE}; model in {selected}"
            + (f"; published to {self.hub['repo_id']}: {result['published']}" if result["published"] else ""),
            flush=True,
        )
        return result


def offline_env(env: dict[str, str] | None) -> bool:
    """Whether the job file turned the Hub off for its jobs (``offline: true``)."""
    value = (env or {}).get("HF_HUB_OFFLINE", "")
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _publish(run_dir: Path, hub: dict[str, Any]) -> str | None:
    from radtrain.hub import publish

    return publish(
        run_dir,
        hub["repo_id"],
        private=hub.get("private", True),
        revision=hub.get("revision"),
        commit_message=hub.get("commit_message"),
    )


def _record_test(run_dir: Path, test: dict[str, float]) -> None:
    """The selection's test metrics into the selected member's summary.json (atomically): members
    of a pipeline with a selection step skip the test split, and the model card and commit message
    (radtrain.hub reads the run's summary.json) must show the one test evaluation there is."""
    path = Path(run_dir) / "summary.json"
    summary = _read_summary(run_dir)
    summary["test"] = test
    summary["test_evaluated_by"] = "selection"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
