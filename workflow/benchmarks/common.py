"""Shared set-up of the benchmark scripts: the embedded model, a fixed token set, and random-weight Llamas
stored as bfloat16 shards."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from sfsd.features.calibration import CalibrationSettings, sample_texts, tokenize
from sfsd.model.loading import convert_embedded, load_tokenizer

DEFAULT_MODEL_DIR = Path("results/models/smollm2-135m")
SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


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


def llama_config(shape: str, vocab: int):
    from transformers import LlamaConfig

    values = [int(v) for v in shape.split(",")]
    values += values[3:4] if len(values) == 4 else []  # kv heads default: the attention heads
    return LlamaConfig(vocab_size=vocab, architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                       **dict(zip(SHAPE, values)))


def build_weights(config, folder: Path, tokenizer_dir: Path, seed: int, shard_mb: int) -> None:
    """Random weights as Llama initialises them (normal(0, initializer_range), norms 1), drawn per tensor
    in float32 with a seeded generator and stored as bfloat16 shards; the model is never whole in memory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sfsd.provenance import TOKENIZER_FILES

    stamp = {"config": {k: getattr(config, k) for k in ("vocab_size", *SHAPE)}, "seed": seed, "shard_mb": shard_mb}
    if (folder / "bench.json").is_file() and json.loads((folder / "bench.json").read_text()) == stamp:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        if shards[-1] and size + math.prod(shape) * 2 > shard_mb * 2**20:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += math.prod(shape) * 2
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 100003 + list(shapes).index(name))
                tensors[name] = (torch.randn(shapes[name], generator=g) * config.initializer_range).bfloat16()
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        print(f"  wrote {folder / file}", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    (folder / "bench.json").write_text(json.dumps(stamp))  # last: a folder without it is rebuilt
