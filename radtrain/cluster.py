"""``radtrain submit JOB.yaml``: the two-phase pipeline as SLURM job arrays, through submitit.

One job file describes an experiment: shared run settings (the ``data``/``model``/``train``/
``tracking`` sections of any radtrain config), one section per phase with its sweep and its
cluster resources, and the selection step. ``submit`` turns it into at most three SLURM jobs::

    mlm       array, one member per sweep point
    classify  array, afterok:<mlm>; each member starts from its own MLM member's best/ or the best one
    select    afterok:<classify>; best member by validation metric -> test split once -> publish/copy

Every member is one multi-process job: ``tasks_per_node`` tasks (one per GPU) on ``nodes`` nodes,
each task one training process whose rank comes from SLURM (submitit's distributed environment).
An accelerate YAML named in the job file (DDP, DeepSpeed ZeRO, FSDP) is turned into the very
environment variables ``accelerate launch`` would set, and they are set in-process before the
Accelerator exists.

Preemption and time limits (who owns the signal): SLURM sends USR2 to every task
``signal_delay_s`` before the limit (submitit's ``--signal=USR2@N``; ``scancel --signal=USR2`` or
a preemption does the same). While the training loop runs, its StopFlag owns USR2/SIGTERM on every
rank: the ranks agree at the next optimizer step (one all-reduce), all save the checkpoint (a
collective that ends in a barrier) and raise ``ResumeRequested``; the member then requeues its own
job (``scontrol requeue``, rank 0 only, after every rank has saved) and exits without a result, so
submitit sees the job as unfinished. Outside the loop (data loading, test evaluation) submitit's
own handler keeps USR2 on rank 0: it calls ``checkpoint()`` (there is nothing to save there) and
requeues. The rerun has the same job id and the same run directory (named by member, not by job
id), so it resumes from the newest checkpoint and continues the same tracking run. ``max_requeues``
caps both paths (SLURM_RESTART_COUNT counts the reruns); past it the member fails, keeping its
checkpoints, and resubmitting the same job file continues it.

Nothing heavy is imported at module level: this module is unpickled first thing in every job and
must set the environment (offline flags, accelerate variables) before transformers is imported.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from submitit.helpers import Checkpointable

from radtrain.config import SECTIONS, ConfigError, RunConfig, build_config, config_from_dict, parse_override

log = logging.getLogger(__name__)

PHASES = ("mlm", "classify")
STEPS = ("mlm", "classify", "select")
EVENTS_FILE = "slurm_events.jsonl"
PIPELINE_FILE = "pipeline.json"
SELECTION_FILE = "selection.json"
ROOT_TOKEN = "{root}"
# Run sections a member takes from the job file. `hub` is the selection job's alone: a member
# with hub.repo_id set would publish itself (the classifier phase's own hook).
MEMBER_SECTIONS = tuple(name for name in SECTIONS if name != "hub")

JOB_KEYS = {
    "name",
    "output_dir",
    "max_requeues",
    "offline",
    "accelerate_config",
    "env",
    "synthetic_data",
    "cluster",
    *SECTIONS,
    *STEPS,
}
PHASE_KEYS = {*MEMBER_SECTIONS, "sweep", "resources", "accelerate_config", "env"}
SELECT_KEYS = {"metric", "resources", "env"}
SYNTHETIC_KEYS = {"n_train", "n_validation", "n_test", "seed"}


# --------------------------------------------------------------------------- resources


@dataclass
class Resources:
    """What one member asks SLURM for. ``tasks_per_node`` is the number of training processes per
    node: one per GPU (``gpus_per_node``), or CPU processes over gloo when there is no GPU."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    signal_delay_s: int = 120
    """USR2 this many seconds before the time limit: time to finish a step and save a checkpoint."""
    array_parallelism: int | None = None
    """At most this many members of an array run at once (SLURM's --array=0-N%P)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before srun (module load, conda activate, exports)."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Any other sbatch option, e.g. {mail-type: END, exclude: node12}."""

    def __post_init__(self) -> None:
        for name in ("time_min", "nodes", "tasks_per_node", "signal_delay_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"resources.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ConfigError(f"resources.gpus_per_node must be an integer >= 0, got {self.gpus_per_node!r}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(
                f"resources: tasks_per_node={self.tasks_per_node} but gpus_per_node={self.gpus_per_node}; "
                "radtrain runs one task (training process) per GPU: make them equal"
            )
        if self.signal_delay_s * 2 > self.time_min * 60:
            raise ConfigError(
                f"resources.signal_delay_s={self.signal_delay_s} leaves too little of "
                f"time_min={self.time_min} "
                "minutes to train; raise time_min or lower signal_delay_s"
            )
        if not isinstance(self.setup, list) or not all(isinstance(x, str) for x in self.setup):
            raise ConfigError("resources.setup must be a list of shell lines")
        if not isinstance(self.additional, dict):
            raise ConfigError("resources.additional must be a mapping of sbatch options")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def sbatch_parameters(self, job_name: str, dependency: str | None = None) -> dict[str, Any]:
        """The parameters of submitit's SlurmExecutor (``update_parameters``) for this job."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "signal_delay_s": self.signal_delay_s,
            # --requeue: clusters may default JobRequeue=0, and our members requeue themselves.
            "additional_parameters": {"requeue": True, **self.additional},
        }
        optional = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "cpus_per_task": self.cpus_per_task,
            "gpus_per_node": self.gpus_per_node or None,
            "mem": _mem(self.mem_gb) if self.mem_gb else None,
            "setup": list(self.setup) or None,
            "dependency": dependency,
            "array_parallelism": self.array_parallelism,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if float(gb).is_integer() else f"{int(gb * 1024)}MB"


def _resources(*layers: dict[str, Any] | None, where: str) -> Resources:
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: resources must be a mapping, got {layer!r}")
        merged.update(layer)
    known = Resources.__dataclass_fields__
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown resources key(s) {unknown}; valid: {', '.join(known)}")
    return Resources(**merged)


# --------------------------------------------------------------------------- the job file


@dataclass
class Member:
    phase: str
    index: int
    name: str
    run_dir: Path
    point: dict[str, Any]
    config: RunConfig
    init_from_best: list[Path] | None = None
    """Classifier members in 'best' mode: the MLM run dirs to choose from when the job starts."""


@dataclass
class Step:
    name: str  # mlm | classify | select
    job_name: str
    resources: Resources
    members: list[Member]
    env: dict[str, str]
    depends_on: str | None = None

    @property
    def is_array(self) -> bool:
        return len(self.members) > 1


@dataclass
class Pipeline:
    name: str
    root: Path
    job_file: Path
    max_requeues: int
    steps: list[Step]
    synthetic_data: dict[str, int] | None
    hub: dict[str, Any]
    select_metric: str | None
    selection_candidates: list[Member]


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    """Dotted override into the job file: ``mlm.train.lr=1e-4``; below a ``sweep`` mapping the rest
    of the key is one sweep key (``mlm.sweep.train.seed=[1,2]``)."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if part == "sweep" and i > 0:
            sweep = node.get("sweep")
            if sweep is None:
                sweep = node["sweep"] = {}
            if not isinstance(sweep, dict):
                raise ConfigError(
                    f"override {key}: {'.'.join(parts[: i + 1])} is a list of points; replace it whole"
                )
            sweep[".".join(parts[i + 1 :])] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _substitute(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(ROOT_TOKEN, root)
    if isinstance(value, list):
        return [_substitute(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, root) for k, v in value.items()}
    return value


def _check_keys(section: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"job file: {where} must be a mapping, got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(
            f"job file: unknown key(s) {unknown} in {where}; valid: {', '.join(sorted(allowed))}"
        )
    return section


def sweep_points(sweep: Any, where: str) -> list[dict[str, Any]]:
    """A mapping {dotted key: [values]} is a grid (every combination, keys in file order); a list of
    mappings is an explicit list of points. No sweep is one point."""
    if sweep is None or sweep == {} or sweep == []:
        return [{}]
    if isinstance(sweep, dict):
        keys = list(sweep)
        values = []
        for key in keys:
            options = sweep[key] if isinstance(sweep[key], list) else [sweep[key]]
            if not options:
                raise ConfigError(f"{where}.sweep.{key} is an empty list")
            values.append(options)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    if isinstance(sweep, list) and all(isinstance(p, dict) for p in sweep):
        return [dict(p) for p in sweep]
    raise ConfigError(
        f"{where}.sweep must be a mapping of key: [values] (a grid) or a list of mappings (points)"
    )


def member_name(index: int, point: dict[str, Any]) -> str:
    """m<i> plus the sweep values, filesystem-safe: m0_lr0.0001_seed1."""
    tag = "".join(f"_{key.split('.')[-1]}{value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"m{index}{tag}")[:100]


def _flat_sections(tree: dict[str, Any], sections: tuple[str, ...], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section in sections:
        values = tree.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"job file: {where}{section} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def _absolute_if_local(value: Any) -> Any:
    """A relative path that exists here becomes absolute (jobs may start elsewhere); Hub ids stay."""
    if isinstance(value, str) and value and not value.startswith("scratch:"):
        path = Path(value).expanduser()
        if not path.is_absolute() and path.exists():
            return str(path.resolve())
    return value


def _member_config(flat: dict[str, Any], where: str) -> RunConfig:
    for key in ("data.source", "data.label_names", "model.name", "model.init_from"):
        if key in flat:
            flat[key] = _absolute_if_local(flat[key])
    unknown = [k for k in flat if k.startswith("hub.")]
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]} belongs in the job file's top-level hub section "
            "(the selection job publishes)"
        )
    try:
        return build_config(flat)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_job(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read a job file, apply dotted overrides, and plan every member (configs are validated here,
    on the login node, so a typo fails before anything is queued)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist (see jobs/demo.yaml for the format)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"job file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"job file {path} must be a mapping (output_dir:, data:, mlm:, classify:, select:)")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    _check_keys(tree, JOB_KEYS, "the top level")
    root = Path(str(tree.get("output_dir") or f"runs/{path.stem}")).expanduser().resolve()
    tree = _substitute(tree, str(root))
    name = str(tree.get("name") or path.stem)
    max_requeues = tree.get("max_requeues", 3)
    if not isinstance(max_requeues, int) or max_requeues < 0:
        raise ConfigError(f"job file: max_requeues must be an integer >= 0, got {max_requeues!r}")
    synthetic = tree.get("synthetic_data")
    if synthetic is not None:
        synthetic = dict(_check_keys(synthetic, SYNTHETIC_KEYS, "synthetic_data"))
    cluster = _check_keys(tree.get("cluster"), set(Resources.__dataclass_fields__), "cluster")
    base_env = _env_section(tree.get("env"), "env")
    if tree.get("offline"):
        # Compute nodes without internet: everything comes from the cache `radtrain prefetch` filled.
        base_env = {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **base_env,
        }
    shared = _flat_sections(tree, MEMBER_SECTIONS, "")
    hub = dict(_check_keys(tree.get("hub"), {f.name for f in dataclasses.fields(SECTIONS["hub"])}, "hub"))
    build_config({f"hub.{k}": v for k, v in hub.items()})  # validate repo_id etc. now

    steps: list[Step] = []
    mlm_members: list[Member] = []
    for phase in PHASES:
        section = tree.get(phase)
        if section is None:
            continue
        allowed = PHASE_KEYS | ({"init_from"} if phase == "classify" else set())
        section = _check_keys(section, allowed, phase)
        resources = _resources(cluster, section.get("resources"), where=f"{phase}.resources")
        accel = section.get("accelerate_config", tree.get("accelerate_config"))
        env = {
            **base_env,
            **(accelerate_env(accel) if accel else {}),
            **_env_section(section.get("env"), f"{phase}.env"),
        }
        phase_flat = {**shared, **_flat_sections(section, MEMBER_SECTIONS, f"{phase}.")}
        points = sweep_points(section.get("sweep"), phase)
        members: list[Member] = []
        if phase == "mlm":
            for i, point in enumerate(points):
                members.append(_plan_member(phase, i, point, phase_flat, root, None))
            mlm_members = members
        else:
            mode = section.get("init_from", "own" if mlm_members else None)
            if mode in ("own", "best") and not mlm_members:
                raise ConfigError(
                    f"classify.init_from={mode} needs an mlm section; "
                    "without one give a model directory or null"
                )
            if mode == "own":
                index = 0
                for parent in mlm_members:
                    for j, point in enumerate(points):
                        member = _plan_member(
                            phase, index, point, phase_flat, root, str(parent.run_dir / "best")
                        )
                        member.name = (
                            parent.name
                            if len(points) == 1
                            else f"{parent.name}-{member_name(j, member.point)}"
                        )
                        member.run_dir = root / phase / member.name
                        member.config.output_dir = str(member.run_dir)
                        members.append(member)
                        index += 1
            else:
                fixed = None if mode in ("best", None) else _absolute_if_local(str(mode))
                if fixed is not None and not Path(fixed).exists() and str(fixed).count("/") != 1:
                    raise ConfigError(
                        f"classify.init_from={mode!r}: give own, best, null, a model directory that exists "
                        "or a Hub id (org/name)"
                    )
                for i, point in enumerate(points):
                    member = _plan_member(phase, i, point, phase_flat, root, fixed)
                    if mode == "best":
                        member.init_from_best = [m.run_dir for m in mlm_members]
                    members.append(member)
        _check_unique(members, phase)
        depends = steps[-1].name if steps else None
        steps.append(Step(phase, f"{name}-{phase}", resources, members, env, depends))

    select_metric = None
    candidates: list[Member] = []
    select = tree.get("select")
    if select is not None:
        select = _check_keys(select, SELECT_KEYS, "select")
        classify = next((s for s in steps if s.name == "classify"), None)
        if classify is None:
            raise ConfigError(
                "job file: select needs a classify section (it picks among the classifier members)"
            )
        candidates = classify.members
        select_metric = select.get("metric") or candidates[0].config.train.metric_for_best
        # One process: it evaluates one model once. A GPU if the cluster has them.
        one = {
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": min(1, int(cluster.get("gpus_per_node", 0) or 0)),
        }
        resources = _resources(cluster, one, select.get("resources"), where="select.resources")
        env = {**base_env, **_env_section(select.get("env"), "select.env")}
        steps.append(Step("select", f"{name}-select", resources, [], env, "classify"))
    if not steps:
        raise ConfigError("job file: nothing to submit; give an mlm and/or classify section")
    return Pipeline(
        name, root, path.resolve(), max_requeues, steps, synthetic, hub, select_metric, candidates
    )


def _env_section(section: Any, where: str) -> dict[str, str]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"job file: {where} must be a mapping of environment variables")
    return {str(k): str(v) for k, v in section.items()}


def _plan_member(
    phase: str, index: int, point: dict[str, Any], flat: dict[str, Any], root: Path, init_from: str | None
) -> Member:
    values = {**flat, **point}
    if phase == "classify":
        values["model.init_from"] = init_from
    cfg = _member_config(values, f"{phase} sweep point {index} {point}")
    # Names and listings show the values as the run uses them (YAML reads 1e-4 as a string).
    point = {key: _config_value(cfg, key) for key in point}
    name = member_name(index, point)
    run_dir = root / phase / name
    cfg.output_dir = str(run_dir)
    return Member(phase, index, name, run_dir, point, cfg)


def _config_value(cfg: RunConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if name else getattr(cfg, section)


def _check_unique(members: list[Member], phase: str) -> None:
    dirs = [m.run_dir for m in members]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"{phase}: two sweep points map to the same run directory; make the points differ")


# --------------------------------------------------------------------------- accelerate configs


ACCELERATE_ENV_PREFIXES = ("ACCELERATE_", "FSDP_", "MEGATRON_LM_", "PARALLELISM_CONFIG_")


def accelerate_env(config_file: str | Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file F`` gives its processes, for processes that
    SLURM starts instead (one task per GPU): computed by accelerate's own launch code, so DeepSpeed
    (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ..._ZERO_STAGE, ...), FSDP and DDP
    settings match ``accelerate launch`` exactly. Launch-only keys of the YAML (num_processes,
    num_machines, machine_rank, main_process_ip/port) are ignored: the job's resources decide those.
    """
    path = Path(str(config_file)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"accelerate_config {config_file} does not exist (paths are relative to the submit directory)"
        )
    path = path.resolve()
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "--module", "radtrain"])
    accel_log = logging.getLogger("accelerate.commands.launch")
    level = accel_log.level
    accel_log.setLevel(logging.ERROR)  # "values were not passed to accelerate launch" noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the port-in-use check is about a launch that never happens
            args, defaults, mp_from_config = _validate_launch_command(args)
            if args.use_deepspeed:
                # As accelerate's launch_command does before deepspeed_launcher.
                fields = list(defaults.deepspeed_config.keys()) if defaults else []
                if mp_from_config:
                    fields.append("mixed_precision")
                args.deepspeed_fields_from_accelerate_config = ",".join(fields)
                _, env = prepare_deepspeed_cmd_env(args)
            elif args.use_fsdp or args.multi_gpu or args.use_megatron_lm:
                env = prepare_multi_gpu_env(args)
            else:
                _, env = prepare_simple_launcher_cmd_env(args)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"accelerate_config {path}: accelerate rejects it: {exc}") from exc
    finally:
        accel_log.setLevel(level)
    out = {k: str(v) for k, v in sorted(env.items()) if k.startswith(ACCELERATE_ENV_PREFIXES)}
    ds_file = out.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none":
        # accelerate launch reads it relative to the launch directory; jobs may start elsewhere.
        candidates = [Path(ds_file).expanduser(), path.parent / ds_file]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"accelerate_config {path}: its deepspeed_config_file {ds_file} does not exist")
        out["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(found.resolve())
    return out


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
    job = _job_env()
    if job.num_tasks > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM's task variables. All GPUs of
        # the node stay visible: accelerate selects cuda:LOCAL_RANK itself. overwrite: a job submitted
        # from inside another job must not keep its parent's ranks.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
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
    ) -> None:
        self.phase = phase
        self.name = name
        self.config = config
        self.env = env
        self.max_requeues = max_requeues
        self.init_from_best = init_from_best

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
            parent, value, scores = pick_best([Path(p) for p in self.init_from_best])
            config["model"]["init_from"] = str(parent / "best")
            if job.global_rank == 0:
                print(
                    f"[radtrain] {self.name}: starting from {parent / 'best'} (MLM validation {scores})",
                    flush=True,
                )
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
            summary = run_phase(cfg, self.phase)
        except ResumeRequested as exc:
            self._requeue(exc, run_dir, job)
            raise AssertionError("unreachable") from exc  # _requeue exits or raises
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
        selected = root / "selected"
        tmp = root / "selected.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run_dir / "best", tmp)
        replace_dir(tmp, selected)
        published = None
        if self.hub.get("repo_id"):
            published = _publish(run_dir, self.hub)
        result = {
            "member": run_dir.name,
            "run_dir": str(run_dir),
            "metric": self.metric,
            "value": value,
            "validation": scores,
            "test": test,
            "model_dir": str(selected),
            "published": published,
            "repo_id": self.hub.get("repo_id"),
        }
        text = json.dumps(result, indent=1)
        (root / (SELECTION_FILE + ".tmp")).write_text(text)
        os.replace(root / (SELECTION_FILE + ".tmp"), root / SELECTION_FILE)
        _record(work, "end", outcome="completed", member=run_dir.name)
        print(
            f"[radtrain] select: wrote {root / SELECTION_FILE}; model in {selected}"
            + (f"; published to {self.hub['repo_id']}: {published}" if published else ""),
            flush=True,
        )
        return result


def _publish(run_dir: Path, hub: dict[str, Any]) -> str | None:
    try:
        from radtrain.hub import publish
    except ImportError as exc:  # the publisher ships separately; the copy in selected/ stands
        log.warning(
            "hub.repo_id=%s but radtrain.hub is not available (%s); model left in selected/",
            hub["repo_id"],
            exc,
        )
        return None
    return publish(
        run_dir,
        hub["repo_id"],
        private=hub.get("private", True),
        revision=hub.get("revision"),
        commit_message=hub.get("commit_message"),
    )


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
        )
        for m in step.members
    ]


def _member_lines(pipeline: Pipeline, step: Step, job_id: str) -> list[str]:
    lines = []
    if step.name == "select":
        lines.append(
            f"    -> {pipeline.root / SELECTION_FILE}, model in {pipeline.root / 'selected'}"
            f"{', published to ' + pipeline.hub['repo_id'] if pipeline.hub.get('repo_id') else ''}"
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
    return (_data_dir(pipeline) / "train.jsonl").is_file()


def _check_existing_runs(pipeline: Pipeline) -> None:
    """A resubmission continues members from their checkpoints; one whose settings changed would
    only fail on the compute node (fingerprint check): refuse it here."""
    from radtrain.phase import check_run_dir

    for step in pipeline.steps:
        for m in step.members:
            if (m.run_dir / "checkpoints").is_dir():
                check_run_dir(m.config, m.phase, step.resources.world_size)


def submit(pipeline: Pipeline) -> dict[str, str]:
    """Queue every step; returns {step: job id} (an array's id for arrays)."""
    import submitit
    from submitit.helpers import clean_env

    if pipeline.synthetic_data and not _has_data(pipeline):
        from radtrain.data.synthetic import write_dataset

        write_dataset(_data_dir(pipeline), **pipeline.synthetic_data)
    _check_existing_runs(pipeline)
    pipeline.root.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    jobs: dict[str, list[Any]] = {}
    # Submitting from inside a SLURM job would hand the children our SLURM_*/RANK variables.
    with clean_env():
        for step in pipeline.steps:
            executor = submitit.SlurmExecutor(
                folder=log_folder(pipeline.root), max_num_timeout=pipeline.max_requeues
            )
            dependency = f"afterok:{ids[step.depends_on]}" if step.depends_on else None
            executor.update_parameters(**step.resources.sbatch_parameters(step.job_name, dependency))
            with executor.batch():
                submitted = [executor.submit(fn) for fn in _callables(pipeline, step)]
            jobs[step.name] = submitted
            ids[step.name] = submitted[0].job_id.split("_")[0]
    record = {
        "name": pipeline.name,
        "root": str(pipeline.root),
        "job_file": str(pipeline.job_file),
        "submitted_at": time.time(),
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
        },
    }
    tmp = pipeline.root / (PIPELINE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, pipeline.root / PIPELINE_FILE)
    return ids


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
        description="Submit jobs/<experiment>.yaml with submitit. Overrides edit the job file: train.lr=1e-4 "
        "(both phases), mlm.train.epochs=1, mlm.sweep.train.seed=[1,2], classify.resources.time_min=30, "
        "output_dir=runs/x (the pipeline root), select=null (no selection step).",
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
