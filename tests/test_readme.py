"""The README's first command: `radtrain demo`, exactly as a new user runs it (defaults, offline)."""

from __future__ import annotations

import json
import subprocess

import pytest
from transformers import AutoModelForSequenceClassification

from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_readme_first_line_runs_the_demo_offline(tmp_path):
    first = (REPO / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert first.endswith("&& radtrain demo"), first  # the command this test stands for
    out = tmp_path / "demo"
    result = subprocess.run(
        [PYTHON, "-m", "radtrain", "demo", "--output-dir", str(out)], cwd=tmp_path, capture_output=True,
        text=True, timeout=900, env=subprocess_env(HF_HUB_OFFLINE="1", RADTRAIN_CACHE=str(tmp_path / "cache")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[demo] example predictions" in result.stdout
    summary = json.loads((out / "classify" / "summary.json").read_text())
    # Measured 0.748 micro F1 on the synthetic test split (0.5 threshold); a broken phase lands near 0.
    assert summary["test"]["f1"] > 0.6, summary["test"]
    assert json.loads((out / "mlm" / "summary.json").read_text())["task"] == "mlm"
    model = AutoModelForSequenceClassification.from_pretrained(out / "classify" / "best")
    assert model.config.problem_type == "multi_label_classification"
