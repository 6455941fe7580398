"""``radtrain bench``: training throughput of named presets, same data, same model, one process.

Every preset is the user's configuration with the *speed* keys (padding, bucketing, packing,
batch size, precision, compile) replaced: ``seed`` by the series' recipe, ``fast`` by radtrain's
defaults, ``user`` left as the user set them. Each preset builds the model from the same seed (so
the same initial weights) and runs the REAL optimizer step, ``Trainer._step``, on the real batch
plan of the real batching code. Only observation is added: the collated shapes are recorded.

A preset that runs out of memory (a batch that does not fit) becomes a row with ``error`` set and
no figures; it releases its model and optimizer, and the other presets still run.

Numbers reported per preset (one JSON row each):
- captions_per_s, real_tokens_per_s: over the timed steps only (after ``--warmup`` steps, whose
  time, compile included, is reported separately as ``warmup_s``). Collation runs inside the
  step, as in training, so a slow data path shows up here.
- padding_fraction: 1 - real tokens / tokens the model computed on (rows x width, or the packed
  length), over the timed steps.
- peak_memory_bytes: what the preset holds between steps (weights, buffers, optimizer moments,
  counted from the tensors) + the peak growth during its timed steps (activations, gradients,
  collated batches). Growth is measured with ``torch.cuda.max_memory_allocated`` on a GPU, and on
  a CPU as the process's peak resident set (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) above the RSS at the start; ``memory_method`` says which. RSS is
  coarse (the allocator keeps freed pages), so CPU figures are indicative to a few MiB.
- mfu (GPU only): model FLOPs on real tokens / (seconds x peak bf16 dense FLOP/s of the card):
  ``6 * N_body * real_tokens + 6 * N_head * outputs + 12 * d * sum_layers sum_captions L * K(L)``
  where N_body is the encoder's parameters less the token embeddings, N_head the pooler and
  classifier (applied once per caption) or the MLM head and decoder (applied once per masked
  token: sparse prediction), d the hidden size, L a caption's real length and K(L) the keys each
  query attends to (L for global layers, about min(L, 129) for ModernBERT's +-64-token local
  ones). 6 = 2 FLOPs per parameter per token forward (one multiply-add) + 4 backward; 12 = 3
  (forward + backward) x 2 matmuls (QK^T, AV) x 2 FLOPs per multiply-add. Padding, filler and
  recomputation are not counted: this is useful work, so padding lowers MFU.
- host_ms_per_step: the part of step_ms the host spends preparing the step's batches (collate,
  MLM masks, packing, copies to the device): time a GPU sits idle, since a step ends in a sync.
- ops_per_step: ATen operators one more (untimed) step dispatches, forward, backward and
  optimizer (``radtrain.opcount``): the kernel launches an eager step makes, the figure a
  launch-bound GPU step's time follows; measurable on a CPU. None for compiled presets.
- waits_per_step (GPU only): of those, the operators that make the host wait for the device
  (``OpCounter.syncs``: a value read back, an output sized by values); 1 is the step's own loss
  read-back. None on a CPU, where the host's batch preparation cannot be told apart.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radtrain.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from radtrain.io import check_output_file, write_json

if TYPE_CHECKING:  # torch is imported where used: `radtrain --help` should not pay for it
    import torch

log = logging.getLogger(__name__)

# The start of a row's error when its preset crashed (not out of memory): `radtrain bench` then exits 1.
FAILED = "failed"
# Exit status of a bench stopped by SIGTERM/SIGINT after writing the rows measured so far (as training's 75).
STOPPED_EXIT = 75


class _Stopped(BaseException):
    """SIGTERM (e.g. `timeout`) during a bench: a BaseException, so no preset's handler takes it."""


class BenchStopped(Exception):
    """A bench stopped by a signal, raised after the rows measured so far were printed and written."""

    def __init__(self, signal_name: str, rows: list[dict[str, Any]]):
        super().__init__(f"stopped by {signal_name}")
        self.rows = rows

# The "ModernBERT in Radiology" recipe: fp32, every caption padded to 256 tokens, batch 8, captions
# in random order (no length buckets).
SEED_RECIPE: dict[str, Any] = {
    "data.padding": "max_length",
    "data.max_length": 256,
    "data.pad_to_multiple_of": 1,
    "data.bucket_by_length": False,
    "data.packing": "off",
    "data.packed_attention": "auto",
    "train.batch_size": 8,
    "train.grad_accum": 1,
    "train.precision": "fp32",
    "train.compile": False,
}
SPEED_KEYS = tuple(SEED_RECIPE)
PRESETS = ("seed", "fast", "user")

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
# RADTRAIN_PEAK_FLOPS overrides for any other card.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def _default(key: str) -> Any:
    section, name = key.split(".")
    cls = {"data": DataConfig, "train": TrainConfig}[section]
    return cls.__dataclass_fields__[name].default


def preset_overrides(name: str) -> dict[str, Any]:
    """The speed keys a preset forces (``user`` forces none)."""
    if name == "seed":
        return dict(SEED_RECIPE)
    if name == "fast":
        return {k: _default(k) for k in SPEED_KEYS}
    if name == "user":
        return {}
    raise ConfigError(f"unknown bench preset {name!r}; choose from {', '.join(PRESETS)}")


def preset_config(name: str, config_path: str | None, overrides: list[str]) -> RunConfig:
    forced = [f"{k}={'null' if v is None else v}" for k, v in preset_overrides(name).items()]
    return load_config(config_path, list(overrides) + forced)


def _strip_stray_commas(item: str) -> str:
    """``train.lr=1e-3,`` -> ``train.lr=1e-3``; a value that is only commas (a delimiter) is kept."""
    key, sep, value = item.strip().partition("=")
    stripped = value.rstrip(",").strip()
    return f"{key}{sep}{stripped or value.strip()}"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` -> (NAME, overrides): a preset of its own, the user's
    configuration plus these overrides (e.g. ``b512:train.batch_size=512``)."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    # Commas separate settings only where a KEY= follows, so a value may hold one (label_delimiter=,).
    items = [_strip_stray_commas(item) for item in re.split(r",(?=\s*[A-Za-z_][\w.]*=)", rest) if item.strip()]
    if not sep or not name or not items or any("=" not in item for item in items):
        raise ConfigError(
            f"--variant {spec!r} is not NAME:KEY=VALUE[,KEY=VALUE...]; e.g. --variant b512:train.batch_size=512"
        )
    if name in PRESETS:
        raise ConfigError(f"--variant name {name!r} is a built-in preset; choose another name")
    return name, items


# -- measurement helpers ---------------------------------------------------------------------------


class MemoryMeter:
    """Peak memory over a block: CUDA allocator peak, else the process's peak RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.max_memory_allocated growth" if self.cuda else "peak RSS (VmHWM) growth"
        self.start = 0

    @staticmethod
    def _status(field_name: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> MemoryMeter:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss growth (process-lifetime peak; not reset per preset)"
        self.start = self._status("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak(self) -> int:
        import torch

        if self.cuda:
            return max(0, int(torch.cuda.max_memory_allocated()) - int(self.start))
        high = None if "ru_maxrss" in self.method else self._status("VmHWM")
        if high is None:
            import resource

            high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, int(high) - int(self.start))


def peak_flops(device: torch.device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    if os.environ.get("RADTRAIN_PEAK_FLOPS"):
        return float(os.environ["RADTRAIN_PEAK_FLOPS"])
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_BF16:
        if fragment in name:
            return value
    return None


@dataclass
class FlopCounter:
    """Model FLOPs on real tokens (see the module docstring for the formula)."""

    body_params: int
    head_params: int
    hidden: int
    global_layers: int
    local_layers: int
    window: int
    per_caption_head: bool

    @classmethod
    def for_model(cls, model: torch.nn.Module, task_name: str) -> FlopCounter:
        config = model.config
        embed = model.get_input_embeddings().weight.numel()
        body = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.")) - embed
        head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model."))
        if task_name == "mlm" and getattr(config, "tie_word_embeddings", True):
            head += embed  # the decoder shares the embedding matrix but is a full matmul per masked token
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        local = sum(1 for t in types if t == "sliding_attention")
        window = 2 * int(getattr(config, "sliding_window", None) or 10**9) + 1
        return cls(body, head, config.hidden_size, len(types) - local, local, window, task_name != "mlm")

    def step(self, lengths: np.ndarray, head_rows: int) -> float:
        lengths = lengths.astype(np.float64)
        attention = self.global_layers * np.sum(lengths * lengths)
        attention += self.local_layers * np.sum(lengths * np.minimum(lengths, self.window))
        return 6.0 * self.body_params * lengths.sum() + 6.0 * self.head_params * head_rows + 12.0 * self.hidden * attention


@dataclass
class Row:
    """One preset's results. A preset that ran out of memory has ``error`` set and no figures."""

    preset: str
    steps: int
    captions_per_s: float | None
    real_tokens_per_s: float | None
    padding_fraction: float | None
    peak_memory_bytes: int | None
    memory_method: str
    warmup_s: float
    warmup_steps: int
    step_ms: float | None
    mfu: float | None
    model_tflops_per_s: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    final_loss: float | None = None
    host_ms_per_step: float | None = None
    """Host time per step spent collating, masking (MLM), packing and copying batches to the
    device, inside step_ms: on a GPU the device waits for it."""
    ops_per_step: int | None = None
    """Operators one step dispatches (radtrain.opcount): its kernel launches; None when compiled."""
    waits_per_step: int | None = None
    """Of those, the ones that make the host wait for the GPU (None on a CPU)."""
    error: str | None = None


# -- one preset -----------------------------------------------------------------------------------


class _Shared:
    """What every preset shares: splits, label space, tokenizer (built once)."""

    def __init__(self, cfg: RunConfig, phase: str, workdir: Path) -> None:
        from radtrain.data.sources import load_splits
        from radtrain.phase import fit_label_space, load_or_train_tokenizer

        self.phase = phase
        self.splits = load_splits(cfg.data, need_labels=phase == "classify")
        self.label_space = fit_label_space(cfg, self.splits) if phase == "classify" else None
        self.tokenizer = load_or_train_tokenizer(cfg, self.splits["train"].texts)
        self.workdir = workdir
        self._tokenized: dict[int, Any] = {}

    def train_split(self, cfg: RunConfig):
        from radtrain.phase import tokenize_split

        if cfg.data.max_length not in self._tokenized:
            self._tokenized[cfg.data.max_length] = tokenize_split(
                self.tokenizer, self.splits["train"], cfg, self.label_space, "train"
            )
        return self._tokenized[cfg.data.max_length]


def _reset_accelerate() -> None:
    """Each preset gets its own Accelerator (precision differs); accelerate keeps singleton state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _accelerate_state() -> tuple[dict, dict]:
    from accelerate.state import AcceleratorState, GradientState

    return dict(AcceleratorState._shared_state), dict(GradientState._shared_state)


def _restore_accelerate_state(snapshot: tuple[dict, dict]) -> None:
    from accelerate.state import AcceleratorState, GradientState

    for cls, saved in zip((AcceleratorState, GradientState), snapshot, strict=True):
        cls._shared_state.clear()
        cls._shared_state.update(saved)


def build_trainer(cfg: RunConfig, shared: _Shared, run_dir: Path):
    """A real Trainer for ``cfg`` on the shared data (model built from cfg.train.seed)."""
    from radtrain import models
    from radtrain.distributed import make_accelerator
    from radtrain.phase import build_model, build_task, resolve_precision

    _reset_accelerate()
    accelerator = make_accelerator(resolve_precision(cfg.train.precision), cfg.train.grad_accum)
    models.check_max_length(cfg.data.max_length, models.source_config(cfg.model))
    model = build_model(shared.phase, cfg, shared.tokenizer, shared.label_space)
    train = shared.train_split(cfg)
    task = build_task(shared.phase, cfg, shared.tokenizer, shared.label_space, n_train=len(train))
    trainer = _observed_trainer_class()(
        cfg=cfg,
        task=task,
        accelerator=accelerator,
        model=model,
        train_split=train,
        eval_split=train,
        pad_id=shared.tokenizer.pad_token_id,
        run_dir=run_dir,
        on_best=lambda *a: None,
    )
    return trainer, model


def _observed_trainer_class():
    from radtrain.data.batching import packed_length
    from radtrain.trainer import Trainer

    class ObservedTrainer(Trainer):
        """The real Trainer; it only records what its collation produced and how long the host
        spent preparing each step's batches."""

        def _collate(self, split, indices):
            batch = super()._collate(split, indices)
            record = getattr(self, "_bench_record", None)
            if record is not None:
                real = np.asarray(indices)
                lengths = split.lengths[real[real >= 0]]
                # A packed micro-batch (packed in _step, after this) computes on its real tokens and
                # the filler that bounds its length.
                computed = packed_length(int(lengths.sum()), self.pad_multiple)
                record["computed"] += computed if self.packing else int(batch["input_ids"].numel())
                record["lengths"].append(lengths)
            return batch

        def _host_batches(self, epoch, step_in_epoch, micro):
            t0 = time.perf_counter()
            out = super()._host_batches(epoch, step_in_epoch, micro)
            record = getattr(self, "_bench_record", None)
            if record is not None:
                record["host_s"] += time.perf_counter() - t0
            return out

    return ObservedTrainer


def _step_groups(trainer):
    """(epoch, step_in_epoch, micro) for successive optimizer steps, walking epochs as
    Trainer._loop does (``micro``: the step's global micro-batches; _step cuts this rank's slice)."""
    epoch = 0
    while True:
        for step_in_epoch, micro in enumerate(trainer._epoch_steps(epoch)):
            yield epoch, step_in_epoch, micro
        epoch += 1


def _state_bytes(model, optimizer) -> int:
    """Weights, buffers and optimizer moments: what a preset holds between steps."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for state in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    return int(total)


class PresetRun:
    """One preset's trainer and counters. Presets are built once and may be run in interleaved
    rounds (``--rounds``), so a CPU shared with other jobs slows every preset alike."""

    def __init__(self, name: str, cfg: RunConfig, shared: _Shared, workdir: Path) -> None:
        from radtrain.phase import configure_cuda

        configure_cuda()
        self.name, self.cfg = name, cfg
        self.trainer, model = build_trainer(cfg, shared, workdir / name)
        self._snapshot = _accelerate_state()
        self.device = self.trainer.acc.device
        self.flops = FlopCounter.for_model(self.trainer.acc.unwrap_model(self.trainer.model), shared.phase)
        self.settings = self._settings(getattr(model.config, "_attn_implementation", None))
        self.error: str | None = None
        self.groups = _step_groups(self.trainer)
        self.record: dict[str, Any] = {"computed": 0, "lengths": [], "host_s": 0.0}
        self.elapsed = self.warmup_s = self.total_flops = 0.0
        self.captions = self.real_tokens = self.steps = self.warmup_steps = 0
        self.transient = 0
        self.memory_method = ""
        self.losses: list[float] = []
        self.ops_per_step: int | None = None
        self.waits_per_step: int | None = None

    def _activate(self) -> None:
        """accelerate's state is process-global (Borg dicts); give it back this preset's values
        (precision, gradient accumulation) before running its steps."""
        _restore_accelerate_state(self._snapshot)

    def _settings(self, attn_implementation: str | None) -> dict[str, Any]:
        data, train = self.cfg.data, self.cfg.train
        return {
            "padding": data.padding,
            "max_length": data.max_length,
            "pad_to_multiple_of": self.trainer.pad_multiple,  # resolved for the device
            "bucket_by_length": data.bucket_by_length,
            "packing": data.packing,
            "packed": bool(self.trainer.packing),
            "packed_attention": data.packed_attention,
            "batch_size": train.batch_size,
            "grad_accum": train.grad_accum,
            "precision": train.precision,
            "compile": train.compile,
            "attn_implementation": attn_implementation,
        }

    def attempt(self, method: str, n: int) -> None:
        """``warm`` or ``run`` n steps, unless this preset already failed. A preset that runs out of
        memory, or fails otherwise (a compile error of an experimental path), is recorded as failed
        and releases what it holds, so the others still run and the rows measured are not lost."""
        if self.error is not None:
            return
        from radtrain.trainer import is_out_of_memory

        try:
            getattr(self, method)(n)
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0] or type(exc).__name__  # MemoryError() has no text
            done = self.warmup_steps + self.steps
            if is_out_of_memory(exc):
                self.error = f"out of memory after {done} steps: {first_line[:300]}"
            else:
                log.error("bench preset %s failed", self.name, exc_info=exc)
                self.error = f"{FAILED} after {done} steps: {type(exc).__name__}: {first_line[:300]}"
        if self.error is not None:  # outside the except block: its traceback holds the step's tensors
            self._release()

    def _release(self) -> None:
        import torch

        log.warning("bench preset %s: %s", self.name, self.error)
        self.trainer._bench_record = None
        self.trainer.acc.free_memory()  # drops accelerate's references to the model and optimizer
        self.trainer = self.groups = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def warm(self, n: int) -> None:
        self._activate()
        for _ in range(n):
            t0 = time.perf_counter()
            self.trainer._step(*next(self.groups))
            self.warmup_s += time.perf_counter() - t0
            self.warmup_steps += 1

    def run(self, n: int) -> None:
        self._activate()
        trainer = self.trainer
        meter = MemoryMeter(self.device)
        with meter:
            trainer._bench_record = self.record
            for _ in range(n):
                epoch, step_in_epoch, micro = next(self.groups)
                n_before = len(self.record["lengths"])
                t = time.perf_counter()
                loss, items = trainer._step(epoch, step_in_epoch, micro)  # ends in a .cpu() sync: timing is honest
                self.elapsed += time.perf_counter() - t
                self.losses.append(loss / max(items, 1))
                lengths = np.concatenate(self.record["lengths"][n_before:])
                self.captions += sum(len(batch) for batch in micro)
                self.real_tokens += int(lengths.sum())
                head_rows = len(lengths) if self.flops.per_caption_head else int(items)
                self.total_flops += self.flops.step(lengths, head_rows) * trainer.world
                self.steps += 1
            trainer._bench_record = None
        self.transient = max(self.transient, meter.peak())
        self.memory_method = meter.method

    def count_ops(self, n: int) -> None:
        """Operators dispatched per step over n more (untimed) steps. Not for compiled presets:
        the counter would see Inductor's fused kernels as nothing, or make Dynamo retrace. A
        diagnostic: if counting fails (a kernel the dispatch mode trips on, a longer batch that
        does not fit), the preset keeps its timed figures and reports no count."""
        if self.cfg.train.compile or n < 1 or self.error is not None:
            return
        from radtrain.opcount import OpCounter

        self._activate()
        try:
            # On a GPU, the operators that launch work on it (not the host's batch preparation).
            with OpCounter(None if self.device.type == "cpu" else self.device.type) as counter:
                for _ in range(n):
                    self.trainer._step(*next(self.groups))
        except Exception as exc:  # a diagnostic must not cost the rows already measured
            log.warning("bench preset %s: operators not counted: %s", self.name, str(exc).splitlines()[:1])
            return
        self.ops_per_step = round(counter.total / n)
        if self.device.type != "cpu":
            self.waits_per_step = round(sum(counter.syncs.values()) / n)

    def row(self) -> Row:
        if self.error is not None:
            return Row(
                preset=self.name, steps=self.steps, captions_per_s=None, real_tokens_per_s=None,
                padding_fraction=None, peak_memory_bytes=None, memory_method="", warmup_s=self.warmup_s,
                warmup_steps=self.warmup_steps, step_ms=None, mfu=None, model_tflops_per_s=None,
                settings=self.settings, error=self.error,
            )
        lengths = np.concatenate(self.record["lengths"]) if self.record["lengths"] else np.zeros(0)
        elapsed = max(self.elapsed, 1e-9)
        peak_rate = peak_flops(self.device)
        achieved = self.total_flops / elapsed
        model = self.trainer.acc.unwrap_model(self.trainer.model)
        return Row(
            preset=self.name,
            steps=self.steps,
            captions_per_s=self.captions / elapsed,
            real_tokens_per_s=self.real_tokens / elapsed,
            padding_fraction=1.0 - float(lengths.sum()) / max(self.record["computed"], 1),
            peak_memory_bytes=_state_bytes(model, self.trainer.optimizer) + self.transient,
            memory_method=f"weights+optimizer state + peak transient ({self.memory_method})",
            warmup_s=self.warmup_s,
            warmup_steps=self.warmup_steps,
            step_ms=1000.0 * elapsed / max(self.steps, 1),
            mfu=achieved / peak_rate if peak_rate else None,
            model_tflops_per_s=achieved / 1e12 if self.device.type == "cuda" else None,
            settings=self.settings,
            final_loss=float(np.mean(self.losses[-max(1, self.steps // 5):])) if self.losses else None,
            host_ms_per_step=1000.0 * self.record["host_s"] / max(self.steps, 1),
            ops_per_step=self.ops_per_step,
            waits_per_step=self.waits_per_step,
        )


# -- reporting ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(ImportError):
            import flash_attn

            info["flash_attn"] = flash_attn.__version__
    return info


def format_table(rows: list[Row]) -> str:
    base = next((r for r in rows if r.preset == "seed"), None)
    width = max([8, *(len(r.preset) for r in rows)])
    header = (
        f"{'preset':<{width}} {'captions/s':>11} {'x seed':>7} {'real tok/s':>11} {'padding':>8} "
        f"{'peak MiB':>9} {'step ms':>8} {'host ms':>8} {'warmup s':>9} {'MFU':>6} {'ops/step':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.preset:<{width}} {'out of memory' if 'out of memory' in r.error else 'failed':>11}")
            continue
        speedup = f"{r.captions_per_s / base.captions_per_s:.2f}" if base and base.captions_per_s else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        ops = f"{r.ops_per_step}" if r.ops_per_step is not None else "-"
        lines.append(
            f"{r.preset:<{width}} {r.captions_per_s:>11.1f} {speedup:>7} {r.real_tokens_per_s:>11.0f} "
            f"{r.padding_fraction:>8.3f} {r.peak_memory_bytes / 2**20:>9.1f} {r.step_ms:>8.1f} {r.host_ms_per_step:>8.2f} "
            f"{r.warmup_s:>9.2f} {mfu:>6} {ops:>9}"
        )
    return "\n".join(lines)


def _check_unique(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"each preset and --variant needs its own name; repeated: {', '.join(repeated)}")


def run_bench(
    presets: list[str],
    steps: int,
    warmup: int = 3,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    phase: str = "classify",
    json_path: str | Path | None = None,
    workdir: str | Path | None = None,
    rounds: int = 1,
    variants: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``presets`` and then ``variants`` (name -> overrides on top of the user's configuration)
    in order and return (and optionally write) their rows."""
    from radtrain.distributed import launched_processes

    if launched_processes() > 1:
        raise ConfigError(
            "radtrain bench measures one process (its rows would mix every rank's captions with this rank's "
            "tokens, and each rank would write --json); run it without accelerate launch / torchrun / srun -n N"
        )
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if not 1 <= rounds <= steps:
        raise ConfigError(f"--rounds must be between 1 and --steps ({steps}), got {rounds}")
    if phase not in ("classify", "mlm"):
        raise ConfigError(f"--task must be classify or mlm, got {phase!r}")
    overrides = list(overrides or [])
    variants = dict(variants or {})
    _check_unique([*presets, *variants])
    if json_path:
        check_output_file(json_path, "--json")
    configs = {name: preset_config(name, config_path, overrides) for name in presets}
    configs.update({name: preset_config("user", config_path, overrides + extra) for name, extra in variants.items()})
    presets = list(configs)
    if not presets:
        raise ConfigError("nothing to run: give --presets and/or --variant")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="radtrain-bench-"))
        workdir = Path(workdir)
        first = configs[presets[0]]
        if first.data.cache_dir is None:
            for name in presets:
                configs[name].data.cache_dir = str(workdir / "cache")
        runs: list[PresetRun] = []
        stopped = None
        with _stop_on_sigterm():
            try:
                shared = _Shared(first, phase, workdir)
                for name in presets:
                    runs.append(PresetRun(name, configs[name], shared, workdir))
                for run in runs:
                    run.attempt("warm", warmup)
                for r in range(rounds):
                    for run in runs:
                        run.attempt("run", steps // rounds + (1 if r < steps % rounds else 0))
                for run in runs:  # after the timed steps: counting slows a step down
                    run.count_ops(1)
            except (_Stopped, KeyboardInterrupt) as exc:
                # What was measured is kept: the rows so far are printed and written below.
                stopped = str(exc) if isinstance(exc, _Stopped) else "SIGINT"
                for run in runs:
                    if run.error is None and run.steps == 0:
                        run.error = f"stopped by {stopped} before its timed steps"
        rows = [run.row() for run in runs]
        del runs
        gc.collect()
    print(format_table(rows), flush=True)
    for row in rows:
        if row.error is not None:
            print(f"{row.preset}: {row.error}", flush=True)
    if stopped:
        unstarted = [name for name in presets if name not in {row.preset for row in rows}]
        print(
            f"radtrain bench: stopped by {stopped}; the rows above are what was measured"
            + (f" (never started: {', '.join(unstarted)})" if unstarted else ""),
            flush=True,
        )
    out = [
        {**row.__dict__, "task": phase, "model": configs[row.preset].model.name, "data": configs[row.preset].data.source}
        for row in rows
    ]
    base = next((r for r in out if r["preset"] == "seed"), None)
    env = environment()  # one process, one environment: the same for every row
    for r in out:
        measured = base and base["captions_per_s"] and r["captions_per_s"] is not None
        r["speedup_vs_seed"] = r["captions_per_s"] / base["captions_per_s"] if measured else None
        r["stopped_by"] = stopped
        r["environment"] = env
    if json_path:
        write_json(json_path, out)
    if stopped:
        raise BenchStopped(stopped, out)
    return out


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM raises _Stopped in the main thread (once: a second one ends the process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd(args: argparse.Namespace) -> int:
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    parsed = [parse_variant(spec) for spec in args.variant]
    _check_unique([*presets, *(name for name, _ in parsed)])
    variants = dict(parsed)
    if not presets and not variants:
        raise ConfigError("--presets is empty; e.g. --presets seed,fast")
    for p in presets:
        preset_overrides(p)  # validates the name before anything runs
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.source={args.data}")
    if args.model:
        overrides.insert(0, f"model.name={args.model}")
    logging.basicConfig(level=logging.WARNING)
    try:
        rows = run_bench(
            presets, args.steps, args.warmup, args.config, overrides, args.task, args.json, rounds=args.rounds,
            variants=variants,
        )
    except BenchStopped:
        return STOPPED_EXIT
    return 1 if any((row["error"] or "").startswith(FAILED) for row in rows) else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="training throughput of presets (seed = the series' recipe, fast = radtrain's default, user)",
        description=(
            "Run the real training step for each preset on the same data and model and report captions/s, "
            "real tokens/s, padding fraction, peak memory and (GPU) MFU. Overrides apply to every preset "
            "except for the speed keys the seed and fast presets fix: " + ", ".join(SPEED_KEYS)
        ),
    )
    p.add_argument("--data", help="data source (shortcut for data.source=...)")
    p.add_argument("--model", help="model name (shortcut for model.name=...), e.g. scratch:small")
    p.add_argument("--presets", default="seed,fast", help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per preset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernel plans, compile)")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="split the timed steps into this many interleaved rounds (fair ratios on a shared, noisy CPU)",
    )
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
        help="an extra preset named NAME: the user's configuration plus these overrides (repeatable), "
        "e.g. --variant b512:train.batch_size=512 --variant b512_padded:train.batch_size=512,data.packing=off",
    )
    p.add_argument("--task", default="classify", choices=("classify", "mlm"), help="which phase's step to time")
    p.add_argument(
        "--json",
        help="write the rows here (also when stopped by SIGTERM/SIGINT: the rows so far, exit 75; a preset "
        "that crashed is a row with its error, exit 1)",
    )
    p.add_argument("--config", "-c", help="YAML config (the 'user' preset; data/model for all)")
    p.add_argument("overrides", nargs="*", help="dotted overrides (the 'user' preset; data/model for all)")
    p.set_defaults(func=_cmd)

