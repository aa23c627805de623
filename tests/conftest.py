"""Shared fixtures: tiny random models (grouped-query attention on) with a tokenizer trained here,
so every test runs offline on a CPU in seconds (the helpers behind them: helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import CORPUS, LINEARS, LLAMA, build_tiny_model, tiny_statistics  # noqa: E402  (after the offline switches above)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def calibration_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(f"{t} ({i})" for i, t in enumerate(CORPUS[:40])))
    return path


@pytest.fixture(scope="module")
def tiny_stats(tiny_llama) -> dict:
    """The tiny model's statistics and eigendecompositions, in memory (helpers.tiny_statistics)."""
    return tiny_statistics(tiny_llama)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A 4-block tiny Llama, its tokenizer, and a weight-space factor cache (no statistics needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfsd.decompose.factor_cache import save_factor_cache
    from sfsd.io import model_digest

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny4"), n_layers=4, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    factors = folder / "factors"
    save_factor_cache(model, LLAMA, "weight", LINEARS, factors / "weight", model_digest=model_digest(folder))
    return folder, model, AutoTokenizer.from_pretrained(folder), factors


@pytest.fixture(scope="module")
def arc_requests(tiny4, tmp_path_factory):
    """The arc_easy task exported and the first 12 documents of its search split encoded for the tiny4 model."""
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.evaluate.scoring import build_requests, encode_requests
    from sfsd.tasks.splits import split_doc_ids

    _, _, tok, _ = tiny4
    task_dir = tmp_path_factory.mktemp("tasks")
    export_local_tasks(task_dir, ["arc_easy"], metrics=("acc", "acc_norm"))
    ids = {"arc_easy": split_doc_ids("arc_easy", None, 1234, 0.1, 0.2, limit=12)}
    enc = encode_requests(tok, build_requests(task_dir, ["arc_easy"], ids, ["search"]), 512)
    return task_dir, ids, enc


