"""The synthetic demo data: deterministic, real CUIs, labels that follow the text, ROCO-like shape."""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from radtrain.data.cui_names import CUI_NAMES
from radtrain.data.synthetic import LICENSE, SURFACE_FORMS, extract_cuis, generate_captions, write_dataset

CUI_RE = re.compile(r"^C\d{7}$")

PNEUMOTHORAX = "C0032326"
PLEURAL_EFFUSION = "C0032227"
CT = "C0040405"
MRI = "C0024485"
LEFT = "C0205091"
RIGHT = "C0205090"
LATERAL = "C0205093"
BILATERAL = "C0238767"
URINARY_BLADDER = "C0005682"
GALLBLADDER = "C0016976"
HEAD = "C0018670"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_captions(3000, seed=0)


def _has_word(text: str, word: str, case_sensitive: bool = False) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags) is not None


# -- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_output_regardless_of_global_rng():
    random.seed(1)
    first = generate_captions(400, seed=7)
    random.seed(2)
    random.random()
    second = generate_captions(400, seed=7)
    assert first == second


def test_different_seed_differs():
    a = [r["caption"] for r in generate_captions(200, seed=0)]
    b = [r["caption"] for r in generate_captions(200, seed=1)]
    assert a != b
    assert len(set(a) & set(b)) < 50


def test_shorter_run_is_a_prefix():
    assert generate_captions(150, seed=3) == generate_captions(400, seed=3)[:150]


def test_negative_n_rejected():
    with pytest.raises(ValueError):
        generate_captions(-1)
    assert generate_captions(0) == []


# -- record shape ---------------------------------------------------------------------------------


def test_record_schema(records):
    for i, rec in enumerate(records):
        assert list(rec) == ["image_id", "caption", "cui", "license"]
        assert rec["image_id"] == f"SYNTH_{i:06d}"
        assert rec["license"] == LICENSE == "CC0 (synthetic)"
        caption = rec["caption"]
        assert isinstance(caption, str) and caption.strip() == caption and caption.endswith((".", ":"))
        assert "@" not in caption and "  " not in caption and " ." not in caption, caption
        assert rec["cui"] == sorted(set(rec["cui"])) and rec["cui"], rec
    assert len({rec["caption"] for rec in records}) == len(records), "captions are unique within a run"


# -- concept table --------------------------------------------------------------------------------


def test_cui_table_is_wellformed():
    assert 60 <= len(CUI_NAMES) <= 110
    for cui, name in CUI_NAMES.items():
        assert CUI_RE.match(cui), cui
        assert isinstance(name, str) and name.strip() == name and name
    assert len(set(CUI_NAMES.values())) == len(CUI_NAMES), "one name per concept"
    assert set(SURFACE_FORMS) == set(CUI_NAMES)
    # a few anchors that must not drift
    assert CUI_NAMES[CT] == "X-Ray Computed Tomography"
    assert CUI_NAMES[MRI] == "Magnetic Resonance Imaging"
    assert CUI_NAMES[PNEUMOTHORAX] == "Pneumothorax"


def test_every_used_cui_is_named_and_valid(records):
    used = {cui for rec in records for cui in rec["cui"]}
    for cui in used:
        assert CUI_RE.match(cui), cui
        assert cui in CUI_NAMES, cui
    assert len(used) >= 0.9 * len(CUI_NAMES), "the generator should exercise nearly the whole table"


# -- labels follow the text -----------------------------------------------------------------------


def test_labels_are_exactly_what_the_text_mentions(records):
    for rec in records:
        assert rec["cui"] == extract_cuis(rec["caption"]), rec


@pytest.mark.parametrize(
    ("word", "cui", "case_sensitive"),
    [
        ("pneumothorax", PNEUMOTHORAX, False),
        ("pleural effusion", PLEURAL_EFFUSION, False),
        ("CT", CT, True),
        ("MRI", MRI, True),
        ("left", LEFT, False),
        ("right", RIGHT, False),
        ("bilateral", BILATERAL, False),
    ],
)
def test_word_implies_label_and_back(records, word, cui, case_sensitive):
    with_word = [r for r in records if _has_word(r["caption"], word, case_sensitive)]
    assert len(with_word) >= 10, f"too few captions mention {word!r} to test"
    assert all(cui in r["cui"] for r in with_word)
    forms = SURFACE_FORMS[cui]
    for r in records:
        if cui in r["cui"]:
            assert any(_has_word(r["caption"], f, f.isupper()) for f in forms), r


def test_extractor_on_hand_written_captions():
    assert extract_cuis(
        "Sagittal T2-weighted MRI of the lumbar spine demonstrating disc herniation at L4-L5."
    ) == sorted(["C0205129", MRI, "C0024091", "C0037949"])
    assert extract_cuis("Chest radiograph, PA view: right-sided pneumothorax.") == sorted(
        ["C0817096", "C1306645", RIGHT, PNEUMOTHORAX]
    )
    assert set(extract_cuis("FDG PET/CT of the neck")) == {"C0032743", CT, "C0027530"}
    # whole words only, and abbreviations are case-sensitive
    assert LATERAL not in extract_cuis("bilateral pleural effusions")
    assert URINARY_BLADDER not in extract_cuis("gallstones in the gallbladder")
    assert GALLBLADDER in extract_cuis("gallstones in the gallbladder")
    assert HEAD not in extract_cuis("A woman with headache.")
    assert CT not in extract_cuis("the act of scanning")
    assert extract_cuis("") == []


# -- distribution -----------------------------------------------------------------------------------


def test_label_counts_are_long_tailed(records):
    counts = Counter(cui for rec in records for cui in rec["cui"])
    ranked = counts.most_common()
    assert ranked[0][1] > 10 * ranked[-1][1]
    # a head of frequent concepts and a tail of rare ones, like the real data
    assert sum(1 for _, c in ranked if c >= 0.1 * len(records)) >= 5
    assert sum(1 for _, c in ranked if c < 0.01 * len(records)) >= 10
    # but every concept that occurs is learnable from the default 3,000 training captions
    assert ranked[-1][1] >= 3


def test_caption_lengths_are_roco_like(records):
    words = [len(rec["caption"].split()) for rec in records]
    assert 15 <= statistics.mean(words) <= 25
    assert sum(w <= 3 for w in words) < 0.02 * len(records), "a few terse ones ('Echocardiogram.'), not many"
    assert max(words) <= 90
    assert sum(w >= 40 for w in words) >= 0.01 * len(records), "a few long multi-panel captions"
    labels = [len(rec["cui"]) for rec in records]
    assert 3 <= statistics.mean(labels) <= 9


# -- files ----------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_dataset_splits_and_names(tmp_path):
    out = write_dataset(tmp_path / "synth", n_train=300, n_validation=60, n_test=40, seed=5)
    assert out == tmp_path / "synth"
    assert sorted(p.name for p in out.iterdir()) == [
        "cui_names.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    splits = {name: _read_jsonl(out / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "validation": 60, "test": 40}
    ids = [set(r["image_id"] for r in recs) for recs in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    captions = [set(r["caption"] for r in recs) for recs in splits.values()]
    assert not (captions[0] & captions[1]) and not (captions[0] & captions[2])
    assert splits["train"] == generate_captions(300, seed=5), "train is the head of the same run"

    names = json.loads((out / "cui_names.json").read_text(encoding="utf-8"))
    used = {cui for recs in splits.values() for r in recs for cui in r["cui"]}
    assert set(names) == used
    assert all(names[cui] == CUI_NAMES[cui] for cui in names)


def test_write_dataset_defaults_and_bytes_are_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a")
    b = write_dataset(str(tmp_path / "b"))
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "cui_names.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    lines = {
        n: (a / f"{n}.jsonl").read_text(encoding="utf-8").count("\n") for n in ("train", "validation", "test")
    }
    assert lines == {"train": 3000, "validation": 500, "test": 500}


def test_write_dataset_rejects_negative_sizes(tmp_path):
    with pytest.raises(ValueError):
        write_dataset(tmp_path, n_train=-1)
