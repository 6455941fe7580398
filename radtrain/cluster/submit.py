"""Submission: sbatch rendering, the dependency graph for people, and `radtrain submit`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from radtrain.cluster.jobfile import PIPELINE_FILE, SELECTION_FILE, Pipeline, Step, load_job
from radtrain.cluster.jobs import MemberJob, SelectJob
from radtrain.config import ConfigError
from radtrain.io import write_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- submission


def log_folder(root: Path) -> Path:
    """submitit's folder: one per job (%j), so array members and ranks never share a log file:
    <root>/logs/<array>_<member>/<array>_<member>_<rank>_log.{out,err}."""
    return root / "logs" / "%j"


def submitit_command(root: Path) -> str:
    return " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(log_folder(root)))]
    )


def sbatch_script(pipeline: Pipeline, step: Step, dependency: str | None) -> str:
    """The sbatch file submitit writes for this step, rendered by submitit's own function (it needs
    no SLURM, so --dry-run works anywhere)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = step.resources.sbatch_parameters(step.job_name, dependency)
    count = len(step.members) if step.is_array else None
    return _make_sbatch_string(
        command=submitit_command(pipeline.root), folder=log_folder(pipeline.root), map_count=count, **params
    )


def _callables(pipeline: Pipeline, step: Step) -> list[Any]:
    # With a selection step only the selection job reads the test split (once, the chosen member).
    selecting = any(s.name == "select" for s in pipeline.steps)
    if step.name == "select":
        return [
            SelectJob(
                str(pipeline.root),
                [str(m.run_dir) for m in pipeline.selection_candidates],
                pipeline.select_metric or "f1",
                pipeline.hub,
                step.env,
                pipeline.max_requeues,
            )
        ]
    return [
        MemberJob(
            step.name,
            m.name,
            m.config.to_dict(),
            step.env,
            pipeline.max_requeues,
            [str(p) for p in m.init_from_best] if m.init_from_best else None,
            evaluate_test=not selecting,
        )
        for m in step.members
    ]


def _publish_note(pipeline: Pipeline, step: Step) -> str:
    from radtrain.cluster.jobs import offline_env

    repo = pipeline.hub.get("repo_id")
    if not repo:
        return ""
    if offline_env(step.env):
        return (f"; offline job (offline: true): not published from the node, selection.json gives the "
                f"`radtrain push ... --repo-id {repo}` to run from a node with internet")
    return f", published to {repo}"


def _member_lines(pipeline: Pipeline, step: Step, job_id: str) -> list[str]:
    lines = []
    if step.name == "select":
        lines.append(
            f"    -> {pipeline.root / SELECTION_FILE}, model in {pipeline.root / 'selected'}"
            f"{_publish_note(pipeline, step)}"
        )
        lines.append(f"       log {pipeline.root / 'logs' / job_id}/")
        return lines
    for m in step.members:
        jid = f"{job_id}_{m.index}" if step.is_array else job_id
        init = ""
        if step.name == "classify":
            init = (
                " init_from=best MLM member by validation loss"
                if m.init_from_best
                else f" init_from={m.config.model.init_from}"
            )
        point = " ".join(f"{k}={v}" for k, v in m.point.items())
        lines.append(f"    [{m.index}] {m.name}: {point or '(no sweep)'}{init}")
        lines.append(f"        run dir {m.run_dir}  log {pipeline.root / 'logs' / jid}/")
    return lines


def describe(pipeline: Pipeline, ids: dict[str, str]) -> str:
    """The dependency graph, members, run directories and log folders, for people."""
    out = [f"[radtrain submit] {pipeline.name}: root {pipeline.root} (max_requeues={pipeline.max_requeues})"]
    out += [f"  override: {line}" for line in pipeline.replaced]
    for step in pipeline.steps:
        res = step.resources
        shape = f"array 0-{len(step.members) - 1}" if step.is_array else "single job"
        dep = f", afterok:{ids[step.depends_on]}" if step.depends_on else ""
        out.append(
            f"  {step.name:<8} job {ids[step.name]} ({shape}{dep}): "
            f"{res.nodes} node(s) x {res.tasks_per_node} "
            f"task(s){f' x {res.gpus_per_node} GPU(s)' if res.gpus_per_node else ''}, {res.time_min} min"
        )
        out += _member_lines(pipeline, step, ids[step.name])
        shown = {k: v for k, v in step.env.items() if "TOKEN" not in k.upper()}
        if shown:
            out.append("    env " + " ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(out)


def dry_run(pipeline: Pipeline) -> str:
    ids = {s.name: f"<{s.name} job id>" for s in pipeline.steps}
    parts = [describe(pipeline, ids)]
    if pipeline.synthetic_data and not _has_data(pipeline):
        parts.append(
            f"(submit would first write synthetic data to {_data_dir(pipeline)}: {pipeline.synthetic_data})"
        )
    for step in pipeline.steps:
        dependency = f"afterok:{ids[step.depends_on]}" if step.depends_on else None
        parts.append(f"----- sbatch script: {step.name} -----\n{sbatch_script(pipeline, step, dependency)}")
    parts.append("(dry run: nothing submitted)")
    return "\n".join(parts)


def _data_dir(pipeline: Pipeline) -> Path:
    first = pipeline.steps[0].members[0] if pipeline.steps[0].members else pipeline.selection_candidates[0]
    return Path(first.config.data.source)


def _has_data(pipeline: Pipeline) -> bool:
    # All four files, not just train.jsonl: a generation killed half-way is written again.
    from radtrain.data.synthetic import dataset_complete

    return dataset_complete(_data_dir(pipeline))


SYNTHETIC_RECORD = "synthetic.json"  # the synthetic_data settings the root's data was written with


def _synthetic_settings(pipeline: Pipeline) -> dict[str, Any]:
    """The job file's synthetic_data with write_dataset's defaults for what it leaves out."""
    import inspect

    from radtrain.data.synthetic import write_dataset

    defaults = {
        name: p.default for name, p in inspect.signature(write_dataset).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **(pipeline.synthetic_data or {})}


def _check_synthetic_data(pipeline: Pipeline) -> None:
    """The root's synthetic data is written once and reused; a job file (or override) asking for
    other synthetic_data settings was ignored without a word, and the members resumed on the
    old data. Refuse it, naming both."""
    if not pipeline.synthetic_data or not _has_data(pipeline):
        return
    data_dir = _data_dir(pipeline)
    wanted = _synthetic_settings(pipeline)
    try:
        written = json.loads((data_dir / SYNTHETIC_RECORD).read_text())
        if not isinstance(written, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):  # written before the record existed (or a torn one): the sizes
        written = {
            f"n_{split}": sum(1 for _ in (data_dir / f"{split}.jsonl").open()) for split in ("train", "validation", "test")
        }
    # Only what the record holds: a setting write_dataset gains later does not refuse old data.
    wanted = {k: v for k, v in wanted.items() if k in written}
    differing = {k: (written.get(k), v) for k, v in wanted.items() if written.get(k) != v}
    if differing:
        shown = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in differing.items())
        raise ConfigError(
            f"{data_dir} holds synthetic data written with other synthetic_data settings ({shown}); this pipeline's "
            "members would train on the old data. Use a new output_dir, or delete that data folder and the run "
            "directories trained on it."
        )


def _check_existing_runs(pipeline: Pipeline) -> None:
    """A resubmission continues members from their checkpoints; one whose settings changed would
    only fail on the compute node (fingerprint check): refuse it here."""
    import dataclasses

    from radtrain.cluster.jobs import chosen_parent
    from radtrain.phase import check_run_dir

    for step in pipeline.steps:
        for m in step.members:
            if not (m.run_dir / "checkpoints").is_dir():
                continue
            config = m.config
            parent = chosen_parent(m.run_dir, m.init_from_best) if m.init_from_best else None
            if parent is not None:  # 'best' mode: planned without init_from, chosen when it started
                config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=str(parent / "best")))
            check_run_dir(config, m.phase, step.resources.world_size)


def _live_jobs(job_ids: list[str], job_names: set[str]) -> list[str]:
    """'<id> <state>' for each of these jobs (array tasks included) still queued or running and
    still this pipeline's: the same job name and this user (SLURM reuses ids after a wrap or a
    reset, and a root may come from another cluster). None where squeue is missing (a dry run away
    from SLURM) or knows none of them (finished)."""
    import getpass

    if not job_ids or shutil.which("squeue") is None:
        return []
    try:
        res = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %j %u", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("squeue: %s; not checking for a pipeline still running in this root", exc)
        return []
    if res.returncode != 0:  # every id unknown: all of them finished long ago
        return []
    user = getpass.getuser()
    live = []
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in job_names and fields[3] == user:
            live.append(f"{fields[0]} {fields[1]}")
    return live


def _check_no_live_pipeline(pipeline: Pipeline) -> None:
    """A second pipeline submitted into a root whose first is still queued or running trained the
    same run directories at once (duplicated metrics rows, best/ from whichever wrote last) and
    replaced the first's record: refuse it, naming the jobs."""
    path = pipeline.root / PIPELINE_FILE
    try:
        record = json.loads(path.read_text())
        ids = [str(step["job_id"]) for step in record.get("steps", {}).values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no record, or one we cannot read: nothing known to be running
    live = _live_jobs(ids, {step.job_name for step in pipeline.steps})
    if live:
        jobs = sorted({entry.split()[0].split("_")[0] for entry in live})
        raise ConfigError(
            f"{pipeline.root} holds a pipeline whose jobs are still queued or running ({', '.join(live[:8])}"
            f"{', ...' if len(live) > 8 else ''}; {path}): another would train the same run directories at the "
            f"same time. Wait for them to end, or cancel them first (scancel {' '.join(jobs)}), then submit again: "
            "members continue from their checkpoints."
        )


def _keep_previous_record(pipeline: Pipeline) -> None:
    """A resubmission's record replaces pipeline.json: the earlier one is kept beside it (its job
    ids are where the earlier runs' logs are)."""
    path = pipeline.root / PIPELINE_FILE
    if path.is_file():
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"pipeline.{stamp}.json")
        number = 1
        while kept.exists():  # two submits in one second: keep both
            number += 1
            kept = path.with_name(f"pipeline.{stamp}-{number}.json")
        os.replace(path, kept)


def check_before_submit(pipeline: Pipeline) -> None:
    """What would make the queued jobs fail or collide, refused on the login node (submit and
    the dry run alike)."""
    _check_synthetic_data(pipeline)
    _check_existing_runs(pipeline)
    _check_no_live_pipeline(pipeline)


def submit(pipeline: Pipeline) -> dict[str, str]:
    """Queue every step; returns {step: job id} (an array's id for arrays)."""
    import submitit
    from submitit.helpers import clean_env

    check_before_submit(pipeline)
    if pipeline.synthetic_data and not _has_data(pipeline):
        from radtrain.data.synthetic import write_dataset

        out = write_dataset(_data_dir(pipeline), **pipeline.synthetic_data)
        write_json(out / SYNTHETIC_RECORD, _synthetic_settings(pipeline))  # atomic
    pipeline.root.mkdir(parents=True, exist_ok=True)
    _keep_previous_record(pipeline)
    ids: dict[str, str] = {}
    submitted_at = time.time()
    # Submitting from inside a SLURM job would hand the children our SLURM_*/RANK variables.
    with clean_env():
        for step in pipeline.steps:
            try:
                executor = submitit.SlurmExecutor(
                    folder=log_folder(pipeline.root), max_num_timeout=pipeline.max_requeues
                )
                dependency = f"afterok:{ids[step.depends_on]}" if step.depends_on else None
                executor.update_parameters(**step.resources.sbatch_parameters(step.job_name, dependency))
                with executor.batch():
                    submitted = [executor.submit(fn) for fn in _callables(pipeline, step)]
            except Exception as exc:
                # The steps queued so far would run (or wait forever on a dependency) with nobody
                # knowing their ids: cancel them and say so, in the record too.
                cancelled = _cancel(list(ids.values()))
                _write_record(
                    pipeline,
                    ids,
                    submitted_at,
                    failed={"step": step.name, "error": repr(exc)[:1000], "cancelled": cancelled},
                )
                queued = ", ".join(f"{k} {v}" for k, v in ids.items()) or "none"
                raise SubmitError(
                    f"submitting step {step.name!r} failed: {exc}. Already queued: {queued}; "
                    f"{'cancelled them (scancel)' if cancelled == list(ids.values()) else 'cancel them by hand'}"
                    f"; record in {pipeline.root / PIPELINE_FILE}"
                ) from exc
            ids[step.name] = submitted[0].job_id.split("_")[0]
            # After every step, so a failure later (or a crash of this process) loses no job id.
            _write_record(pipeline, ids, submitted_at)
    return ids


class SubmitError(ConfigError):
    """sbatch refused a step (unknown partition, account, limits...); the steps queued before it
    were cancelled. A ConfigError, so the CLI prints the message and exits 2."""


def _cancel(job_ids: list[str]) -> list[str]:
    """scancel each id; returns those cancelled (scancel answered 0)."""
    done = []
    for job_id in job_ids:
        try:
            res = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scancel %s: %s", job_id, exc)
            continue
        if res.returncode == 0:
            done.append(job_id)
        else:
            log.warning("scancel %s: rc=%d %s", job_id, res.returncode, res.stderr.strip())
    return done


def _write_record(
    pipeline: Pipeline, ids: dict[str, str], submitted_at: float, failed: dict[str, Any] | None = None
) -> None:
    """<root>/pipeline.json, atomically: the steps queued so far (all of them once complete)."""
    record: dict[str, Any] = {
        "name": pipeline.name,
        "root": str(pipeline.root),
        "job_file": str(pipeline.job_file),
        "submitted_at": submitted_at,
        "complete": failed is None and len(ids) == len(pipeline.steps),
        "steps": {
            s.name: {
                "job_id": ids[s.name],
                "depends_on": ids.get(s.depends_on) if s.depends_on else None,
                "members": [
                    {
                        "name": m.name,
                        "run_dir": str(m.run_dir),
                        "job_id": f"{ids[s.name]}_{m.index}" if s.is_array else ids[s.name],
                    }
                    for m in s.members
                ],
                "logs": str(pipeline.root / "logs"),
            }
            for s in pipeline.steps
            if s.name in ids
        },
    }
    if failed is not None:
        record["failed"] = failed
    tmp = pipeline.root / (PIPELINE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, pipeline.root / PIPELINE_FILE)


# --------------------------------------------------------------------------- CLI


def cmd_submit(args: argparse.Namespace) -> int:
    # argparse cannot take options between two positional lists; overrides come as a remainder.
    dry = args.dry_run or "--dry-run" in args.overrides
    overrides = [a for a in args.overrides if a != "--dry-run"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"submit: unknown option(s) {flags}; options: --dry-run")
    pipeline = load_job(args.job, overrides)
    if dry:
        check_before_submit(pipeline)  # the dry run said yes to what submit then refused
        print(dry_run(pipeline))
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run `radtrain submit` on a SLURM login node (or use --dry-run)")
    ids = submit(pipeline)
    print(describe(pipeline, ids))
    print(f"pipeline record: {pipeline.root / PIPELINE_FILE}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit a job file to SLURM: MLM array -> classifier array (afterok) -> selection",
        description="Submit jobs/<experiment>.yaml with submitit. Overrides edit the job file: train.epochs=1 "
        "(both phases, replacing a phase's own value), mlm.train.epochs=1 (one phase), "
        "mlm.sweep.train.seed=[1,2] (a swept key is changed in its sweep), cluster.time_min=30 (every "
        "step), classify.resources.time_min=30, output_dir=runs/x (the pipeline root), select=null (no "
        "selection step).",
    )
    p.add_argument("job", help="the job file, e.g. jobs/demo.yaml")
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch scripts and the dependency graph only"
    )
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="dotted job-file overrides, e.g. mlm.train.lr=1e-4 output_dir=runs/x",
    )
    p.set_defaults(func=cmd_submit)
