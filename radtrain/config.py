"""Typed run configuration: one YAML file (optional) plus dotted overrides.

Every hyperparameter has exactly one home here. Each section is a dataclass that checks its own
values in ``__post_init__`` so a bad value fails at start, before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_repo_id(repo_id: str, what: str = "hub.repo_id") -> None:
    """A model repo id the Hub will accept, checked before any training (the Hub's own rules:
    huggingface_hub's validate_repo_id, plus the 'org/name' form publishing needs)."""
    _check(
        repo_id.count("/") == 1 and all(repo_id.split("/")),
        f"{what} must look like 'org/name', got {repo_id!r}",
    )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"{what}={repo_id!r} is not a valid Hub repo id: {exc}") from None


# git check-ref-format's rules, as the Hub applies them to a branch name.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock(/|$)|/\.")


def check_revision(revision: str, what: str = "hub.revision") -> None:
    _check(
        bool(revision) and not _BAD_REF.search(revision) and revision not in ("@", "HEAD"),
        f"{what}={revision!r} is not a valid git branch name (git check-ref-format: no spaces or any of "
        "'~^:?*[\\', no '..', '//' or '@{', no part starting with '.' or ending with '.lock', and it may not start "
        "with '-' or '/' nor end with '/' or '.')",
    )


@dataclass
class DataConfig:
    source: str = "unsloth/Radiology_mini"
    """Hub dataset id, a directory of train/validation/test files, or a single file."""
    text_column: str = "caption"
    label_column: str | None = "cui"
    """The labels' column. null: a text-only corpus (the MLM phase needs no labels; the classifier
    and the baseline refuse it)."""
    label_delimiter: str = "auto"
    """For labels stored as one string: 'auto' splits on ; , | and whitespace, except that a name
    between ; , or | keeps its spaces ('Pleural effusion|Cardiomegaly' is two labels; a piece
    with a digit in it, such as 'C0032227 C0018800', is split on whitespace)."""
    label_names: str | None = None
    """Optional CUI -> name mapping: a JSON object file or a two-column csv/tsv."""
    label_name_column: str | None = None
    """Optional column holding names parallel to the label column."""
    min_label_count: int = 1
    """Keep CUIs seen at least this many times in the training split."""
    max_length: int = 256
    validation_fraction: float = 0.15
    """Used only when the source has no validation split: share of (train + test), seed 42."""
    test_fraction: float = 0.1
    """Used only for a single file: share held out as the test split before the validation cut."""
    split_seed: int = 42
    padding: str = "longest"
    """'longest' pads each batch to its longest caption; 'max_length' pads to max_length (the seed)."""
    pad_to_multiple_of: int | None = None
    """Bounds the number of distinct batch shapes (kernel plans, compile caches): padded widths
    are multiples of it; packed rows are rounded up to a multiple of it coarsened to ~1/64 of the
    row (at most 64 lengths per doubling for a power of two; the filler, < 1/64 of the row or
    < this, computes nothing that reaches a caption). 1: exact widths and packed lengths. None: 8
    where the step runs on a GPU, 1 on a CPU (no per-shape work to reuse there; rounding cost 7%
    of captions/s)."""
    bucket_by_length: bool = True
    """Group captions of similar length into batches so little compute is spent on padding."""
    packing: str | bool = "auto"
    """Padding-free batches: each micro-batch's captions concatenated into one row, attention kept
    per caption (varlen kernels), classifier pooling per caption. Same captions per batch, same
    loss. 'auto' packs where a varlen attention kernel runs (CUDA with flash-attn or PyTorch's
    varlen attention), 'on' everywhere (CPU: an exact but not faster fallback), 'off' pads."""
    packed_attention: str = "auto"
    """How the captions of a packed row attend (same result either way): 'varlen' runs one varlen
    flash kernel over the row (flash-attn or PyTorch's own; CUDA, half precision); 'blocks'
    scatters the captions into a (captions x longest) block for SDPA and gathers them back (any
    device; little padding when length buckets are on); 'flex' runs PyTorch's FlexAttention over
    the row with a per-caption block mask (CUDA only; not yet measured on a GPU); 'auto' is varlen
    where a kernel exists, else blocks. Only the attention differs: projections and MLPs run on
    real tokens either way."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    cache_dir: str | None = None
    """radtrain's caches: tokenized splits (tokens/) and, with train.compile, torch.compile's
    kernels (inductor/). Default ~/.cache/radtrain (or $RADTRAIN_CACHE): put it on a filesystem
    every node sees, so array tasks and requeued jobs reuse both."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "data.source is empty: give a Hub dataset id, a directory or a file")
        _check(self.min_label_count >= 1, f"data.min_label_count must be >= 1, got {self.min_label_count}")
        _check(self.max_length >= 8, f"data.max_length must be >= 8, got {self.max_length}")
        _check(0.0 < self.validation_fraction < 0.9, "data.validation_fraction must be in (0, 0.9)")
        _check(0.0 < self.test_fraction < 0.9, "data.test_fraction must be in (0, 0.9)")
        _check(self.split_seed >= 0, f"data.split_seed must be >= 0 (numpy's generators take no negative seed), got {self.split_seed}")
        _check(self.padding in ("longest", "max_length"), "data.padding must be 'longest' or 'max_length'")
        _check(
            self.label_delimiter != "",
            "data.label_delimiter is empty; give the character between CUIs (quote it where YAML would "
            "eat it: data.label_delimiter='|'), or 'auto'",
        )
        _check(
            self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1,
            "data.pad_to_multiple_of must be >= 1 (or null: 8 on a GPU, 1 on a CPU)",
        )
        if isinstance(self.packing, bool):  # YAML reads on/off as booleans
            self.packing = "on" if self.packing else "off"
        _check(self.packing in ("auto", "on", "off"), f"data.packing must be auto, on or off, got {self.packing!r}")
        _check(
            self.packed_attention in ("auto", "varlen", "blocks", "flex"),
            f"data.packed_attention must be auto, varlen, blocks or flex, got {self.packed_attention!r}",
        )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name} must be positive or null")


SCRATCH_SIZES = ("tiny", "small", "base", "large")


@dataclass
class ModelConfig:
    name: str = "answerdotai/ModernBERT-base"
    """Hub id, local directory, or scratch:tiny|small|base|large (offline, tokenizer trained here)."""
    init_from: str | None = None
    """Weights to start from (e.g. the MLM run's best/); the run's own checkpoints take precedence.
    A classifier of the same CUIs in the same order keeps its head; any other starts a new one."""
    attn_implementation: str | None = None
    """None lets transformers choose (sdpa); 'flash_attention_2' where flash-attn is installed."""
    mlm_probability: float = 0.3
    classifier_pooling: str | None = None
    """'cls' or 'mean'; None keeps the model's own setting."""
    classifier_dropout: float | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name is empty")
        if self.name.startswith("scratch:"):
            size = self.name.split(":", 1)[1]
            _check(size in SCRATCH_SIZES, f"model.name={self.name!r}: scratch size must be one of {SCRATCH_SIZES}")
        _check(0.0 < self.mlm_probability < 1.0, "model.mlm_probability must be in (0, 1)")
        _check(
            self.classifier_pooling in (None, "cls", "mean"), "model.classifier_pooling must be cls, mean or null"
        )
        _check(
            self.classifier_dropout is None or 0.0 <= self.classifier_dropout < 1.0,
            f"model.classifier_dropout must be in [0, 1) or null, got {self.classifier_dropout}",
        )

    @property
    def is_scratch(self) -> bool:
        return self.name.startswith("scratch:")


@dataclass
class TrainConfig:
    epochs: float = 20.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs for the schedule)."""
    batch_size: int = 8
    """Per device. Global batch = batch_size x grad_accum x processes."""
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    precision: str = "auto"
    """'auto' (bf16 on a GPU that supports it, else fp32), 'fp32' or 'bf16'."""
    compile: bool = False
    """torch.compile the encoder layer by layer (one graph per kind of layer, reused by the others;
    packed batches get dynamic graphs, padded ones are bounded by bucketing and
    data.pad_to_multiple_of). Off by default until measured on a GPU: see docs/benchmarks.md."""
    seed: int = 42
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps, in addition to the end of each epoch; None: per epoch only."""
    save_every_steps: int | None = None
    """Extra resumable checkpoints between evaluations (every evaluation also saves one)."""
    metric_for_best: str = "f1"
    save_total_limit: int = 3
    log_every_steps: int = 10
    threshold: float = 0.5
    max_nan_steps: int = 5
    """Consecutive non-finite losses tolerated (steps skipped) before the run stops."""
    pos_weight: float | str | None = None
    """Imbalance: None is the series' plain BCE; a number multiplies every label's positive term;
    'auto' uses each label's training negatives/positives ratio, capped at train.pos_weight_cap."""
    pos_weight_cap: float = 10.0
    """Upper bound of the 'auto' pos_weight: uncapped, a CUI seen 10 times in 6k captions gets ~600."""
    loss: str = "bce"
    """'bce' (the series) or 'asl' (asymmetric loss, Ridnik et al. 2021: down-weights easy negatives)."""
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 1.0
    asl_clip: float = 0.05
    """ASL probability margin: negatives with p < asl_clip contribute no loss."""
    tune_thresholds: bool = True
    """Tune a global and per-label thresholds on the validation outputs of each new best model."""
    threshold_min_support: int = 5
    """Per-label thresholds only for labels with this many validation positives (else the global)."""
    always_top1: bool = False
    """Always emit each caption's most probable label, whatever the thresholds (ImageCLEF style)."""

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, float):
                _check(math.isfinite(value), f"train.{name} must be a finite number, got {value}")
        _check(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        self.epochs = float(self.epochs)  # 20 and 20.0 must fingerprint the same for resume
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be positive or null")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        _check(self.log_every_steps >= 1, f"train.log_every_steps must be >= 1, got {self.log_every_steps}")
        _check(self.seed >= 0, f"train.seed must be >= 0 (numpy's generators take no negative seed), got {self.seed}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 disables clipping)")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _check(self.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16")
        _check(self.save_total_limit >= 1, "train.save_total_limit must be >= 1")
        _check(0.0 < self.threshold < 1.0, "train.threshold must be in (0, 1)")
        _check(self.max_nan_steps >= 1, "train.max_nan_steps must be >= 1")
        _check(
            self.pos_weight is None or self.pos_weight == "auto"
            or (isinstance(self.pos_weight, float) and self.pos_weight > 0),
            f"train.pos_weight must be a positive number, 'auto' or null, got {self.pos_weight!r}",
        )
        _check(self.pos_weight_cap >= 1, "train.pos_weight_cap must be >= 1")
        _check(self.loss in ("bce", "asl"), f"train.loss must be 'bce' or 'asl', got {self.loss!r}")
        _check(self.asl_gamma_neg >= 0 and self.asl_gamma_pos >= 0, "train.asl_gamma_neg/pos must be >= 0")
        _check(0 <= self.asl_clip < 1, "train.asl_clip must be in [0, 1)")
        _check(self.threshold_min_support >= 1, "train.threshold_min_support must be >= 1")
        for name in ("eval_every_steps", "save_every_steps"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"train.{name} must be positive or null")


@dataclass
class HubConfig:
    repo_id: str | None = None
    """org/name to publish best/ to after the test evaluation; None publishes nothing."""
    private: bool = True
    revision: str | None = None
    commit_message: str | None = None

    def __post_init__(self) -> None:
        if self.repo_id is not None:
            check_repo_id(self.repo_id)
        if self.revision is not None:
            check_revision(self.revision)


@dataclass
class TrackingConfig:
    backend: str = "none"
    """'none', 'wandb' (offline unless tracking.mode=online)."""
    project: str = "radtrain"
    mode: str = "offline"
    run_name: str | None = None

    def __post_init__(self) -> None:
        _check(self.backend in ("none", "wandb"), "tracking.backend must be 'none' or 'wandb'")
        _check(self.mode in ("offline", "online"), "tracking.mode must be 'offline' or 'online'")


@dataclass
class RunConfig:
    output_dir: str = "runs/radtrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # A shell leaves "~" in output_dir=~/runs alone (no word starts with it), and so does YAML;
        # unexpanded it made a folder named "~" in the working directory.
        self.output_dir = os.path.expanduser(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, task: str) -> str:
        """Hash of everything that changes the maths of a run, for the resume check."""
        payload = self.to_dict()
        for key in RESUME_SAFE_KEYS:
            section, _, name = key.partition(".")
            if name:
                payload[section].pop(name, None)
            else:
                payload.pop(section, None)
        payload["task"] = task
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# The two training phases (a run directory holds one of them).
PHASES = ("mlm", "classify")

# Keys a resumed run may change without changing what it computes.
RESUME_SAFE_KEYS = (
    "output_dir",
    "hub",
    "tracking",
    "train.log_every_steps",
    "train.eval_batch_size",
    "train.save_every_steps",
    "train.save_total_limit",  # how many checkpoints to keep (the fix after a full disk)
    "train.max_nan_steps",  # when to give up on non-finite steps; a finite run is unchanged
    "train.compile",
    "data.packing",  # packed and padded batches compute the same loss (tests/test_bench.py)
    "data.pad_to_multiple_of",  # widths and packed filler change no loss either (tests/test_bench.py)
    "data.packed_attention",  # so do both attentions of packed batches (tests/test_bench.py)
    "data.cache_dir",
)


def config_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """The keys outside RESUME_SAFE_KEYS on which two configs differ, as ``key: saved -> current``
    (what makes a run directory's checkpoints or results another run's)."""

    def safe(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_SAFE_KEYS)

    old, new = _flatten(saved.to_dict(), "saved config"), _flatten(current.to_dict(), "config")
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in new if not safe(key) and old.get(key) != new.get(key)]


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or explain why not."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "hub": HubConfig,
    "tracking": TrackingConfig,
}
TOP_LEVEL_KEYS = ("output_dir",)


def valid_keys() -> list[str]:
    keys = list(TOP_LEVEL_KEYS)
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str, choices: list[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}. Valid keys: {', '.join(choices)}")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-5' -> ('train.lr', 3e-05); the value is read as YAML (so null/true/1e-5 work),
    except for text keys (paths, names, revisions, delimiters), whose value is kept as typed:
    YAML would turn ``output_dir=0755`` into 493, ``hub.revision=1.10`` into 1.1, ``2024-06-01``
    into a date and ``label_delimiter=|`` into an empty string. Quotes still work there."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. train.lr=3e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if _is_text_key(key):
        text = raw.strip()
        if text.lower() in ("null", "~", "none"):
            return key, None  # job files keep some sections as plain dicts: never the string "null"
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            with contextlib.suppress(yaml.YAMLError):
                return key, yaml.safe_load(text)  # quotes keep spaces: data.label_delimiter=' '
        return key, text
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _is_text_key(key: str) -> bool:
    """A key typed ``str`` or ``str | None`` (not ``str | bool`` like data.packing)."""
    section, _, name = key.partition(".")
    if not name:
        return section == "output_dir"
    if section not in SECTIONS:
        return False
    annotation = _section_types(SECTIONS[section]).get(name)
    if annotation is str:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {
        str, type(None)
    }


def _flatten(mapping: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {key!r} must be a mapping of keys, got {value!r}")
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


class _NumberText(yaml.SafeLoader):
    """safe_load that remembers how each number was written (``_as_written`` uses it)."""


class _Int(int):
    yaml_text: str


class _Float(float):
    yaml_text: str


def _int_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    number = _Int(loader.construct_yaml_int(node))
    number.yaml_text = node.value
    return number


def _float_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    number = _Float(loader.construct_yaml_float(node))
    number.yaml_text = node.value
    return number


_NumberText.add_constructor("tag:yaml.org,2002:int", _int_as_written)
_NumberText.add_constructor("tag:yaml.org,2002:float", _float_as_written)


def _as_written(value: Any, path: tuple = ()) -> Any:
    """Numbers under text keys as the file wrote them, every other number a plain int/float.

    YAML reads ``hub.revision: 1.10`` as 1.1 (a push to branch "1.1") and ``output_dir: 0755`` as
    493; a text key (a ``str`` field: section.name, or a dotted key as job files' sweeps write it)
    takes the text instead, as its command-line override does."""
    if isinstance(value, dict):
        return {_as_written(k): _as_written(v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_written(v, path) for v in value]
    if not isinstance(value, (_Int, _Float)):
        return value
    keys = [str(k) for k in path[-2:]]
    if keys and (_is_text_key(keys[-1]) or _is_text_key(".".join(keys))):
        return value.yaml_text
    return int(value) if isinstance(value, int) else float(value)


def read_yaml_mapping(path: str | Path, what: str, shape: str, missing_hint: str = "") -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{missing_hint}")
    try:
        loaded = _as_written(yaml.load(path.read_text(), Loader=_NumberText)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of {shape}")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a RunConfig: dataclass defaults < ``base`` < YAML file < dotted overrides."""
    values: dict[str, Any] = {}
    if base:
        values.update(_flatten(base, "defaults"))
    if path is not None:
        loaded = read_yaml_mapping(path, "config file", "sections (data:, train:, ...)")
        values.update(_flatten(loaded, str(path)))
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    return build_config(values)


def build_config(flat: dict[str, Any]) -> RunConfig:
    keys = valid_keys()
    kwargs: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in keys:
            raise _unknown(key, keys)
        section, _, name = key.partition(".")
        if not name:
            top[section] = _coerce(value, str, key)
            continue
        annotation = _section_types(SECTIONS[section])[name]
        kwargs[section][name] = _coerce(value, annotation, key)
    sections = {name: cls(**kwargs[name]) for name, cls in SECTIONS.items()}
    return RunConfig(**top, **sections)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved with to_dict()/to_yaml() (e.g. a run directory's config.yaml).
    Keys radtrain no longer has are dropped: a run saved by an older version still resumes."""
    flat = _flatten(data, "saved config")
    return build_config({k: v for k, v in flat.items() if k not in RETIRED_KEYS})


def read_saved_config(run_dir: str | Path) -> RunConfig | None:
    """A run directory's config.yaml (the settings of the run that wrote its checkpoints and
    results); None if there is none or it cannot be read as a radtrain config."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except Exception:  # unreadable or foreign: nothing to compare against
        return None


# Keys older versions wrote into config.yaml that no longer exist (train.num_workers: no
# DataLoader ever read it; batches are built in-process from the token cache).
RETIRED_KEYS = ("train.num_workers",)
