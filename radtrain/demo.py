"""``radtrain demo``: the whole pipeline offline, in a few minutes on two CPU cores.

Synthetic radiology captions (written by the project itself, labelled with real CUIs) ->
scratch tiny ModernBERT -> MLM phase -> classifier from the MLM export -> test metrics and
example predictions with CUI names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radtrain.config import ConfigError, load_config

# The embedded default job. A tiny model learns fast with a larger learning rate than the
# series' 2e-5 (which is tuned for fine-tuning a pretrained ModernBERT-base).
DEMO_DATA = {"n_train": 3000, "n_validation": 500, "n_test": 500, "seed": 0}
DEMO_COMMON: dict[str, Any] = {
    "model": {"name": "scratch:tiny"},
    "data": {"max_length": 128},
    "train": {"batch_size": 32, "warmup_ratio": 0.1, "seed": 42},
}
DEMO_MLM: dict[str, Any] = {"train": {"epochs": 2, "lr": 1e-3}}
DEMO_CLASSIFY: dict[str, Any] = {"train": {"epochs": 6, "lr": 1e-3}}
EXAMPLES = [
    "Axial contrast-enhanced CT of the abdomen showing a liver cyst (arrow).",
    "Chest radiograph demonstrating a right pneumothorax.",
    "Sagittal MRI of the lumbar spine.",
]


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for section, values in part.items():
            if isinstance(values, dict):
                out.setdefault(section, {}).update(values)
            else:
                out[section] = values
    return out


def _check_demo_data_dir(data_dir: Path) -> None:
    """The demo writes its synthetic captions into ``data_dir``: refuse a folder holding files the
    demo did not write (a user's own data would be replaced)."""
    if not data_dir.is_dir():
        return
    foreign = [path.name for path in sorted(data_dir.iterdir()) if not _written_by_demo(path)]
    if foreign:
        raise ConfigError(
            f"{data_dir} holds files the demo did not write ({', '.join(foreign[:5])}); the demo writes its "
            "synthetic captions there and would replace them. Use another --output-dir, or move them."
        )


def _written_by_demo(path: Path) -> bool:
    from radtrain.data.synthetic import DATASET_FILES

    if path.name.startswith("."):  # the atomic writes' temporary files
        return True
    if path.name not in DATASET_FILES or not path.is_file():
        return False
    if path.stat().st_size == 0:
        return True
    if path.suffix != ".jsonl":  # cui_names.json: the synthetic captions' CUIs with their real names
        from radtrain.data.cui_names import CUI_NAMES

        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(names, dict) and all(CUI_NAMES.get(k) == v for k, v in names.items())
    with open(path, encoding="utf-8", errors="replace") as fh:
        return '"image_id": "SYNTH_' in fh.readline()


def run_demo(output_dir: str | Path = "runs/demo", overrides: list[str] | None = None) -> dict[str, Any]:
    from radtrain.data.synthetic import dataset_complete, write_dataset
    from radtrain.phase import ensure_writable, run_phase
    from radtrain.predict import Predictor

    root = Path(output_dir)
    data_dir = root / "data"
    data = {"data": {"source": str(data_dir), "label_names": str(data_dir / "cui_names.json")}}
    # Both phases' settings are checked before anything is written: a bad override must leave a
    # folder as it was.
    mlm_cfg = load_config(
        None, overrides, base=_merge(DEMO_COMMON, DEMO_MLM, data, {"output_dir": str(root / "mlm")})
    )
    cls_cfg = load_config(
        None,
        overrides,
        base=_merge(
            DEMO_COMMON, DEMO_CLASSIFY, data,
            {"output_dir": str(root / "classify"), "model": {"init_from": str(root / "mlm" / "best")}},
        ),
    )
    ensure_writable(root)
    if not dataset_complete(data_dir):  # also rewrites one a killed demo left half written
        _check_demo_data_dir(data_dir)
        write_dataset(data_dir, **DEMO_DATA)
    print(f"[demo] phase 1: MLM on {data_dir} -> {mlm_cfg.output_dir}", flush=True)
    run_phase(mlm_cfg, "mlm")
    print(f"[demo] phase 2: classifier from {cls_cfg.model.init_from} -> {cls_cfg.output_dir}", flush=True)
    summary = run_phase(cls_cfg, "classify")
    from accelerate import PartialState

    if PartialState().is_main_process:
        print("\n[demo] test metrics of best/:")
        for key, value in (summary.get("test") or {}).items():
            print(f"  {key:16s} {value:.4f}")
        predictor = Predictor(root / "classify" / "best")
        print("\n[demo] example predictions (made-up captions):")
        for text, result in zip(EXAMPLES, predictor.predict(EXAMPLES), strict=True):
            found = ", ".join(f"{c['cui']} {c['name'] or ''} ({c['probability']:.2f})" for c in result["cuis"])
            print(f"  {text}\n    -> {found or 'no CUI above threshold'}")
        print(f"\n[demo] run directories: {root / 'mlm'}, {root / 'classify'}")
    return summary
