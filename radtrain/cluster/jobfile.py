"""The job file: resources, sweeps, and the planned members/steps of a pipeline (login node)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radtrain.cluster.launch_env import accelerate_env
from radtrain.config import (
    PHASES,
    SECTIONS,
    ConfigError,
    RunConfig,
    build_config,
    parse_override,
    read_yaml_mapping,
)

log = logging.getLogger(__name__)

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
            # --kill-on-invalid-dep: a job whose afterok dependency failed is cancelled, instead of
            # pending forever as DependencyNeverSatisfied (clusters that do not set it by default).
            "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes", **self.additional},
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
        # additional: sbatch options, merged option by option (a step's mail-type must not drop
        # the cluster's exclude).
        before, extra = merged.get("additional"), layer.get("additional")
        merged.update(layer)
        if isinstance(before, dict) and isinstance(extra, dict):
            merged["additional"] = {**before, **extra}
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
    replaced: list[str] = field(default_factory=list)
    """Step values of the job file that a shared command-line override replaced (shown by submit)."""


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


def _step_path(key: str) -> tuple[tuple[str, ...], list[str]] | None:
    """Where a top-level key lives inside a step's section, and which steps have it:
    ``train.lr`` is ``<phase>.train.lr``, ``cluster.time_min`` is ``<step>.resources.time_min``."""
    head, *rest = key.split(".")
    if head in MEMBER_SECTIONS and rest:
        return PHASES, [head, *rest]
    if head == "cluster" and rest:
        return STEPS, ["resources", *rest]
    if head == "env" and rest:
        return STEPS, ["env", *rest]
    if head == "accelerate_config" and not rest:
        return PHASES, ["accelerate_config"]
    return None


def _sweep_keys(sweep: Any) -> set[str]:
    if isinstance(sweep, dict):
        return set(sweep)
    if isinstance(sweep, list):
        return {key for point in sweep if isinstance(point, dict) for key in point}
    return set()


def _dotted(key: str, value: Any) -> list[tuple[str, Any]]:
    """``train={epochs: 1}`` is ``train.epochs=1``: a mapping given for a section sets its keys
    and keeps the section's others (it replaced the whole section: batch_size and the rest of
    the file's train: were gone). A sweep is replaced whole (its points are one value)."""
    if not isinstance(value, dict) or not value or "sweep" in key.split("."):
        return [(key, value)]
    return [item for sub, v in value.items() for item in _dotted(f"{key}.{sub}", v)]


def _top_level_overrides_reach_every_step(tree: dict[str, Any], overrides: list[tuple[str, Any]]) -> list[str]:
    """A command-line override of a shared key (``train.lr=1e-4``, ``cluster.time_min=30``) is
    meant for every step, so it replaces what a step's own section sets for that key: in the
    file a step's section wins over the shared one, and the override used to be lost there without
    a word (jobs/rocov2_large.yaml's classifier kept its lr). A step key given on the command line
    too (``classify.train.lr=...``, ``classify.resources.time_min=...``) is more specific and
    stays. A swept key is refused: a sweep's values are replaced in the sweep itself. Returns a
    line per replaced value, for the submit listing."""
    given = [key for key, _ in overrides]
    replaced = []
    for key, value in overrides:
        where = _step_path(key)
        if where is None:
            continue
        steps, path = where
        sweeps = [s for s in steps if isinstance(tree.get(s), dict) and key in _sweep_keys(tree[s].get("sweep"))]
        if sweeps:
            instead = " ".join(f"{s}.sweep.{key}=[{value}]" for s in sweeps)
            raise ConfigError(
                f"override {key}={value}: the {' and '.join(sweeps)} sweep{'s' if len(sweeps) > 1 else ''} "
                f"var{'y' if len(sweeps) > 1 else 'ies'} {key}, so one value for every member would undo "
                f"{'them' if len(sweeps) > 1 else 'it'}; give {instead} instead of {key}={value} to train only that "
                "value (or other values in the list)"
            )
        for step in steps:
            section = tree.get(step)
            own = ".".join((step, *path))
            if not isinstance(section, dict) or any(own == g or own.startswith(g + ".") for g in given):
                continue
            node = section
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node:
                replaced.append(f"{key}={value} replaces {own}={node[path[-1]]} of the job file")
                del node[path[-1]]
    return replaced


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
    tree = read_yaml_mapping(
        path, "job file", "sections (output_dir:, data:, mlm:, classify:, select:)",
        missing_hint=" (see jobs/demo.yaml for the format)",
    )
    parsed = [item for text in overrides or [] for item in _dotted(*parse_override(text))]
    for key, value in parsed:
        _set_path(tree, key, value)
    _check_keys(tree, JOB_KEYS, "the top level")
    replaced = _top_level_overrides_reach_every_step(tree, parsed)
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
        env = {  # what the job file's env sections set wins over what the accelerate config implies
            **(accelerate_env(accel) if accel else {}),
            **base_env,
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
        _check_select_metric(select_metric)
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
        name, root, path.resolve(), max_requeues, steps, synthetic, hub, select_metric, candidates, replaced
    )


def _check_select_metric(metric: Any) -> None:
    """On the login node: a typo here would otherwise fail the selection job after every member
    has trained (pick_best finds no such validation metric)."""
    from radtrain.metrics import METRIC_NAMES

    valid = (*METRIC_NAMES, "loss")
    if metric not in valid:
        raise ConfigError(
            f"job file: select.metric={metric!r} is not a classifier metric; valid: {', '.join(valid)}"
        )


def _env_section(section: Any, where: str) -> dict[str, str]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"job file: {where} must be a mapping of environment variables")
    # YAML reads `FOO: false` (or env.FOO=false) as a bool: the variable gets YAML's spelling back,
    # not Python's "False", which tools that test for "false"/"true" do not recognise.
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in section.items()}


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
