"""Applying a rank plan (`sfsd.decompose.plan`) to a model from the cached statistics, and saving / loading the
compressed model. (Cutting a plan from the full-rank factor cache instead: `sfsd.decompose.factor_cache`.)

A factored Linear becomes a `sfsd.decompose.lowrank.LowRankLinear` (two nn.Linear, `first`: in -> r without bias,
`second`: r -> out) registered at the same attribute path, so the model stays an ordinary transformers
model: `generate()` and lm-eval's HFLM work unchanged. LASER and Vendi write a dense matrix back into the
original Linear.

All reads of cached statistics go through `cached_statistics` (eigen/ and features/ block files);
`apply_plan` itself takes per-block tensors from callables or dicts, so tests feed it in memory.
A compressed model is saved as a folder that standard tools load: model.safetensors, or shards of at most
5 GiB with their index, written one block at a time (`CompressedFolder`; state dict, tied weights once), config.json with transformers' `auto_map` pointing at the folder's own modeling_sfsd.py (a
copy of `sfsd.model.hf_modeling`, which needs no sfsd package), plan.json and the tokenizer. So
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, lm-eval's hf model and
`load_compressed` all give the same model, bit for bit; config.json's model_type is `sfsd_<base type>`, so
loading without the remote code is refused rather than half-initialised.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from sfsd.decompose.lowrank import from_factors, linear_path, linear_shapes, replace_module
from sfsd.decompose.methods import (
    Factors,
    asvd,
    feature_space,
    laser,
    laser_rank,
    vendi_rebuild,
    vendi_select,
    weight_space,
    whitened,
)
from sfsd.decompose.plan import FACTOR_METHODS, parse_layer_key, validate_plan
from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.io import (
    MAX_SHARD_BYTES,
    ShardWriter,
    TensorFile,
    atomic_dir,
    check_checkpoint,
    checkpoint_index,
    checkpoint_metadata,
    read_json,
    read_metadata,
    read_parameters,
    safetensors_header,
    write_json,
)
from sfsd.model.hf_modeling import MODEL_TYPE_PREFIX, LowRankLinear
from sfsd.model.placement import place_model
from sfsd.model.registry import architecture_of, blocks_of, get_arch
from sfsd.model.skeleton import without_weights
from sfsd.model.spec import ArchSpec
from sfsd.provenance import stamp

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
MODELING_FILE = "modeling_sfsd.py"  # sfsd.model.hf_modeling, as config.json's auto_map names it
FORMAT = "sfsd-compressed-2"  # 1: compressed.safetensors, loadable by load_compressed only

FEATURE_METHODS = ("whitened", "asvd")  # factor methods that read the input statistics (features/)

BlockTensors = Mapping[str, torch.Tensor]
BlockSource = Callable[[int], BlockTensors] | Mapping[int, BlockTensors]


def declared_architecture(model: nn.Module) -> str | None:
    """The model's HF architecture name, or None when its config names none."""
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else None


# ---------------------------------------------------------------- cached statistics (all file reads)


class BlockFile:
    """Lazy read-only view of one block file: tensors are read on first access (memory-mapped), and
    the file's model_digest is checked against the expected one before anything is used."""
    _names: frozenset[str] | None = None

    def __init__(self, path: Path, model_digest: str | None) -> None:
        self.path = path
        meta = read_metadata(path) if path.exists() else None
        if meta is None:
            raise DataError(f"missing file {path}; run the stage that makes it first")
        if model_digest is not None and meta.get("model_digest") != model_digest:
            raise DataError(f"{path} was made from another model (digest {meta.get('model_digest')} != {model_digest}); "
                            "rerun its stage for this model")
        self.metadata = meta
        self._cache: dict[str, torch.Tensor] = {}
        self._file: TensorFile | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            if self._file is None:  # one mapping of the file for every tensor read (io.TensorFile)
                self._file = TensorFile(self.path)
            self._cache[key] = self._file[key]
        return self._cache[key]

    def __contains__(self, key: str) -> bool:
        if self._names is None:
            self._names = frozenset(json.loads(safetensors_header(self.path))) - {"__metadata__"}
        return key in self._names


def cached_statistics(
    model_results: str | os.PathLike, model_digest: str | None = None
) -> tuple[Callable[[int], BlockTensors], Callable[[int], BlockTensors]]:
    """Per-block readers of `<model_results>/eigen/block_NNN.safetensors` (`<linear>.eigenvectors`,
    `.eigenvalues`, `.mean`) and `<model_results>/features/block_NNN.safetensors` (`<group>.xxt`,
    `.xsum`, `.xabs`, `.count`), for `apply_plan`. With `model_digest`, a file of another model is a DataError."""
    root = Path(model_results)

    def eigen(block: int) -> BlockTensors:
        return BlockFile(root / "eigen" / block_file(block), model_digest)

    def features(block: int) -> BlockTensors:
        return BlockFile(root / "features" / block_file(block), model_digest)

    return eigen, features


def block_statistics(source: BlockSource | None, block: int, what: str) -> BlockTensors:
    """One block's tensors from a callable or a dict by block; a missing source or block is an error."""
    if source is None:
        raise ConfigError(f"the plan needs {what} statistics; pass them (see compress.cached_statistics)")
    if callable(source):
        return source(block)
    try:
        return source[block]
    except KeyError:
        raise DataError(f"no {what} statistics for block {block}") from None


def statistic(tensors: BlockTensors, key: str, block: int, what: str) -> torch.Tensor:
    """tensors[key]; a missing key is a DataError naming the block and the stage to rerun."""
    try:
        return tensors[key]
    except KeyError:
        raise DataError(f"{what} statistics of block {block} lack {key!r}; rerun that stage with this layer") from None


def _mean_abs(features: BlockTensors, group: str, block: int, count: int) -> torch.Tensor:
    """E|x| of an input group for asvd; feature files collected before sum |x| was saved lack it."""
    key = f"{group}.xabs"
    if key not in features:
        where = features.path.parent if isinstance(features, BlockFile) else "the feature statistics"
        raise DataError(f"asvd needs {key} (sum |x|), which block {block} of {where} lacks: it was collected by an "
                        f"older version; rerun collection (delete {where})")
    return features[key] / count


# ---------------------------------------------------------------- applying a plan


def token_count(features: BlockTensors, group: str, block: int) -> int:
    """Tokens behind a group's feature statistics; none is a DataError."""
    count = int(statistic(features, f"{group}.count", block, "feature"))
    if count <= 0:
        raise DataError(f"feature statistics of block {block} {group} hold no tokens")
    return count


def factors_for(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    method: str,
    rank: int,
    *,
    eigen: BlockTensors | None = None,
    features: BlockTensors | None = None,
    linear: str = "",
    group: str = "",
    block: int = -1,
    bias_compensation: str = "intended",
    jitter: float = 1e-6,
) -> tuple[Factors, dict]:
    """Factors of one Linear by a factor method, reading the statistics it needs; and a report."""
    device = weight.device
    if method == "feature":
        vectors = statistic(eigen, f"{linear}.eigenvectors", block, "eigen").to(device)
        mean = statistic(eigen, f"{linear}.mean", block, "eigen").to(device)
        return feature_space(weight, bias, vectors, mean, rank, bias_compensation), {}
    if method == "weight":
        return weight_space(weight, bias, rank), {}
    if method in FEATURE_METHODS:
        count = token_count(features, group, block)
        if method == "asvd":
            return asvd(weight, bias, _mean_abs(features, group, block, count).to(device), rank), {}
        xxt = statistic(features, f"{group}.xxt", block, "feature")
        factors, used = whitened(weight, bias, xxt.to(device) / count, rank, jitter)
        if used:
            log.warning("block %d %s: Cholesky of the %s second moment needed jitter %.1e x mean(diag)",
                        block, linear, group, used)
        return factors, {"jitter": used}
    raise ConfigError(f"{method!r} is not a factor method")


def apply_plan(
    model: nn.Module,
    spec: ArchSpec,
    plan: Mapping,
    eigen_blocks: BlockSource | None = None,
    feature_blocks: BlockSource | None = None,
    *,
    model_digest: str | None = None,
) -> dict:
    """Compress `model` IN PLACE as `plan` says and return {"plan": normalised plan, "layers": report}.

    eigen_blocks(b) / feature_blocks(b) (or dicts by block) give the block's cached tensors: feature
    space reads `<linear>.eigenvectors` and `.mean`, whitened reads `<group>.xxt` / `.count`
    (E[x x^T] = xxt / count of the Linear's input group), asvd `<group>.xabs` / `.count` (E|x|);
    weight, laser and vendi need none.
    Factors are computed in float64 and stored in the layer's dtype and device."""
    blocks = blocks_of(model, spec)
    norm = validate_plan(plan, spec, len(blocks), linear_shapes(model, spec), model_digest=model_digest,
                         architecture=declared_architecture(model))
    options = norm["options"]
    report: dict[str, dict] = {}
    by_block: dict[int, list[tuple[str, str, dict]]] = {}
    for key, entry in norm["layers"].items():
        block, linear = parse_layer_key(key, spec, len(blocks))
        by_block.setdefault(block, []).append((key, linear, entry))
    for block, entries in by_block.items():
        methods = {e["method"] for _, _, e in entries}
        eigen = block_statistics(eigen_blocks, block, "eigen") if "feature" in methods else None
        features = block_statistics(feature_blocks, block, "feature") if methods & set(FEATURE_METHODS) else None
        for key, linear, entry in entries:
            method = entry["method"]
            if method == "dense":
                continue
            path = linear_path(spec, block, linear)
            layer = model.get_submodule(path)
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"layer {key} is already a {type(layer).__name__}; apply a plan to the dense model")
            weight = layer.weight.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            with torch.no_grad():
                if method in FACTOR_METHODS:
                    factors, extra = factors_for(
                        weight, bias, method, entry["rank"], eigen=eigen, features=features, linear=linear,
                        group=spec.group_of(linear), block=block,
                        bias_compensation=options["bias_compensation"], jitter=options["jitter"])
                    replace_module(model, path, from_factors(factors))
                    report[key] = {"method": method, "rank": entry["rank"], **extra}
                elif method == "laser":
                    layer.weight.copy_(laser(weight, entry["rate"]))
                    report[key] = {"method": method, "k": laser_rank(min(weight.shape), entry["rate"])}
                else:  # vendi
                    k = laser_rank(min(weight.shape), entry["rate"])
                    rows = vendi_select(weight, k, use_quality=entry["use_quality"],
                                        min_diversity=entry["min_diversity"], bandwidth=entry["bandwidth"],
                                        exact=entry["exact"])
                    layer.weight.copy_(vendi_rebuild(weight, rows))
                    report[key] = {"method": method, "k": k}
    return {"plan": norm, "layers": report}


# ---------------------------------------------------------------- save / load


class CompressedFolder:
    """Writes a compressed model into `folder` (a temporary folder of `atomic_dir`) one block at a time:
    `add_block(b, block)` puts block b's tensors into the weight shards (`io.ShardWriter`: a shard is
    written as soon as it is full, so a streamed model never holds more than one shard and one block),
    `finish` adds the modules outside the blocks (a tied tensor once) and writes the metadata, plan.json,
    config.json, modeling_sfsd.py, generation_config.json and the tokenizer."""

    def __init__(self, folder: str | os.PathLike, model: nn.Module, shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder, self.model = Path(folder), model
        self.spec = get_arch(architecture_of(model.config))
        self.prefix = self.spec.blocks + "."
        self.writer = ShardWriter(self.folder, shard_bytes, raw={"format": "pt"})
        self.tied: dict[str, str] = {}
        self.dtypes: set[str] = set()

    def _add(self, prefix: str, state: Mapping[str, torch.Tensor]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[tuple, str] = {}
        for name, t in state.items():
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ident in seen:
                self.tied[prefix + name] = prefix + seen[ident]
            else:
                seen[ident] = name
                tensors[prefix + name] = t
        self.dtypes |= {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
        if len(self.dtypes) > 1:
            raise ConfigError(f"model holds floating tensors of several dtypes {sorted(self.dtypes)}; cast it to one "
                              "first")
        self.writer.add(tensors)

    def add_block(self, b: int, block: nn.Module) -> None:
        self._add(f"{self.prefix}{b}.", block.state_dict())

    def finish(self, plan: Mapping, tokenizer=None, factors: Mapping | None = None) -> None:
        """`plan`: the plan the blocks were compressed by; `factors`: the provenance of the factor caches
        used (apply_cached_plan's), recorded in the metadata."""
        model = self.model
        norm = validate_plan(plan, self.spec, len(blocks_of(model, self.spec)), linear_shapes(model, self.spec))
        self._add("", {k: v for k, v in model.state_dict().items() if not k.startswith(self.prefix)})
        dtype = self.dtypes.pop()
        self.writer.finish({
            "sfsd_format": FORMAT, "tied": self.tied, "dtype": dtype, "model": norm.get("model"),
            "factors": dict(factors or {}),
            **stamp(norm.get("model_digest"), next((v["calibration_digest"] for v in (factors or {}).values()
                                                    if v.get("calibration_digest")), None),
                    {"options": norm.get("options")})})
        write_json(self.folder / PLAN_FILE, norm)
        write_json(self.folder / "config.json", hf_config(model, dtype))
        (self.folder / MODELING_FILE).write_text(modeling_code(architecture_of(model.config)))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)


def save_compressed(model: nn.Module, plan: Mapping, out_dir: str | os.PathLike, tokenizer=None,
                    factors: Mapping | None = None, shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a compressed model in memory into `out_dir` atomically (`CompressedFolder`)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        folder = CompressedFolder(tmp, model, shard_bytes)
        for b, block in enumerate(blocks_of(model, folder.spec)):
            folder.add_block(b, block)
        folder.finish(plan, tokenizer, factors)
    return out_dir


def hf_config(model: nn.Module, dtype: str | None = None) -> dict:
    """config.json of a compressed folder: the model's own config, its model_type prefixed (`sfsd_llama`),
    transformers' auto_map pointing at modeling_sfsd.py, the factored Linears ({path: [rank, bias]}), and
    `dtype` (the folder's weights' dtype; transformers loads the folder in it), also as `torch_dtype` where
    the model's config writes that older name."""
    low_rank = {name: [m.rank, m.second.bias is not None] for name, m in model.named_modules()
                if isinstance(m, LowRankLinear)}
    config = model.config.to_dict()
    if dtype is not None:
        config.update({key: dtype for key in ("torch_dtype",) if key in config}, dtype=dtype)
    stem = MODELING_FILE.removesuffix(".py")
    return {**config, "model_type": MODEL_TYPE_PREFIX + config["model_type"], "sfsd_low_rank": low_rank,
            "auto_map": {"AutoConfig": f"{stem}.SfsdConfig", "AutoModelForCausalLM": f"{stem}.SfsdForCausalLM"}}


def modeling_code(architecture: str) -> str:
    """The text of modeling_sfsd.py for a model of `architecture`: sfsd.model.hf_modeling with its base set."""
    import inspect

    from sfsd.model import hf_modeling

    default = f'BASE_ARCHITECTURE = "{hf_modeling.BASE_ARCHITECTURE}"'
    source = inspect.getsource(hf_modeling)
    if source.count(default) != 1:
        raise RuntimeError("sfsd/model/hf_modeling.py must assign BASE_ARCHITECTURE once, as a string literal")
    return source.replace(default, f"BASE_ARCHITECTURE = {architecture!r}")


def load_compressed(out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: str = "auto") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_compressed`: architecture from config.json, LowRankLinear
    modules shaped by plan.json and the saved factors, then the weights, placed on `device`
    (`placement.place_model`: auto spreads it over the GPUs when it does not fit one), in the dtype of the
    `dtype` setting (`loading.run_dtype`: auto = the folder's own). Returns (model in eval mode, plan). In
    the folder's dtype its logits equal those of the model that was saved, bit for bit."""
    from sfsd.model.loading import check_device_dtype, resolve_dtype, run_dtype
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    out_dir = Path(out_dir)
    plan = read_json(out_dir / PLAN_FILE)
    meta = checkpoint_metadata(out_dir)
    if meta.get("sfsd_format") != FORMAT:
        raise DataError(f"{out_dir} is not a compressed model of this format "
                        f"({meta.get('sfsd_format')!r}, expected {FORMAT!r}); compress it again")
    check_checkpoint(out_dir)  # a truncated shard is one DataError, not a traceback
    tensors = read_parameters(out_dir, list(checkpoint_index(out_dir)))
    saved = read_json(out_dir / "config.json")
    base_type = saved["model_type"].removeprefix(MODEL_TYPE_PREFIX)
    config = CONFIG_MAPPING[base_type].from_dict(
        {k: v for k, v in saved.items() if k not in ("auto_map", "sfsd_low_rank", "model_type")})
    spec = get_arch(architecture_of(config))
    name = run_dtype(saved, dtype)  # auto: config.json's dtype, the weights' (load_state_dict casts any other)
    check_device_dtype(name, device)
    dtype = resolve_dtype(name)
    # the parameters on the meta device until the saved tensors take their place (model.skeleton; buffers
    # such as the rotary frequencies are built for real): the dense model is never allocated
    model = without_weights(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
    blocks = blocks_of(model, spec)
    norm = validate_plan(plan, spec, len(blocks), linear_shapes(model, spec))
    for key, entry in norm["layers"].items():
        if entry["method"] not in FACTOR_METHODS:
            continue
        block, linear = parse_layer_key(key, spec, len(blocks))
        path = linear_path(spec, block, linear)
        first = tensors.get(f"{path}.first.weight")
        if first is None or first.shape[0] != entry["rank"]:
            raise DataError(f"{out_dir}: saved factors of {key} do not match plan rank {entry['rank']}; "
                            "the folder is inconsistent, save it again")
        dense = model.get_submodule(path)
        bias = f"{path}.second.bias" in tensors
        replace_module(model, path, without_weights(
            lambda: LowRankLinear(dense.in_features, dense.out_features, entry["rank"], bias, dtype=dtype)))
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}  # no copy at its dtype
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # the tied parameters share the loaded tensor (transformers 5 ties in init_weights)
    missing = set(result.missing_keys) - set(meta.get("tied", {}))
    if missing or result.unexpected_keys:
        raise DataError(f"{out_dir}: weights do not fit the architecture (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(result.unexpected_keys)[:3]}); save it again")
    for name, source in meta.get("tied", {}).items():  # tied in the saved model: tied here too
        if model.get_parameter(name) is not model.get_parameter(source):
            raise DataError(f"{out_dir}: {name} was tied to {source} but this config does not tie them")
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise DataError(f"{out_dir}: no saved weights for {empty[:3]}; save it again")
    return place_model(model, device).eval(), norm


__all__ = [
    "BlockFile",
    "CompressedFolder",
    "apply_plan",
    "block_statistics",
    "cached_statistics",
    "declared_architecture",
    "factors_for",
    "load_compressed",
    "save_compressed",
    "statistic",
    "token_count",
]
