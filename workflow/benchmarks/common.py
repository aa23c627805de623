"""Shared set-up of the benchmark scripts: the embedded model and a fixed token set."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sfsd.features.calibration import CalibrationSettings, sample_texts, tokenize
from sfsd.model.loading import convert_embedded, load_tokenizer

DEFAULT_MODEL_DIR = Path("results/models/smollm2-135m")


def embedded_model_dir(model_dir: Path | None) -> Path:
    """The converted embedded model: the workflow's copy when present, else a fresh conversion."""
    model_dir = model_dir or DEFAULT_MODEL_DIR
    if (model_dir / "config.json").exists():
        return model_dir
    tmp = Path(tempfile.mkdtemp(prefix="sfsd-bench-")) / "smollm2"
    print(f"converting the embedded model into {tmp} (run the workflow once to reuse its copy)")
    convert_embedded("smollm2-135m-instruct", tmp)
    return tmp


def dense_tokens(model_dir: Path, n_sequences: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """CoQA stories cut to seq_len tokens: full sequences, so no padding blurs the timing."""
    docs = sample_texts(CalibrationSettings(source="coqa", num_samples=n_sequences, seed=seed))
    tokens = tokenize([d["text"] for d in docs], load_tokenizer(model_dir), seq_len)
    full = tokens["attention_mask"].sum(1) == seq_len
    return {k: v[full] for k, v in tokens.items()}
