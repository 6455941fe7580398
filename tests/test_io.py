"""radtrain/io.py: a whole-file write either lands whole or leaves the old file and no debris."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radtrain.io import replacing, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "summary.json", {"f1": 0.5})
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text('{"f1": 0.')  # half written, then the writer fails
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"f1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_unserialisable_data_never_touches_the_file(tmp_path):
    path = write_text(tmp_path / "config.yaml", "a: 1\n")
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_numpy_writers_get_the_suffix_they_insist_on(tmp_path):
    target = tmp_path / "tokens.npz"
    with replacing(target, suffix=".npz") as tmp:
        np.savez(tmp, ids=np.arange(3))  # np.savez would append .npz to a name without it
    assert np.load(target)["ids"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.npz"]


def test_text_is_utf8_with_unix_newlines(tmp_path):
    path = write_text(tmp_path / "captions.jsonl", "Fracture du fémur\nok\n")
    assert path.read_bytes() == "Fracture du fémur\nok\n".encode()
