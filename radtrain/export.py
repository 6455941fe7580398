"""The ``best/`` export: a Hugging Face model directory plus radtrain's own metadata.

``AutoModelForSequenceClassification.from_pretrained(best)`` and
``pipeline("text-classification", model=best, top_k=None)`` load it as it is. Next to the
weights: the tokenizer, ``labels.json`` (CUIs, names, training counts), ``thresholds.json`` and
``radtrain.json`` (the task, the step it came from, and the data settings needed to evaluate it
exactly as the run did).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from radtrain import faults
from radtrain.checkpoint import CheckpointError, any_rank, fsync_dir, write_failed
from radtrain.config import ConfigError
from radtrain.data.labels import LabelSpace
from radtrain.io import apply_umask, read_json, write_json

META_FILE = "radtrain.json"
THRESHOLDS_FILE = "thresholds.json"
LABELS_FILE = "labels.json"


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished directory into place; a reader sees the old or the new one, whole.

    Two renames are not one atomic step: if we die between them, ``final.old`` is left and
    :func:`recover_dir` puts it back on the next start.
    """
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    try:
        faults.hit("export")  # test hook: the window between the two renames
        os.replace(tmp, final)
    except BaseException:
        # Put the previous directory back at once, as the caller's message promises (recover_dir
        # would do it at the next start, but a reader in between would find no directory).
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo what a kill inside :func:`replace_dir` or an export left: the previous complete
    directory comes back if the new one never arrived; unfinished ``.tmp`` work is dropped."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    elif old.exists():  # killed after the swap, before the old copy was deleted
        shutil.rmtree(old, ignore_errors=True)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def export_model(
    accelerator,
    model,
    tokenizer,
    out_dir: Path,
    meta: dict[str, Any],
    label_space: LabelSpace | None = None,
    thresholds: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank must call it. Under ZeRO-3 the full weights are gathered from all
    ranks (``get_state_dict``), so a rank-0-only call would hang; only rank 0 writes files. A
    failed write (e.g. a full disk on rank 0) raises the same CheckpointError on every rank."""
    state_dict = accelerator.get_state_dict(model)
    out_dir = Path(out_dir)
    error: BaseException | None = None
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            portable_tokenizer_config(tmp)
            if label_space is not None:
                label_space.save(tmp / LABELS_FILE)
            if thresholds is not None:
                (tmp / THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=1))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            apply_umask(tmp)
        except Exception as exc:  # e.g. a full disk: the previous export stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
        else:
            try:
                replace_dir(tmp, out_dir)
            except Exception as exc:  # the previous export is in place or in .old (recover_dir)
                error = exc
    # Replaces a plain barrier: the other ranks learn that rank 0 failed instead of waiting.
    if any_rank(accelerator, error is not None):
        if error is None:
            error = RuntimeError("the main process failed to write the export")
        raise CheckpointError(write_failed(out_dir, error, f"The previous {out_dir.name}/ is unchanged.")) from error


def portable_tokenizer_config(model_dir: Path) -> None:
    """An export that transformers 4 loads too (the Hub's users run both): transformers 5 names its
    fast tokenizer class ``TokenizersBackend``, which 4.x cannot import, where ``PreTrainedTokenizerFast``
    means the same tokenizer.json to both; and it records how this process loaded the tokenizer
    (``local_files_only`` under HF_HUB_OFFLINE, ``is_local``), which is no setting of the model's."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The export's radtrain.json ({} without one); a damaged one is a ConfigError naming it."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a radtrain.json (a JSON object); copy it from the run's best/")
    return data


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def read_thresholds(model_dir: str | Path, default: float = 0.5) -> dict[str, Any]:
    """{'global': float, 'per_label': {cui: float} | None}; 0.5 when the export has none. A
    damaged file is a ConfigError: a null or NaN threshold decided nothing, silently."""
    path = Path(model_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return {"global": default, "per_label": None}
    data = read_json(path)
    fix = "re-export the run, or delete it to decide at 0.5"
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a thresholds file (a JSON object); {fix}")
    data.setdefault("global", default)
    data.setdefault("per_label", None)
    per_label = data["per_label"]
    if not _is_probability(data["global"]):
        raise ConfigError(f"{path}: 'global' is {data['global']!r}, not a threshold in [0, 1]; {fix}")
    if per_label is not None and not (
        isinstance(per_label, dict) and all(_is_probability(v) for v in per_label.values())
    ):
        raise ConfigError(f"{path}: 'per_label' must map CUIs to thresholds in [0, 1]; {fix}")
    return data


def write_thresholds(model_dir: str | Path, thresholds: dict[str, Any]) -> None:
    write_json(Path(model_dir) / THRESHOLDS_FILE, thresholds)
