"""One training loop for every task and every launcher (one CPU, DDP, DeepSpeed ZeRO, SLURM).

The loop decides batch composition, gradient accumulation, clipping, the schedule, evaluation,
checkpointing and resume; the task decides the model inputs, the loss and the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from radtrain import faults, models, packing
from radtrain.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    TrainerState,
    any_rank,
    checkpoint_layout,
    write_failed,
)
from radtrain.config import RunConfig
from radtrain.data.batching import (
    collate,
    eval_plan,
    packed_length,
    padded_width,
    plan_epoch,
    rank_slice,
    resolve_pad_multiple,
)
from radtrain.data.sources import DataError
from radtrain.data.tokens import TokenizedSplit, cache_root
from radtrain.io import write_text
from radtrain.metrics import is_better

log = logging.getLogger(__name__)

EXIT_RESUME = 75  # EX_TEMPFAIL: "stopped cleanly on a signal, start me again to resume"


class ResumeRequested(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and the run should be started again.

    ``requeue``: the signal asked for a requeue (USR1/USR2: SLURM's warning before a time limit,
    submitit's and radtrain's ``--signal``), not for the job to end (TERM/INT: ``scancel``, Ctrl-C;
    a preemption that requeues the job has SLURM requeue it). Agreed by every rank."""

    def __init__(self, message: str, requeue: bool = True) -> None:
        super().__init__(message)
        self.requeue = requeue


class NonFiniteLossError(RuntimeError):
    pass


class OutOfMemoryError(RuntimeError):
    """A training step did not fit in memory; the message says which step and what to change."""


def _generator(*seed_parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([abs(int(p)) for p in seed_parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    # As the HF Trainer the series used: no weight decay on biases and normalisation weights.
    # A model built under DeepSpeed ZeRO-3 (from_pretrained inside a ZeRO-3 run) holds empty 1-d
    # shards: its real shape is ds_shape. Empty groups are left out: DeepSpeed drops them, and the
    # LR scheduler (one lambda per group) would then no longer match the optimizer.
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, cfg.train.weight_decay), (no_decay, 0.0))
        if params
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_eps,
        # Fused (one kernel over all parameters) on CUDA and on CPU too: measured 3.5x faster than
        # the default per-tensor loop on CPU, which was a third of a small model's step.
        fused=_fused_adamw_supported() or None,
    )


def _fused_adamw_supported() -> bool:
    # torch >= 2.4 has a fused CPU AdamW; older builds only the CUDA one.
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return torch.cuda.is_available() or (major, minor) >= (2, 4)


def warmup_steps_for(warmup_ratio: float, total_steps: int) -> int:
    """The HF Trainer's warm-up length (TrainingArguments.get_warmup_steps): rounded up."""
    return math.ceil(warmup_ratio * total_steps)


class LinearWarmupDecay:
    """Exactly transformers.get_linear_schedule_with_warmup (the series' schedule): the factor for
    step s is s / warmup during warmup, so the first optimizer step runs at lr 0 when warmup > 0.
    A callable object rather than a closure: LambdaLR saves its attributes with the scheduler state,
    and a resumed run can keep the warm-up its checkpoint was trained with."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmupDecay(warmup_steps, total_steps))


def agree_stop(votes: torch.Tensor) -> tuple[bool, bool]:
    """(stop, end without requeue) from the ranks' summed ``[asks_end, asks_requeue]`` votes:
    stop if any rank saw a signal; end only if one saw TERM/INT and none the time-limit warning."""
    ends, requeue = bool(votes[0] > 0), bool(votes[1] > 0)
    return ends or requeue, ends and not requeue


class StopFlag:
    """Remembers SIGTERM/SIGINT/SIGUSR1/SIGUSR2 until the next step boundary."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
    ENDING = (signal.SIGTERM, signal.SIGINT)  # stop, do not requeue (scancel, Ctrl-C)

    def __init__(self) -> None:
        self.signum: int | None = None  # the last one, for messages
        self.seen: set[int] = set()
        self._previous: dict[int, object] = {}

    @property
    def asks_end(self) -> bool:
        return bool(self.seen & set(self.ENDING))

    @property
    def asks_requeue(self) -> bool:
        """USR1/USR2: the time-limit warning. It wins over a TERM that follows it (the limit's own
        TERM can come before the next step boundary when the warning landed in an evaluation)."""
        return bool(self.seen - set(self.ENDING))

    def install(self) -> None:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner thread)
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.seen.add(signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)


class Trainer:
    def __init__(
        self,
        *,
        cfg: RunConfig,
        task,
        accelerator,
        model,
        train_split: TokenizedSplit,
        eval_split: TokenizedSplit,
        pad_id: int,
        run_dir: Path,
        on_best: Callable[[object, TrainerState, dict], None],
        tracker=None,
        started: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.started = started or time.time()  # this start's: the phase's clock includes data loading
        self.wall_time_before = 0.0  # earlier starts', from the checkpoint resumed
        self.task = task
        self.acc = accelerator
        self.train_split = train_split
        self.eval_split = eval_split
        self.pad_id = pad_id
        # Widths and packed lengths are multiples of this (data.pad_to_multiple_of; None: per device).
        self.pad_multiple = resolve_pad_multiple(cfg.data.pad_to_multiple_of, accelerator.device.type)
        self.run_dir = Path(run_dir)
        self.on_best = on_best
        self.tracker = tracker
        self.metric = cfg.train.metric_for_best if task.name == "classify" else task.default_metric
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.micro_global_batch = cfg.train.batch_size * self.world  # captions per micro-step, all ranks
        self.step_batch = self.micro_global_batch * cfg.train.grad_accum  # captions per optimizer step
        self.lengths = train_split.lengths
        self.steps_per_epoch = len(self._epoch_steps(0))
        if self.steps_per_epoch == 0:
            raise DataError("the training split has no captions; check data.source and data.max_train_samples")
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.ckpt = CheckpointManager(
            self.run_dir, cfg.fingerprint(task.name), self.world, cfg.train.save_total_limit,
            data_digest=train_split.digest(), config=cfg, task=task.name, layout=checkpoint_layout(accelerator),
        )
        # Padding-free training micro-batches where a varlen attention kernel makes it pay (see
        # radtrain/packing.py); evaluation always pads. Decided before prepare() wraps the model.
        self.packing = packing.resolve(
            cfg.data.packing, model, accelerator.device, accelerator.mixed_precision, cfg.model.attn_implementation
        )
        if self.packing:
            packing.enable(
                model, cfg.model.attn_implementation, accelerator.mixed_precision, cfg.data.packed_attention,
                device=accelerator.device,
            )
        self.attention = getattr(model.config, "_attn_implementation", None)
        if cfg.train.compile:
            cache = models.use_compile_cache(cache_root(cfg.data.cache_dir) / "inductor")
            log.info("torch.compile caches: %s", cache or "torch's default folder")
            # Padded batches: the first shape is compiled static, later ones share one dynamic graph.
            # Packed batches change length at every step, so a static first graph is always thrown
            # away: compile the dynamic one at once.
            models.compile_in_place(model, dynamic=True if self.packing else None)
        optimizer = build_optimizer(model, cfg)
        warmup = warmup_steps_for(cfg.train.warmup_ratio, self.total_steps)
        scheduler = linear_schedule(optimizer, warmup, self.total_steps)
        self.schedule = scheduler.lr_lambdas[0]  # its warm-up is the one place the run's warm-up lives
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.state = TrainerState(total_steps=self.total_steps, warmup_steps=warmup)
        self.stop = StopFlag()
        self.stop_requested = False  # a stop signal seen by any rank, agreed at the last step
        self.stop_ends = False  # ... and a TERM/INT among them: end, do not requeue (agreed likewise)
        # A log row the main process could not write: every rank raises once it is agreed (the
        # next step's flags, or the evaluation), so none waits in a collective for the main one.
        self.write_error: tuple[Path, OSError] | None = None

    def _keep_checkpoint_warmup(self) -> None:
        """A resumed run keeps the warm-up it started with: radtrain before 2026-11-28 rounded the
        warm-up down (int) where the HF Trainer rounds up; changing it mid-run would shift every
        later learning rate."""
        recorded = self.state.warmup_steps
        if recorded is None:  # a checkpoint of the version that rounded down
            recorded = int(self.cfg.train.warmup_ratio * self.total_steps)
        if recorded != self.schedule.warmup_steps:
            log.info("keeping the checkpoint's %d warm-up steps (this version would plan %d)",
                     recorded, self.schedule.warmup_steps)
        self.schedule.warmup_steps = self.state.warmup_steps = recorded

    # -- data ----------------------------------------------------------------------------------

    def _epoch_steps(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's optimizer steps, each a list of grad_accum micro global batches.

        The plan is cut in optimizer-step batches first (batch_size x grad_accum x processes
        captions), then into micro-batches, then per rank: batch 16 on one process, batch 8 x
        accum 2, and batch 8 on two processes all train on exactly the same captions per step.
        Nothing is dropped: a micro-batch with fewer captions than processes is trained with
        zero-weight fillers on the ranks it leaves empty (see _step), so the plan, the number of
        steps and the updates do not depend on the process count.
        """
        steps = []
        plan = plan_epoch(
            self.lengths, self.step_batch, seed=self.cfg.train.seed, epoch=epoch,
            bucket=self.cfg.data.bucket_by_length,
        )
        for batch in plan:
            size = self.micro_global_batch
            steps.append([batch[i : i + size] for i in range(0, len(batch), size)])
        return steps

    def _padding(self) -> dict[str, int | None]:
        data = self.cfg.data
        return {
            "pad_to_multiple_of": self.pad_multiple,
            "pad_to_length": data.max_length if data.padding == "max_length" else None,
        }

    def _collate(self, split: TokenizedSplit, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return collate(split, indices, self.pad_id, **self._padding())

    def _pack(self, batch: dict[str, torch.Tensor]) -> dict:
        """One packed row, its length bounded like padded widths (self.pad_multiple)."""
        return packing.pack(
            batch, token_labels=self.task.name == "mlm", pad_id=self.pad_id,
            pad_to_multiple_of=self.pad_multiple,
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Non-tensors (a packed batch's max_seqlen) stay Python values: the kernels want ints.
        return {k: v.to(self.acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # -- resume --------------------------------------------------------------------------------

    def resume(self) -> CheckpointInfo | None:
        """Continue from the newest complete checkpoint of this run directory, if any.

        A checkpoint that fails its checksums or does not load is reported and the previous one is
        tried. If checkpoints exist but none loads, stop rather than silently start over (rotation
        would then delete them). Optimizer, scheduler and RNG states are loaded with
        ``weights_only=True`` (no arbitrary unpickling; accelerate allow-lists the numpy types of
        the RNG state); the weights are safetensors. DeepSpeed's own loader does unpickle.
        """
        candidates = self.ckpt.complete_checkpoints()
        damaged = self.ckpt.damaged_checkpoints()
        for path, why in damaged:
            log.warning("checkpoint %s cannot be resumed from (%s)", path, why)
        failures = [f"{path.name}: {why}" for path, why in damaged]
        for info in candidates:
            self.ckpt.check_compatible(info)
            # Every rank takes the same decision for each candidate (any_rank), so all ranks resume
            # from the same step or fall back together. The checksums (every byte of the
            # checkpoint) are read by the main rank only; the others learn its verdict.
            error: BaseException | None = None
            if self.acc.is_main_process:
                try:
                    self.ckpt.verify(info)
                except Exception as exc:
                    error = exc
            if not any_rank(self.acc, error is not None):
                try:
                    self.acc.load_state(str(info.path), load_kwargs={"weights_only": True})
                    self.state = self.ckpt.load_state(info)
                except Exception as exc:  # a checkpoint that validates but does not load: try the previous
                    error = exc
            if any_rank(self.acc, error is not None):
                if error is None:
                    error = CheckpointError("another process could not verify or load it")
                log.warning("checkpoint %s could not be loaded (%s: %s); trying the previous one",
                            info.path, type(error).__name__, error)
                failures.append(f"{info.path.name}: {type(error).__name__}: {error}")
                continue
            planned = self.state.total_steps
            if planned and planned != self.total_steps:
                raise CheckpointError(
                    f"{info.path} belongs to a run planned for {planned} optimizer steps; with the same "
                    f"configuration and data this run plans {self.total_steps} (a radtrain version that "
                    "plans epochs differently?). Resuming would make the learning-rate schedule jump. Finish "
                    "the run with the radtrain version that started it, or start a new output_dir with "
                    "model.init_from=<run>/best."
                )
            self.state.total_steps = self.total_steps
            self.state.starts += 1
            self.wall_time_before = self.state.wall_time_s
            self._keep_checkpoint_warmup()
            self.ckpt.last_saved_step = info.step
            self._truncate_logs(self.state.global_step)
            log.info(
                "resumed from %s (step %d, epoch %d, batch %d of the epoch)",
                info.path, self.state.global_step, self.state.epoch, self.state.steps_in_epoch,
            )
            return info
        if failures:  # starting over would empty the logs and replace best/ (and rotation the checkpoints)
            raise CheckpointError(
                f"no checkpoint in {self.ckpt.root} could be loaded ({'; '.join(failures)}). Move "
                f"{self.ckpt.root} aside to start this run from step 0, or use a new output_dir."
            )
        self._truncate_logs(0)  # rows of an earlier attempt killed before its first checkpoint
        return None

    def _truncate_logs(self, step: int) -> None:
        """Rows written after the checkpoint we resume from would be written again: drop them."""
        if not self.acc.is_main_process:
            return
        for name in ("metrics.jsonl", "train_log.jsonl"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if row.get("step", 0) <= step:
                    kept.append(line)
            write_text(path, "".join(k + "\n" for k in kept))

    # -- the loop ------------------------------------------------------------------------------

    def describe(self) -> dict:
        mean_len = float(self.lengths.mean()) if len(self.lengths) else 0.0
        return {
            "processes": self.world,
            "per_device_batch": self.cfg.train.batch_size,
            "grad_accum": self.cfg.train.grad_accum,
            "global_batch": self.step_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "train_captions": len(self.train_split),
            "mean_caption_tokens": round(mean_len, 1),
            "real_tokens_per_step": round(mean_len * self.step_batch),
            "precision": "fp32" if self.acc.mixed_precision == "no" else self.acc.mixed_precision,
            "packed": bool(self.packing),
            "attention": self.attention,
        }

    def train(self) -> TrainerState:
        info = self.describe()
        if self.acc.is_main_process:
            print(
                f"[radtrain] {self.task.name}: {info['processes']} process(es) x batch {info['per_device_batch']} "
                f"x accum {info['grad_accum']} = global batch {info['global_batch']}; "
                f"{info['steps_per_epoch']} steps/epoch, {info['total_steps']} steps; "
                f"~{info['real_tokens_per_step']} real tokens/step (mean {info['mean_caption_tokens']} tokens/caption); "
                f"{info['precision']}, {'packed' if info['packed'] else 'padded'} batches, {info['attention']} attention",
                flush=True,
            )
        self.stop.install()
        progress = None
        if self.acc.is_main_process and os.environ.get("RADTRAIN_PROGRESS", "1") != "0":
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.state.global_step, desc=self.task.name, leave=False)
        try:
            self._loop(progress)
            # A signal during the last step's evaluation, export or save arrives after the last
            # step's agreement: the loop has ended and would drop it (a scheduler's warning lost,
            # a Ctrl-C ignored). Agreed by every rank, it stops the run here like anywhere else;
            # the rerun resumes at the end and only evaluates the test split.
            self._agree_stop(self.acc.reduce(self._stop_votes(), "sum").cpu())
            if self.stop_requested:
                self._save_checkpoint()  # a no-op: the last step was just saved
                raise ResumeRequested(
                    f"stopped on {self._stop_reason()} after the last step ({self.state.global_step}); checkpoint saved",
                    requeue=not self.stop_ends,
                )
        finally:
            self.stop.restore()
            if progress is not None:
                progress.close()
        return self.state

    def _stop_votes(self) -> torch.Tensor:
        """This rank's [an ending signal seen (TERM/INT), a requeue signal seen (USR1/USR2)], to
        be summed over the ranks (``_agree_stop``)."""
        return torch.tensor([float(self.stop.asks_end), float(self.stop.asks_requeue)], device=self.acc.device)

    def _agree_stop(self, votes: torch.Tensor) -> None:
        self.stop_requested, self.stop_ends = agree_stop(votes)

    def _stop_reason(self) -> str:
        """The stop is agreed by every rank, the signal is seen by one (or some) of them."""
        if self.stop.signum is None:
            return "a signal received by another process"
        return f"signal {self.stop.signum} ({signal.Signals(self.stop.signum).name})"

    def _loop(self, progress) -> None:
        st, cfg = self.state, self.cfg
        last_eval_step = st.history[-1]["step"] if st.history else -1
        while st.global_step < self.total_steps:
            epoch, steps = st.epoch, self._epoch_steps(st.epoch)
            # `st.epoch == epoch`: at the end of an epoch steps_in_epoch is reset to 0, and without
            # this check the next epoch would replay this epoch's plan (a resumed run would not).
            while st.epoch == epoch and st.steps_in_epoch < len(steps) and st.global_step < self.total_steps:
                micro = steps[st.steps_in_epoch]
                t0 = time.perf_counter()
                try:
                    loss_sum, items = self._step(st.epoch, st.steps_in_epoch, micro)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise OutOfMemoryError(self._out_of_memory_message(micro)) from exc
                st.steps_in_epoch += 1
                st.train_time_s += time.perf_counter() - t0
                for batch in micro:
                    st.captions_seen += len(batch)
                    st.tokens_seen += int(self.lengths[batch].sum())
                st.log_window_loss += loss_sum
                st.log_window_items += items
                if progress is not None:
                    progress.update(1)
                if st.global_step % cfg.train.log_every_steps == 0 and st.log_window_items:
                    self._log_train(st.log_window_loss / st.log_window_items)
                    st.log_window_loss, st.log_window_items = 0.0, 0
                epoch_done = st.steps_in_epoch >= len(steps)
                if epoch_done:
                    st.epoch += 1
                    st.steps_in_epoch = 0
                due = (
                    epoch_done
                    or (cfg.train.eval_every_steps and st.global_step % cfg.train.eval_every_steps == 0)
                    or st.global_step >= self.total_steps
                )
                if due and st.global_step != last_eval_step:
                    self._evaluate_and_save()
                    last_eval_step = st.global_step
                elif cfg.train.save_every_steps and st.global_step % cfg.train.save_every_steps == 0:
                    self._save_checkpoint()
                if self.stop_requested:
                    self._save_checkpoint()  # a no-op when this step was just saved above
                    raise ResumeRequested(
                        f"stopped on {self._stop_reason()} at step {st.global_step}; checkpoint saved",
                        requeue=not self.stop_ends,
                    )

    def _host_batches(
        self, epoch: int, step_in_epoch: int, micro: list[np.ndarray]
    ) -> tuple[list[dict[str, torch.Tensor]], list[bool], int]:
        """This rank's micro-batches of one step, collated, prepared (MLM masks), packed and on the
        device; which of them are fillers; and the items (loss terms) of the real ones. Host work the
        GPU waits for at the start of every step (bench reports it as host ms/step)."""
        cfg = self.cfg
        batches, fillers, local_items = [], [], 0
        for global_batch in micro:
            mine = rank_slice(global_batch, self.rank, self.world)
            # A micro-batch with fewer captions than processes leaves some ranks without one. Such a
            # rank trains on a caption of the batch with its loss multiplied by 0: it still runs
            # forward and backward (DDP's and ZeRO's collectives need every rank), adds nothing to
            # the gradient or the item count, and the update equals a single process's.
            fillers.append(len(mine) == 0)
            batch = self._collate(self.train_split, global_batch[:1] if fillers[-1] else mine)
            # The same generator on every rank and every micro-batch of the step: the task draws per
            # caption from it, so MLM masks are a function of seed, epoch, step and caption, not of
            # the rank, the padding, or how the step is cut into micro-batches (batch 16, or 8 x
            # accumulation 2, trains the same masks).
            batch = self.task.prepare(batch, _generator(cfg.train.seed, epoch, step_in_epoch))
            if self.packing:  # after prepare: MLM masks are drawn on the padded batch either way
                batch = self._pack(batch)
            batch = self.task.finish_batch(batch)
            if not fillers[-1]:
                local_items += self.task.num_items(batch)  # counted on the CPU copy: no device sync
            batches.append(self._to_device(batch))
        return batches, fillers, local_items

    def _step(self, epoch: int, step_in_epoch: int, micro: list[np.ndarray]) -> tuple[float, int]:
        """One optimizer step over the micro global batches in `micro`; this rank trains on its
        slice of each. Returns (summed loss, items) of the whole step divided by the process count."""
        cfg, st = self.cfg, self.state
        batches, fillers, local_items = self._host_batches(epoch, step_in_epoch, micro)
        # The loss is normalised by the items of the whole global batch (all micro-batches, all
        # ranks) so that accumulation and the process count do not change the gradient. One
        # all-reduce of a scalar per optimizer step (none, and so no GPU sync, on one process).
        global_items = local_items
        if self.world > 1:
            counted = torch.tensor(float(local_items), device=self.acc.device)
            global_items = int(self.acc.reduce(counted, "sum").item())
        # accelerate divides by grad_accum (DeepSpeed by its own GAS, the same number) and DDP
        # averages over ranks; undo both so the result is sum(loss) / global_items.
        scale = self.world * self.acc.gradient_accumulation_steps / max(global_items, 1)
        total = torch.zeros((), device=self.acc.device)
        self.model.train()
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            self.acc.sync_gradients = last
            context = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with context:
                faults.hit("forward")  # test hook (an out-of-memory forward pass)
                loss_sum = faults.poison_loss(self.task.loss_sum(self.model, batch), st.global_step + 1)
                if fillers[j]:
                    loss_sum = loss_sum * 0.0
                self.acc.backward(loss_sum * scale)
            total += loss_sum.detach().float()
        faults.hit("step", st.global_step + 1)  # test hook (kill / signal inside a step)
        grad_norm = None
        if cfg.train.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
        # This .item() is a CPU-GPU sync point, once per optimizer step: it carries the loss for
        # logging, the non-finite check and the stop signal, so all ranks decide together.
        device = self.acc.device
        bad_norm = torch.zeros((), device=device)
        if grad_norm is not None:
            bad_norm = (~torch.isfinite(torch.as_tensor(grad_norm, device=device, dtype=torch.float32))).float()
        write_failed = torch.tensor(float(self.write_error is not None), device=device)
        flags = torch.cat([torch.stack([total, bad_norm, write_failed]), self._stop_votes()])
        flags = self.acc.reduce(flags, "sum").cpu()
        loss_total, bad_norm = float(flags[0]), bool(flags[1] > 0)
        self._raise_if_a_write_failed(bool(flags[2] > 0))
        self._agree_stop(flags[3:])
        if not math.isfinite(loss_total) or bad_norm:
            self.optimizer.zero_grad(set_to_none=True)
            st.nan_steps_skipped += 1
            st.consecutive_nan_steps += 1
            log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                        st.global_step + 1, st.consecutive_nan_steps)
            if st.consecutive_nan_steps >= cfg.train.max_nan_steps:
                raise NonFiniteLossError(
                    f"{st.consecutive_nan_steps} optimizer steps in a row had a non-finite loss or gradient "
                    f"(train.max_nan_steps={cfg.train.max_nan_steps}). The last good checkpoint is kept in "
                    f"{self.ckpt.root}. Lower train.lr, check the data, or use train.precision=fp32."
                )
            st.global_step += 1  # the schedule advances: a skipped step is still a step
            self.scheduler.step()
            return 0.0, 0
        st.consecutive_nan_steps = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.global_step += 1
        # Per-rank averages as floats: their ratio is the step's mean loss. (An integer division of
        # the items skewed the logged loss by up to 1/items, 2.6% on a tiny MLM step.)
        return loss_total / self.world, global_items / self.world

    def _largest_micro_batch(self, micro: list[np.ndarray]) -> tuple[int, int, str]:
        """(captions, real tokens, computed shape) of this rank's largest micro-batch of a step."""
        largest = (0, 0, 0, "nothing")
        for global_batch in micro:
            lengths = self.lengths[rank_slice(global_batch, self.rank, self.world)]
            n, real = len(lengths), int(lengths.sum())
            if self.packing:
                computed = packed_length(real, self.pad_multiple)
                shape = f"one packed row of {computed} tokens"
            else:
                width = padded_width(int(lengths.max()) if n else 0, **self._padding())
                computed, shape = n * width, f"{n} x {width} padded"
            if computed > largest[2]:
                largest = (n, real, computed, shape)
        return largest[0], largest[1], largest[3]

    def _out_of_memory_message(self, micro: list[np.ndarray]) -> str:
        cfg, st = self.cfg, self.state
        captions, real, shape = self._largest_micro_batch(micro)
        saved = self.ckpt.complete_checkpoints()
        kept = f"the checkpoint of step {saved[0].step} in {self.ckpt.root} is kept" if saved else "no checkpoint was written yet"
        return (
            f"out of memory on {self.acc.device} in optimizer step {st.global_step + 1} (largest micro-batch on this "
            f"process: {captions} captions, {real} real tokens, {shape}). "
            f"train.batch_size={cfg.train.batch_size} per process does not fit: halve train.batch_size and double "
            f"train.grad_accum (same global batch, same results), lower data.max_length, or use a DeepSpeed ZeRO "
            f"config (accelerate_configs/). Those settings change the run's plan, so start it in a new "
            f"output_dir; {kept}."
        )

    def _log_train(self, loss: float) -> None:
        st = self.state
        row = {
            "step": st.global_step,
            "epoch": round(st.epoch + st.steps_in_epoch / max(1, self.steps_per_epoch), 4),
            "train_loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "captions_per_s": st.captions_seen / max(st.train_time_s, 1e-9),
            "tokens_per_s": st.tokens_seen / max(st.train_time_s, 1e-9),
        }
        if self.acc.is_main_process:
            self._append_row("train_log.jsonl", row)
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=st.global_step)

    def _append_row(self, name: str, row: dict) -> None:
        """Main process. A full disk here was a traceback (exit 1) on the main process alone; it
        is now the checkpoint write's clean error (exit 2, what to free, the checkpoint the next
        start resumes from), raised on every rank once agreed (``_raise_if_a_write_failed``). A
        torn last line is dropped by that start (``_truncate_logs``)."""
        if self.write_error is not None:
            return
        path = self.run_dir / name
        try:
            faults.hit("result-write")  # test hook (a full disk as the row is appended)
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as error:
            self.write_error = (path, error)

    def _raise_if_a_write_failed(self, agreed: bool) -> None:
        if not agreed:
            return
        if self.write_error is None:
            raise CheckpointError(
                f"the main process could not write a log row (its error says what). {self.ckpt.kept_message()}"
            )
        path, error = self.write_error
        raise CheckpointError(write_failed(path, error, self.ckpt.kept_message())) from error

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, split: TokenizedSplit) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        return evaluate_split(
            self.task, self.model, self.acc, split, self._collate,
            self.cfg.train.eval_batch_size or self.cfg.train.batch_size, self.cfg.train.seed,
        )

    def _evaluate_and_save(self) -> None:
        st = self.state
        metrics, gathered = self.evaluate(self.eval_split)
        faults.hit("eval")  # test hook: forward passes done, nothing written yet
        epoch = round(st.epoch + st.steps_in_epoch / max(1, self.steps_per_epoch), 4)
        row = {"step": st.global_step, "epoch": epoch, **metrics}
        value = metrics[self.metric]
        improved = is_better(self.metric, value, st.best_metric)
        if improved:
            st.best_metric, st.best_step, st.best_epoch = value, st.global_step, epoch
        st.history.append(row)
        if self.acc.is_main_process:
            self._append_row("metrics.jsonl", row)
        self._raise_if_a_write_failed(any_rank(self.acc, self.write_error is not None))
        if self.acc.is_main_process:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"[radtrain] eval step {st.global_step} epoch {epoch}: {shown}{' *' if improved else ''}", flush=True)
            if self.tracker is not None:
                self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=st.global_step)
        if improved:
            self.on_best(self.model, st, gathered)
        self._save_checkpoint()

    def wall_time_s(self) -> float:
        """Wall-clock seconds of the run so far: earlier starts up to their last checkpoint, and this one."""
        return self.wall_time_before + time.time() - self.started

    def _save_checkpoint(self) -> None:
        self.state.wall_time_s = self.wall_time_s()
        self.ckpt.save(self.acc, self.state)


def evaluate_split(
    task, model, accelerator, split: TokenizedSplit, collate_fn, batch_size: int, seed: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Evaluate on every rank (same number of forward passes each), gather, compute metrics."""
    world, rank = accelerator.num_processes, accelerator.process_index
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    for indices in eval_plan(len(split), split.lengths, batch_size, world, rank):
        batch = collate_fn(split, indices)
        # Evaluation masks (MLM) are fixed: a caption gets the same masks at every evaluation,
        # whatever the process count or batch composition (the task draws per caption).
        batch = task.finish_batch(task.prepare(batch, _generator(seed, 1_000_003)))
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        for key, value in task.eval_step(model, batch).items():
            outputs[key].append(value.detach().float() if value.is_floating_point() else value.detach())
    gathered = {k: accelerator.gather(torch.cat(v)).cpu().numpy() for k, v in outputs.items()}
    if "index" in gathered:
        # Per-caption outputs (the classifier): the targets, and the gold CUIs outside the label
        # space that f1_samples counts, come from the split itself, on the host. Gathered from the
        # devices, the targets were as large as the probabilities (10k captions x 9k CUIs: 360 MB
        # more on every GPU). Filler rows (index -1) are dropped later.
        rows = np.maximum(gathered["index"], 0)
        if split.has_targets:
            gathered["labels"] = split.targets(rows)
        outside = split.targets_outside if split.targets_outside is not None else np.zeros(len(split), np.int32)
        gathered["labels_outside"] = outside[rows]
    return task.finish_eval(gathered), gathered


def is_out_of_memory(exc: BaseException) -> bool:
    """The allocator refused a tensor: CUDA's OutOfMemoryError, the CPU allocator's failure (a
    plain RuntimeError in torch), a kernel library's failed allocation, or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory")
    )


__all__ = ["Trainer", "ResumeRequested", "NonFiniteLossError", "OutOfMemoryError", "is_out_of_memory", "EXIT_RESUME", "evaluate_split"]
