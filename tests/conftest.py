"""Shared fixtures: tiny random models (grouped-query attention on) with a tokenizer trained here,
so every test runs offline on a CPU in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What do plants need to grow?\nAnswer: water and light",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Once upon a time, in a barn near a farm house, there lived a little white kitten.",
    "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.",
] * 20


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, architecture: str = "LlamaForCausalLM", seed: int = 0,
                     n_layers: int = 2) -> Path:
    """A random decoder with 4 query heads and 2 key/value heads, saved as safetensors + tokenizer."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder)
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, architectures=[architecture],
    )
    model = getattr(transformers, architecture)(config)
    # a non-zero, non-trivial mean in the residual stream, like real models
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def calibration_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(f"{t} ({i})" for i, t in enumerate(CORPUS[:40])))
    return path
