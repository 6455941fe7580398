"""Run one phase (MLM or classifier) end to end in a run directory.

source -> splits -> label space -> tokenizer -> tokenized splits -> task + model -> Trainer
-> best/ export -> test evaluation of best/ (classifier only) -> summary.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radtrain import faults, models, packing
from radtrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    any_rank,
    checkpoint_layout,
    recorded_task,
    write_failed,
)
from radtrain.config import PHASES, ConfigError, ModelConfig, RunConfig, config_differences, read_saved_config
from radtrain.data.labels import LabelSpace, load_name_mapping
from radtrain.data.sources import Split, load_splits
from radtrain.data.tokens import TokenizedSplit, tokenize_texts
from radtrain.distributed import make_accelerator
from radtrain.export import LABELS_FILE, export_model, read_thresholds, recover_dir
from radtrain.io import sha256_file, write_json, write_text
from radtrain.tasks import MLMTask, MultiLabelTask
from radtrain.trainer import Trainer, evaluate_split

log = logging.getLogger(__name__)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "DeepSpeed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        # Native bf16 only (Ampere and newer): torch's default also says yes where bf16 is emulated
        # (V100, T4), which have no bf16 tensor cores and whose flash kernels packing cannot use.
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def _base_model(model_cfg: ModelConfig) -> str:
    """The pretrained model a run's weights descend from. With model.init_from, model.name is not
    used at all (its default would name a model the run never loaded): the base is init_from's
    own base when it is a radtrain export, else init_from itself."""
    from radtrain.export import read_meta

    init_from = model_cfg.init_from
    if not init_from:
        return model_cfg.name
    try:
        return str(read_meta(init_from).get("base_model") or init_from)
    except (OSError, ValueError):
        return init_from


def check_model_source(source: str | None, key: str = "model.init_from") -> None:
    """A model to load (model.init_from, model.name, baseline --model) must be a model directory
    (e.g. a run's best/) or a Hub id; the common slip is the run directory itself."""
    if not source or source.startswith("scratch:"):
        return
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        hint = (
            f" Did you mean {path / 'best'} (the run's export)?"
            if (path / "best" / "config.json").is_file()
            else " Point it at a Hugging Face model directory such as a run's best/."
        )
        raise ConfigError(f"{key}={source!r} is a directory without config.json.{hint}")
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ConfigError(f"{key}={source!r}: no such directory (a local path, not a Hub id)")


def ensure_writable(run_dir: Path) -> None:
    """Fail at start, before any training, when output_dir cannot be written."""
    probe = run_dir / ".radtrain-write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} is not writable ({exc.strerror or exc}); choose a directory "
            "you can write to (--output-dir), or fix its permissions / free space"
        ) from exc


def check_run_dir(cfg: RunConfig, phase: str, world_size: int, layout: str | None = None) -> None:
    """Refuse, before anything is written, an output_dir holding another run's checkpoints or
    (with no checkpoint to resume) another run's results: starting over would empty its logs and
    replace its best/ export. A directory with the same settings and no checkpoint is retrained
    from step 0 (the same run again)."""
    run_dir = Path(cfg.output_dir)
    manager = CheckpointManager(
        run_dir, cfg.fingerprint(phase), world_size, cfg.train.save_total_limit, config=cfg, task=phase,
        layout=layout,
    )
    newest = manager.complete_checkpoints()
    if newest:
        manager.check_compatible(newest[0])
        return
    results = [name for name in ("best", "summary.json", "metrics.jsonl") if (run_dir / name).exists()]
    if not results:
        return
    other_task = recorded_task(run_dir)
    if other_task not in (None, phase):  # an MLM run's, a baseline's, ...
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a {other_task} run's results ({', '.join(results)}); this {phase} "
            f"run would overwrite them. Use a new --output-dir (model.init_from={run_dir / 'best'} starts from "
            "that run's export)."
        )
    saved = read_saved_config(run_dir)
    differences = config_differences(saved, cfg) if saved is not None else []
    if differences:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds the results ({', '.join(results)}) of a run with other settings "
            f"({'; '.join(differences)}; saved in {run_dir / 'config.yaml'}) and no checkpoint to resume: this run "
            "would start over and overwrite them. Use a new --output-dir, or the saved settings to train that run again."
        )
    log.warning("%s has results (%s) but no checkpoint to resume: training the same run again from step 0",
                run_dir, ", ".join(results))




def _warn_if_publishing_cannot_work(cfg: RunConfig, phase: str) -> None:
    """Said at start, not after hours of training: the push at the end would fail (exit 3, the
    results kept) without the Hub or a token, or with a bad $RADTRAIN_HUB_TIMEOUT_S (refused)."""
    if phase != "classify" or not cfg.hub.repo_id:
        return
    from radtrain.hub import hub_timeout_s

    hub_timeout_s()  # a bad $RADTRAIN_HUB_TIMEOUT_S fails now, not after training
    if os.environ.get("RADTRAIN_HUB_RECORDER"):
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif not get_token():
        why = "no Hugging Face token is found (HF_TOKEN or `hf auth login`)"
    else:
        return
    log.warning("hub.repo_id=%s but %s: the run will train and test, then fail to publish (exit 3, results kept); "
                "publish later with `radtrain push %s`", cfg.hub.repo_id, why, cfg.output_dir)


def label_names(cfg: RunConfig, splits: dict[str, Split]) -> dict[str, str]:
    from radtrain.data.cui_names import CUI_NAMES

    names = dict(CUI_NAMES)
    for split in splits.values():
        names.update(split.names)
    if cfg.data.label_names:
        names.update(load_name_mapping(cfg.data.label_names))
    return names


def configure_cuda() -> None:
    """Kernel choices for every GPU step (training, bench): no-ops without CUDA."""
    if torch.cuda.is_available():
        # cuDNN's SDPA builds a new plan for every new sequence length (measured: 805 vs 314
        # captions/s on an H100 with length-bucketed batches); the flash/efficient kernels do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True


def fit_label_space(cfg: RunConfig, splits: dict[str, Split]) -> LabelSpace:
    """The classifier's labels: fitted on the training split only."""
    return LabelSpace.fit(splits["train"].labels, cfg.data.min_label_count, label_names(cfg, splits))


def load_or_train_tokenizer(cfg: RunConfig, train_texts: list[str]):
    """init_from's tokenizer, a Hub/local one, or (scratch) one trained on ``train_texts``."""
    if cfg.model.init_from:
        return models.load_tokenizer(cfg.model.init_from, cfg.model.trust_remote_code)
    if not cfg.model.is_scratch:
        return models.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    return models.train_scratch_tokenizer(train_texts, cfg.model.name.split(":", 1)[1], cfg.data.max_length)


def build_model(phase: str, cfg: RunConfig, tokenizer, label_space: LabelSpace | None):
    """The phase's model, initialised from cfg.train.seed (the same weights on every rank)."""
    if phase == "mlm":
        return models.build_mlm_model(cfg.model, tokenizer, cfg.train.seed)
    return models.build_classifier(cfg.model, tokenizer, label_space.cuis, cfg.train.seed)


def prepare_tokenizer(cfg: RunConfig, accelerator, run_dir: Path, train_texts: list[str]):
    """load_or_train_tokenizer, with a scratch tokenizer trained by the main process only and
    shared with the other ranks through the run directory."""
    if cfg.model.init_from or not cfg.model.is_scratch:
        return load_or_train_tokenizer(cfg, train_texts)
    tok_dir = run_dir / "tokenizer"
    if accelerator.is_main_process and not _scratch_tokenizer_reusable(tok_dir, cfg, train_texts, run_dir):
        tokenizer = load_or_train_tokenizer(cfg, train_texts)
        tmp = run_dir / "tokenizer.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / TOKENIZER_STAMP, _tokenizer_stamp(cfg, train_texts))
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.replace(tmp, tok_dir)
    accelerator.wait_for_everyone()
    return models.load_tokenizer(str(tok_dir))


TOKENIZER_STAMP = "radtrain-trained-on.json"


def _tokenizer_stamp(cfg: RunConfig, train_texts: list[str]) -> dict[str, Any]:
    """What a scratch tokenizer was trained for: its shape and the exact training captions."""
    digest = hashlib.sha256()
    for text in train_texts:
        digest.update(text.encode("utf-8") + b"\0")
    return {"model": cfg.model.name, "max_length": cfg.data.max_length, "train_texts_sha256": digest.hexdigest()}


def _scratch_tokenizer_reusable(tok_dir: Path, cfg: RunConfig, train_texts: list[str], run_dir: Path) -> bool:
    """The run directory's scratch tokenizer is this run's. Where checkpoints exist it is theirs
    and is never replaced (their data digest covers the tokenization: a run on other captions is
    refused there, and the tokenizer is still here when the original data comes back). Without
    checkpoints it must have been trained for the same shape on the same captions: an earlier
    attempt that died before its first checkpoint, with other data or another size, left its own."""
    if not (tok_dir / "tokenizer.json").is_file():
        return False
    if any((run_dir / "checkpoints").glob("step-*")):
        return True
    try:
        stamp = json.loads((tok_dir / TOKENIZER_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _tokenizer_stamp(cfg, train_texts)


def tokenize_split(tokenizer, split: Split, cfg: RunConfig, labels: LabelSpace | None, name: str) -> TokenizedSplit:
    tokenized = tokenize_texts(tokenizer, split.texts, cfg.data.max_length, cfg.data.cache_dir)
    if labels is not None:
        tokenized.set_labels(*labels.encode_sparse(split.labels, split_name=name), num_labels=len(labels))
        tokenized.targets_outside = labels.count_outside(split.labels)
    return tokenized


def _main_process_thresholds(accelerator, cfg: RunConfig, gathered: dict, label_space: LabelSpace, run_dir: Path):
    """The best model's decision thresholds, tuned on its gathered VALIDATION outputs by the main
    process alone (it alone writes them and the per-label plot data; at 9k labels tuning takes
    seconds that the other ranks would spend on the same sums). Other ranks get None. A failure
    is agreed, so the other ranks raise too instead of waiting in the export's gather."""
    from radtrain.plots import PER_LABEL_FILE
    from radtrain.thresholds import thresholds_for_export

    thresholds, error = None, None
    if accelerator.is_main_process:
        try:
            thresholds = thresholds_for_export(cfg.train, gathered, label_space, run_dir / PER_LABEL_FILE)
        except Exception as exc:  # raised below, after the other ranks know
            error = exc
    if any_rank(accelerator, error is not None):
        if error is not None:
            raise error
        raise RuntimeError("the main process failed to tune the decision thresholds (its log says why)")
    return thresholds


def resolve_pos_weight(cfg: RunConfig, label_space: LabelSpace, n_train: int) -> float | list[float] | None:
    """train.pos_weight as the loss uses it. 'auto': each label's negatives/positives ratio in the
    training split (the label space's counts), capped at train.pos_weight_cap: uncapped, the
    rarest kept CUIs would weigh hundreds of times more than a negative and swamp the gradient."""
    if cfg.train.pos_weight != "auto":
        return cfg.train.pos_weight
    counts = np.maximum(np.asarray(label_space.counts, dtype=np.float64), 1.0)
    ratio = np.clip((n_train - counts) / counts, 1.0, cfg.train.pos_weight_cap)
    return [round(float(w), 4) for w in ratio]


def build_task(phase: str, cfg: RunConfig, tokenizer, label_space: LabelSpace | None, n_train: int = 0):
    if phase == "mlm":
        special = [i for i in tokenizer.all_special_ids if i is not None]
        return MLMTask(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=special,
            mlm_probability=cfg.model.mlm_probability,
        )
    return MultiLabelTask(
        num_labels=len(label_space),
        threshold=cfg.train.threshold,
        pos_weight=resolve_pos_weight(cfg, label_space, n_train),
        loss=cfg.train.loss,
        asl_gamma_neg=cfg.train.asl_gamma_neg,
        asl_gamma_pos=cfg.train.asl_gamma_pos,
        asl_clip=cfg.train.asl_clip,
    )


def _source_for_meta(source: str) -> str:
    """data.source as recorded in best/radtrain.json: a local path made absolute, so `radtrain
    evaluate` finds the data from any working directory (config.yaml keeps what the user wrote)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _file_sha256(source: str) -> str | None:
    path = Path(source).expanduser()
    return sha256_file(path) if path.is_file() else None


SPLIT_KEYS = ("validation_fraction", "test_fraction", "split_seed", "max_train_samples", "text_column")


def warn_if_init_trained_on_held_out(cfg: RunConfig, splits: dict[str, Split]) -> None:
    """model.init_from's run (an MLM phase, an earlier classifier) trained on the same data cut
    another way: some of this run's validation and test captions were its training captions, so
    their scores are optimistic. Counted by re-creating that run's training split from its
    radtrain.json (ids where the data has them, else texts); the run's own splits are kept."""
    if not cfg.model.init_from or not Path(cfg.model.init_from).is_dir():
        return  # a Hub model: its training data is not known here
    from radtrain.export import read_meta

    data = read_meta(cfg.model.init_from).get("data") or {}
    if data.get("source") != _source_for_meta(cfg.data.source):
        return
    if all(data.get(key) == getattr(cfg.data, key) for key in SPLIT_KEYS):
        return  # cut the same way: its training split is this run's
    theirs = dataclasses.replace(cfg.data, **{k: data[k] for k in SPLIT_KEYS if k in data})
    quiet = logging.getLogger("radtrain.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its data warnings were this run's, just now
    try:
        their_train = load_splits(theirs, need_labels=False)["train"]
    except Exception as exc:  # a warning's check must never stop the run
        log.debug("could not re-create %s's training split: %s", cfg.model.init_from, exc)
        return
    finally:
        quiet.setLevel(level)
    use_ids = bool(their_train.ids) and all(bool(splits[n].ids) for n in ("validation", "test") if n in splits)
    seen = set(their_train.ids if use_ids else their_train.texts)
    differing = ", ".join(
        f"data.{k}={data.get(k)!r} there, {getattr(cfg.data, k)!r} here"
        for k in SPLIT_KEYS if data.get(k) != getattr(cfg.data, k)
    )
    for name in ("validation", "test"):
        if name not in splits:
            continue
        shared = sum(1 for key in (splits[name].ids if use_ids else splits[name].texts) if key in seen)
        if shared:
            log.warning(
                "%d of the %d %s captions were training captions of model.init_from=%s (%s): the %s scores are "
                "optimistic. Cut the data as that run did (the same data.* split settings)",
                shared, len(splits[name]), name, cfg.model.init_from, differing, name,
            )


def _metric_check(cfg: RunConfig, phase: str) -> None:
    from radtrain.metrics import METRIC_NAMES

    if phase == "classify" and cfg.train.metric_for_best not in (*METRIC_NAMES, "loss"):
        raise ConfigError(
            f"train.metric_for_best={cfg.train.metric_for_best!r} is not a classifier metric; "
            f"choose one of {', '.join((*METRIC_NAMES, 'loss'))}"
        )


def run_phase(cfg: RunConfig, phase: str, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one phase in cfg.output_dir and return its summary (also written to summary.json).

    ``evaluate_test=False`` leaves the test split unread (summary["test"] stays None): a sweep
    member, whose test figures are for the selection job alone to produce, once."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    _metric_check(cfg, phase)
    # Config checks before anything is written or downloaded (load_splits may fetch a Hub dataset).
    check_model_source(cfg.model.init_from, "model.init_from")
    check_model_source(cfg.model.name, "model.name")
    models.check_attn_implementation(cfg.model.attn_implementation)
    model_config = models.source_config(cfg.model)
    models.check_max_length(cfg.data.max_length, model_config)
    started = time.time()
    # Logging before the Accelerator exists (its DeepSpeed set-up logs the batch and precision it
    # chose); the launcher's rank says which process is the main one until the Accelerator does.
    setup_logging(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0")
    accelerator = make_accelerator(
        resolve_precision(cfg.train.precision), cfg.train.grad_accum,
        micro_batch=cfg.train.batch_size, max_grad_norm=cfg.train.max_grad_norm,
    )
    setup_logging(accelerator.is_main_process)
    configure_cuda()
    packing.check_before_start(
        cfg.data.packing, cfg.data.packed_attention, cfg.model.attn_implementation, accelerator.device,
        accelerator.mixed_precision, model_config, warn=accelerator.is_main_process,
    )
    run_dir = Path(cfg.output_dir)
    check_run_dir(cfg, phase, accelerator.num_processes, checkpoint_layout(accelerator))
    if accelerator.is_main_process:
        _warn_if_publishing_cannot_work(cfg, phase)
        ensure_writable(run_dir)
        recover_dir(run_dir / "best")
    accelerator.wait_for_everyone()

    splits = load_splits(cfg.data, need_labels=phase == "classify")
    if accelerator.is_main_process:
        warn_if_init_trained_on_held_out(cfg, splits)
    label_space = None
    if phase == "classify":
        label_space = fit_label_space(cfg, splits)
    tokenizer = prepare_tokenizer(cfg, accelerator, run_dir, splits["train"].texts)
    with accelerator.main_process_first():  # rank 0 fills the token cache, the others read it
        train = tokenize_split(tokenizer, splits["train"], cfg, label_space, "train")
        validation = tokenize_split(tokenizer, splits["validation"], cfg, label_space, "validation")

    model = build_model(phase, cfg, tokenizer, label_space)
    task = build_task(phase, cfg, tokenizer, label_space, n_train=len(splits["train"]))

    from radtrain.tracking import make_tracker

    tracker = make_tracker(cfg, accelerator, run_dir, phase)
    meta = {
        "task": phase,
        "base_model": _base_model(cfg.model),
        # Absolute like data.source: the model card reads the MLM phase's record through it, from
        # whatever directory `radtrain push` runs in.
        "init_from": _source_for_meta(cfg.model.init_from) if cfg.model.init_from else None,
        # A single file's content: `radtrain evaluate --data` knows the run's own file (cut into its
        # splits) from another file (scored whole) by it, at any path, and after a push, which
        # records only the file's name. Outside "data", whose keys older radtrain reads as settings.
        "data_sha256": _file_sha256(cfg.data.source),
        "data": {
            "source": _source_for_meta(cfg.data.source),
            "text_column": cfg.data.text_column,
            "label_column": cfg.data.label_column,
            "label_delimiter": cfg.data.label_delimiter,
            "max_length": cfg.data.max_length,
            "padding": cfg.data.padding,
            "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
            "validation_fraction": cfg.data.validation_fraction,
            "test_fraction": cfg.data.test_fraction,
            "split_seed": cfg.data.split_seed,
            # `radtrain evaluate` re-creates the splits from these: without the caps it would
            # score a different (larger) test split than the run reported.
            "max_train_samples": cfg.data.max_train_samples,
            "max_eval_samples": cfg.data.max_eval_samples,
        },
        "eval_batch_size": cfg.train.eval_batch_size or cfg.train.batch_size,
        "threshold": cfg.train.threshold,
        # The precision the run's test evaluation used, as accelerate names it ('no' = fp32), so
        # that `radtrain evaluate` computes the same logits (a GPU's 'auto' would otherwise be bf16).
        "precision": accelerator.mixed_precision,
    }

    best_metric = cfg.train.metric_for_best if phase == "classify" else task.default_metric

    def on_best(model, state, gathered) -> None:
        extra = {**meta, "step": state.global_step, "epoch": state.best_epoch, "metric": best_metric,
                 "value": state.best_metric}
        thresholds = None
        if phase == "classify":
            thresholds = _main_process_thresholds(accelerator, cfg, gathered, label_space, run_dir)
        export_model(accelerator, model, tokenizer, run_dir / "best", extra, label_space, thresholds)

    trainer = Trainer(
        cfg=cfg,
        task=task,
        accelerator=accelerator,
        model=model,
        train_split=train,
        eval_split=validation,
        pad_id=tokenizer.pad_token_id,
        run_dir=run_dir,
        on_best=on_best,
        tracker=tracker,
        started=started,
    )
    trainer.resume()
    # Only now that the checkpoints (if any) are known to be this run's, on this data: a refused
    # start must leave the run's saved settings and label space as they were.
    if accelerator.is_main_process:
        write_text(run_dir / "config.yaml", cfg.to_yaml())
        if label_space is not None:
            label_space.save(run_dir / LABELS_FILE)
    state = trainer.train()

    best_row = next((r for r in state.history if r["step"] == state.best_step), None)
    summary: dict[str, Any] = {
        "task": phase,
        "best_metric": trainer.metric,
        "best_epoch": state.best_epoch,
        "best_step": state.best_step,
        "validation": {k: v for k, v in (best_row or {}).items() if k not in ("step", "epoch")},
        "test": None,
        "global_steps": state.global_step,
        "nan_steps_skipped": state.nan_steps_skipped,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "num_labels": len(label_space) if label_space is not None else None,
        "train": trainer.describe(),
        "throughput": {
            "captions_per_s": state.captions_seen / max(state.train_time_s, 1e-9),
            "real_tokens_per_s": state.tokens_seen / max(state.train_time_s, 1e-9),
            "train_time_s": state.train_time_s,
        },
        # Every start's, up to its last checkpoint (a preempted and requeued run is one run).
        "wall_time_s": trainer.wall_time_s(),
        "starts": state.starts,
    }
    # Free the training state before the test evaluation loads best/ fresh.
    trainer_metric = trainer.metric
    del trainer
    if phase == "classify" and evaluate_test and "test" in splits:
        if not (run_dir / "best" / "config.json").is_file():
            why = (
                f"no evaluation produced a finite {trainer_metric}, so no best/ export was written (diverged? "
                "see metrics.jsonl; lower train.lr)"
                if state.best_step is None
                else f"{run_dir / 'best'} is missing (deleted after the run?); restore it, or train again in a new "
                "output_dir"
            )
            raise CheckpointError(
                f"the test split is scored on the best export: {why}. Training is complete and its checkpoints are kept."
            )
        with accelerator.main_process_first():
            test = tokenize_split(tokenizer, splits["test"], cfg, label_space, "test")
        summary["test"] = evaluate_export(run_dir / "best", test, accelerator, cfg)
    summary_error = None
    if accelerator.is_main_process:
        _add_tuned_validation(summary, run_dir / "best")
        try:
            faults.hit("result-write")  # test hook (a full disk)
            write_json(run_dir / "summary.json", summary)
        except OSError as error:  # a full disk: a clean error (exit 2), not a traceback
            summary_error = error
    # Agreed, so that every rank raises instead of waiting for the main one at the barrier below.
    if any_rank(accelerator, summary_error is not None):
        rerun = (
            "the same command resumes from the last checkpoint and repeats only the test evaluation"
            if phase == "classify" and evaluate_test
            else "the same command resumes from the last checkpoint and writes it"
        )
        raise CheckpointError(
            write_failed(run_dir / "summary.json", summary_error, f"Training is complete; best/ and the checkpoints are kept: {rerun}.")
            if summary_error is not None
            else "the main process could not write summary.json (its error says what)"
        ) from summary_error
    if accelerator.is_main_process:
        _report_run(run_dir, phase, state)
        if summary["test"]:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in summary["test"].items())
            print(f"[radtrain] test (best/ from step {state.best_step}): {shown}", flush=True)
    if tracker is not None:
        tracker.finish(summary)
    accelerator.wait_for_everyone()
    if phase == "classify" and cfg.hub.repo_id and accelerator.is_main_process:
        # After the last barrier: an upload can outlast a collective timeout, and the other ranks
        # have nothing left to do. Failure raises radtrain.hub.PushError (exit 3), nothing local changed.
        from radtrain.hub import publish_run

        publish_run(run_dir, cfg.hub)
    return summary


def _add_tuned_validation(summary: dict[str, Any], best_dir: Path) -> None:
    """Validation metrics of best/ under its tuned thresholds, as ``<metric>_tuned``. Read from
    best/thresholds.json (written with the export), so a resumed run reports them too."""
    thresholds = read_thresholds(best_dir)
    tuned = thresholds.get("validation_tuned")
    if tuned and summary.get("validation") is not None:
        summary["validation"].update({f"{k}_tuned": v for k, v in tuned.items()})
    if (best_dir / "thresholds.json").is_file():
        summary["thresholds"] = {
            k: thresholds.get(k) for k in ("global", "fixed", "top1", "min_support", "labels_with_own_threshold")
        }


def _report_run(run_dir: Path, phase: str, state) -> None:
    """Main process, end of a run: plots under plots/ and the per-epoch table. A plotting failure
    is logged, not raised: it must not fail a run whose results are already written."""
    from radtrain import plots

    try:
        train_log = plots.read_jsonl(run_dir / "train_log.jsonl")
        rows = plots.with_train_loss(state.history, train_log)
        print(f"[radtrain] {phase} per-epoch validation (* = best/):", flush=True)
        print(plots.epoch_table(rows, phase, state.best_step), flush=True)
        written = plots.write_plots(run_dir, phase, state.history)
        log.info("plots: %s", ", ".join(str(p) for p in written))
    except Exception as exc:  # noqa: BLE001 - reporting is best effort once results are saved
        log.warning("could not draw the run's plots/table: %s", exc)


def load_export_classifier(model_dir: Path, accelerator=None):
    from transformers import AutoModelForSequenceClassification

    from radtrain.distributed import plain_model_loading

    with plain_model_loading():  # whole on every rank, also inside a ZeRO-3 run
        # In the dtype it was saved in: fp32, or bf16 from a DeepSpeed bf16 run, whose engine
        # trained and evaluated a bf16 module (an fp32 copy of those weights computes otherwise).
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype="auto")
    if accelerator is not None:
        model = model.to(accelerator.device)
    return model


def export_autocast(model, precision: str, device: torch.device):
    """The autocast a run evaluated its model under: bf16 autocast over fp32 weights (accelerate's
    mixed precision); none for a bf16 model (DeepSpeed's bf16 runs the module in bf16 throughout)."""
    enabled = precision == "bf16" and next(model.parameters()).dtype == torch.float32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate_export(
    model_dir: Path, split: TokenizedSplit, accelerator, cfg: RunConfig, threshold: float | None = None
) -> dict[str, float]:
    """Evaluate an export: every rank loads it as a plain model (not sharded), evaluates its share
    of the batches, and the outputs are gathered. Used for the final test evaluation and by
    ``radtrain evaluate``, so both give the same numbers."""
    from radtrain.data.batching import collate, resolve_pad_multiple
    from radtrain.export import read_meta

    meta = read_meta(model_dir)
    data = meta.get("data", {})
    thresholds = read_thresholds(model_dir, cfg.train.threshold)
    model = load_export_classifier(model_dir, accelerator)
    # The plain metrics use the fixed threshold (the series' 0.5) when the export was tuned, so
    # reports show "at 0.5" and "_tuned" side by side; an explicit threshold overrides both.
    base = threshold if threshold is not None else thresholds.get("fixed", thresholds["global"])
    task = MultiLabelTask(num_labels=model.config.num_labels, threshold=base)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pad_multiple = resolve_pad_multiple(data.get("pad_to_multiple_of", cfg.data.pad_to_multiple_of), accelerator.device.type)
    pad_length = data.get("max_length", cfg.data.max_length) if data.get("padding") == "max_length" else None

    def collate_fn(s, idx):
        return collate(s, idx, pad_id, pad_to_multiple_of=pad_multiple, pad_to_length=pad_length)

    batch_size = int(meta.get("eval_batch_size") or cfg.train.eval_batch_size or cfg.train.batch_size)
    with export_autocast(model, meta.get("precision") or accelerator.mixed_precision, accelerator.device):
        metrics, gathered = evaluate_split(task, model, accelerator, split, collate_fn, batch_size, cfg.train.seed)
    from radtrain.thresholds import apply_thresholds, is_tuned, threshold_vector

    if is_tuned(thresholds) and threshold is None:
        from radtrain.metrics import multilabel_metrics

        _, probs, labels, outside = MultiLabelTask.ordered_outputs(gathered)
        cuis = [model.config.id2label[i] for i in range(model.config.num_labels)]
        vector = threshold_vector(thresholds, cuis)
        tuned = multilabel_metrics(labels, apply_thresholds(probs, vector, bool(thresholds.get("top1"))), outside)
        metrics.update({f"{k}_tuned": v for k, v in tuned.items()})
    return metrics
