"""What the planner reads: a model's shapes, never its weights, and the memory and disk of this machine.

- `model_size(model_dir, layers)`: the `needs.ModelSize` of a model folder, from config.json (one line
  naming the file where it lacks architectures or model_type) and the safetensors headers (the first 8
  bytes give the header's length; only the header is read, so a folder whose files hold headers and no
  data plans like the real one). A folder with config.json and no safetensors yet is read from the model
  built on the meta device (`model.shapes.meta_model`, no weights), its dtype from config.json.
- `write_shapes_only(folder, config)`: such a folder for a model one does not have: config.json and a
  model.safetensors holding only the header of every tensor (plan a model before downloading it).
- `tokens_shape`: (sequences, seq_len) of the calibration tokens, from their file's header.
- `gpus_here`, `disk_free`: this machine's GPUs and free disk (its memory: `model.stream.host_available`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from sfsd.errors import ConfigError, DataError
from sfsd.io import INDEX_FILE, MAX_SHARD_BYTES
from sfsd.model.registry import architecture_of, get_arch, groups_for, select_linears
from sfsd.resources.needs import ModelSize

# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
MAX_HEADER = 100 * 2**20  # a safetensors header of more than 100 MB is not one


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensors a safetensors file describes ({name: {dtype, shape, data_offsets}}), from its header
    alone: the data after it may be absent. A file too short for its header is a DataError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= MAX_HEADER:
                raise ValueError(f"header length {length}")
            raw = f.read(length)
        if len(raw) != length:
            raise ValueError(f"the file ends inside its {length}-byte header")
        header = json.loads(raw)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} has no readable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names, else every *.safetensors."""
    folder = Path(model_dir)
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def checkpoint_tensors(model_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{name: (safetensors dtype, shape, stored bytes)} of every tensor of the folder's checkpoint."""
    out = {}
    for file in checkpoint_files(model_dir):
        for name, info in read_header(file).items():
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), int(end) - int(start))
    return out


def _meta_tensors(config: Mapping) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """The same table from the model built on the meta device (tied parameters once), in the dtype its
    config names (float32 when it names none)."""
    from sfsd.model.shapes import meta_model

    dtype = TORCH_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch."),
                             "F32")
    return {name: (dtype, tuple(p.shape), p.numel() * DTYPE_BYTES[dtype])
            for name, p in meta_model(dict(config)).named_parameters()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_size(model_dir: str | os.PathLike, layers: list[str] | None = None) -> ModelSize:
    """The shapes the formulas read, for the Linear layers `layers` selects (`select_linears`; None: all)."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; the planner reads a model's shapes from it")
    config = json.loads((folder / "config.json").read_text())
    _check_keys(folder / "config.json", config)
    size = size_from(config, checkpoint_tensors(folder) if checkpoint_files(folder) else _meta_tensors(config), layers)
    return replace(size, shard_bytes=min(MAX_SHARD_BYTES, largest_file_bytes(folder)))


def config_size(config: Mapping, layers: list[str] | None = None) -> ModelSize:
    """The shapes of a model that is not on disk yet, from its config.json mapping alone (the model built on
    the meta device, stored in the dtype its config names, in one file up to MAX_SHARD_BYTES)."""
    size = size_from(config, _meta_tensors(config), layers)
    return replace(size, shard_bytes=min(MAX_SHARD_BYTES, int(size.stored_bytes)))


def largest_file_bytes(model_dir: str | os.PathLike) -> int:
    """The data bytes of the checkpoint's largest safetensors file, as its header describes them (a
    shapes-only folder plans like the real checkpoint); MAX_SHARD_BYTES where the folder has no weights."""
    sizes = [max((int(i["data_offsets"][1]) for i in read_header(f).values()), default=0)
             for f in checkpoint_files(model_dir)]
    return max(sizes, default=MAX_SHARD_BYTES)


def _check_keys(path: Path, config: Mapping) -> None:
    """One ConfigError line naming `path` when its config lacks what every stage reads: the architecture,
    and the model_type transformers builds the model by (suggested from the architecture)."""
    archs = config.get("architectures")
    if not archs:
        raise ConfigError(f"{path} names no architectures; add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    if not config.get("model_type"):
        raise ConfigError(f"{path} has no model_type; add \"model_type\": \"{model_type_of(archs[0])}\" (the model "
                          f"type of {archs[0]}, as transformers' config.json files name it)")


def model_type_of(architecture: str) -> str:
    """The transformers model_type of a causal-LM architecture class (LlamaForCausalLM: llama), the longest
    of those mapped to it whose name is in the class's; else the architecture's name before ForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = architecture.lower()
    types = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == architecture
             and t.replace("-", "").replace("_", "") in name]
    return max(types, key=len) if types else name.removesuffix("forcausallm").removesuffix("lmheadmodel")


def size_from(config: Mapping, tensors: Mapping[str, tuple[str, tuple[int, ...], int]],
              layers: list[str] | None = None) -> ModelSize:
    """`ModelSize` from a config.json mapping and a table of the checkpoint's tensors (`checkpoint_tensors`)."""
    spec = get_arch(architecture_of(dict(config)))
    linears = select_linears(spec, layers) if layers is not None else list(spec.linears)
    prefix = f"{spec.blocks}."
    n_blocks = 1 + max((int(n[len(prefix):].split(".")[0]) for n in tensors if n.startswith(prefix)), default=-1)
    if n_blocks == 0:
        raise DataError(f"the checkpoint holds no tensor under {spec.blocks}; is it a {architecture_of(dict(config))}?")
    shapes = {}
    for linear in linears:
        name = spec.param_name(0, linear, "weight")
        if name not in tensors:
            raise DataError(f"the checkpoint has no {name}; its tensor names differ from the architecture's")
        shapes[linear] = tensors[name][1]
    block = [v for n, v in tensors.items() if n.startswith(f"{prefix}0.")]
    head = f"{spec.lm_head}.weight"
    outside = sum(_numel(shape) for n, (_, shape, _) in tensors.items() if not n.startswith(prefix))
    head_params = _numel(tensors[head][1]) if head in tensors else 0
    hidden = int(config.get("hidden_size") or config.get("n_embd") or shapes[linears[0]][1])
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return ModelSize(
        n_blocks=n_blocks, hidden=hidden, heads=heads, kv_width=kv_heads * head_dim,
        mlp=max(max(shape) for _, shape, _ in block if len(shape) == 2),
        vocab=int(config.get("vocab_size") or 0),
        linears=tuple((n, int(shapes[n][0]), int(shapes[n][1])) for n in linears),
        groups=tuple((g, int(shapes[next(m for m in spec.input_groups[g] if m in shapes)][1]))
                     for g in groups_for(spec, linears)),
        block_params=sum(_numel(shape) for _, shape, _ in block),
        embed_params=outside - head_params, head_params=head_params,
        stored_bytes=sum(nbytes for _, _, nbytes in tensors.values()))


def write_shapes_only(folder: str | os.PathLike, config: Mapping) -> Path:
    """A model folder without weights: `config` as config.json and model.safetensors holding only the
    header of every parameter of the model it builds (dtype: its torch_dtype), data absent. The planner
    reads it like the real checkpoint; no stage can load it (its data is missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2))
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "shapes_only": "true"}}
    offset = 0
    for name, (dtype, shape, nbytes) in _meta_tensors(config).items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
    return folder


def tokens_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(sequences, seq_len) of a calibration tokens file, from its header."""
    header = read_header(path)
    if "input_ids" not in header:
        raise DataError(f"{path} holds no input_ids; rerun tokenize_calibration")
    sequences, seq_len = header["input_ids"]["shape"]
    return int(sequences), int(seq_len)


def gpus_here() -> tuple[int, float | None]:
    """(NVIDIA GPUs on this machine, the memory of the first in bytes), from nvidia-smi without starting
    CUDA: (0, None) without nvidia-smi; (1, None) where it is present but lists none it can size (an
    NVIDIA driver is there, as rules/common.smk's gpu_wanted reads it)."""
    if shutil.which("nvidia-smi") is None:
        return 0, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        return (len(out), float(out[0]) * 2**20) if out else (1, None)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 1, None


def disk_free(path: str | os.PathLike) -> int:
    """Free bytes on the file system of `path` (of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
