"""Configuration: defaults reproduce the series, overrides are typed, mistakes fail at start."""

from __future__ import annotations

import pytest

from radtrain.cli import main
from radtrain.config import ConfigError, config_from_dict, load_config, valid_keys


def test_defaults_reproduce_the_series():
    cfg = load_config()
    assert cfg.train.lr == 2e-5
    assert cfg.train.batch_size == 8
    assert cfg.train.weight_decay == 0.01
    assert cfg.train.epochs == 20
    assert cfg.data.max_length == 256
    assert cfg.train.metric_for_best == "f1"
    assert cfg.train.save_total_limit == 3
    assert cfg.model.mlm_probability == 0.3


def test_documented_key_names_exist():
    keys = set(valid_keys())
    for key in ("output_dir", "data.source", "data.min_label_count", "data.max_length", "model.name",
                "model.init_from", "train.epochs", "train.batch_size", "train.lr", "train.seed",
                "train.metric_for_best", "train.save_total_limit", "hub.repo_id"):
        assert key in keys


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output_dir: runs/x\ntrain:\n  lr: 1e-4\n  epochs: 3\ndata:\n  source: some/dir\n")
    cfg = load_config(path, ["train.lr=3e-5", "model.init_from=null", "data.bucket_by_length=false"])
    assert cfg.train.lr == 3e-5  # the override wins over the file
    assert cfg.train.epochs == 3
    assert cfg.output_dir == "runs/x"
    assert cfg.data.bucket_by_length is False
    assert cfg.model.init_from is None


def test_round_trip_through_saved_yaml(tmp_path):
    import yaml

    cfg = load_config(None, ["train.lr=3e-5", "model.name=scratch:tiny"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.fingerprint("classify") == cfg.fingerprint("classify")
    assert cfg.fingerprint("classify") != cfg.fingerprint("mlm")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("trian.lr=1", "unknown config key"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.batch_size=2.5", "must be an integer"),
        ("train.epochs=0", "train.epochs must be > 0"),
        ("model.name=scratch:huge", "scratch size must be one of"),
        ("data.padding=sideways", "data.padding must be"),
        ("hub.repo_id=noslash", "org/name"),
        ("train.lr", "is not KEY=VALUE"),
        # A ZeroDivisionError after the first step; numpy's "expected non-negative integer" after loading.
        ("train.log_every_steps=0", "train.log_every_steps must be >= 1"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("data.split_seed=-1", "data.split_seed must be >= 0"),
    ],
)
def test_bad_values_fail_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lrr=1"])
    assert "train.lr," in str(info.value) and "data.source" in str(info.value)


def test_cli_reports_config_errors_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["classify", "--output-dir", str(out), "train.lrr=1"])
    assert code == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert not out.exists()
