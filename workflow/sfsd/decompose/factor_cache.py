"""The full-rank factor cache: each factored Linear's factors at rank kappa - 1, computed once per factor
method and written as `<factors>/<method>/block_NNN.safetensors`, so any plan of that method is cut by
slicing (`lowrank.cut_factors`) instead of decomposing again.

- `full_rank_factors` / `save_factor_cache`: compute and write the cache (with each layer's spectrum,
  `layer_spectrum`, for the spectral allocation);
- `factor_entry` / `factor_spectrum`: one Linear's entry and spectrum from a cache block file;
- `apply_cached_plan`: compress a model as a plan says, cutting every factored layer from the cache;
- `compress_from_cache`: the same, one block at a time, written into a compressed folder as it goes
  (a model streamed from its checkpoint, `stream.BlockStream`, never needs to fit in memory).
The statistics the factors are computed from are read through `sfsd.decompose.compress` (`cached_statistics`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import nn

from sfsd.decompose.compress import (
    FEATURE_METHODS,
    BlockFile,
    BlockSource,
    BlockTensors,
    CompressedFolder,
    block_statistics,
    declared_architecture,
    factors_for,
    statistic,
    token_count,
)
from sfsd.decompose.lowrank import cut_module, linear_path, linear_shapes, replace_module
from sfsd.decompose.methods import max_rank
from sfsd.decompose.plan import FACTOR_METHODS, parse_layer_key, validate_plan
from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.io import MAX_SHARD_BYTES, atomic_dir, save_tensors
from sfsd.model.registry import blocks_of
from sfsd.model.spec import ArchSpec
from sfsd.model.stream import BlockStream, WholeModel
from sfsd.provenance import common_value, stamp


def full_rank_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    method: str,
    *,
    eigen: BlockTensors | None = None,
    features: BlockTensors | None = None,
    linear: str = "",
    group: str = "",
    block: int = -1,
    jitter: float = 1e-6,
    report: dict | None = None,
) -> dict[str, torch.Tensor]:
    """The factors of one Linear at rank kappa - 1, the largest rank a plan can keep factored, as
    tensors for `save_factor_cache`: `first` (rows in rank order), `second` (columns in rank order),
    and for feature space the output `mean` (and the layer's `bias`) its rank-dependent bias needs.
    Any rank r < kappa is then `lowrank.cut_factors(cache, method, r)`: the same factors as computing at rank r.
    `report`, when given, receives what the method reports (the Cholesky jitter of whitened)."""
    kappa = max_rank(weight.shape[1], weight.shape[0])
    top = max(1, kappa - 1)
    # The feature-space bias depends on r: store factors without it and rebuild it in cut_factors.
    factors, extra = factors_for(weight, bias, method, top, eigen=eigen, features=features, linear=linear,
                                 group=group, block=block, bias_compensation="none", jitter=jitter)
    if report is not None:
        report.update(extra)
    out = {"first": factors.first, "second": factors.second}
    if method == "feature":
        out["mean"] = statistic(eigen, f"{linear}.mean", block, "eigen").to(weight.dtype)
        if bias is not None:
            out["bias"] = bias
    elif factors.bias is not None:
        out["bias"] = factors.bias
    return out


def save_factor_cache(
    model: nn.Module | BlockStream | WholeModel,
    spec: ArchSpec,
    method: str,
    linears: list[str],
    out_dir: str | os.PathLike,
    eigen_blocks: BlockSource | None = None,
    feature_blocks: BlockSource | None = None,
    blocks: list[int] | None = None,
    *,
    model_digest: str | None = None,
    jitter: float = 1e-6,
) -> list[Path]:
    """Write `<out_dir>/block_NNN.safetensors` with `<linear>.first/.second(/.mean/.bias)` at rank
    kappa - 1 for a factor method, so any plan of that method is cut by slicing (`apply_cached_plan`).
    `model`: a model in memory, or a `stream.BlockStream` whose blocks are read one at a time, in its run
    dtype; the cache is float32 whatever that dtype (a bfloat16 model's weights widen exactly)."""
    if method not in FACTOR_METHODS:
        raise ConfigError(f"save_factor_cache: {method!r} is not a factor method ({', '.join(FACTOR_METHODS)})")
    source = WholeModel(model) if isinstance(model, nn.Module) else model
    all_blocks = source.blocks
    paths = []
    sources: list[tuple[str, dict]] = []  # (file, metadata) of the statistics read, for provenance
    for block in (range(len(all_blocks)) if blocks is None else blocks):
        eigen = block_statistics(eigen_blocks, block, "eigen") if method == "feature" else None
        # whitened and asvd factors read the input statistics; weight-space SVD reads them (when given) only
        # for its layers' spectra (`layer_spectrum`), which the spectral allocation needs
        features = block_statistics(feature_blocks, block, "feature") if method in FEATURE_METHODS or (
            method == "weight" and feature_blocks is not None) else None
        stats = eigen if eigen is not None else features
        if isinstance(stats, BlockFile):
            sources.append((str(stats.path), stats.metadata))
        # every block's statistics from one calibration run (a stale block of an older run is refused)
        calibration = common_value(sources, "calibration_digest", f"{method} statistics")
        tensors = {}
        layers: dict[str, dict] = {}
        with source.block(block) as module:
            for linear in linears:
                layer = module.get_submodule(spec.linears[linear])
                extra: dict = {}
                with torch.no_grad():
                    # a bfloat16 / float16 model's weights widened (exactly): the factors are computed in
                    # float64 and cached in float32 whatever the model's dtype, cast only when cut into a model
                    weight, bias = (None if t is None else t.detach().to(torch.promote_types(t.dtype, torch.float32))
                                    for t in (layer.weight, layer.bias))
                    entry = full_rank_factors(weight, bias, method, eigen=eigen, features=features, linear=linear,
                                              group=spec.group_of(linear), block=block, jitter=jitter, report=extra)
                tensors.update({f"{linear}.{k}": v for k, v in entry.items()})
                if eigen is not None or features is not None:
                    tensors.update({f"{linear}.{k}": v for k, v in layer_spectrum(
                        weight, method, entry, eigen=eigen, features=features, linear=linear,
                        group=spec.group_of(linear), block=block).items()})
                if extra:
                    layers[linear] = extra
        path = Path(out_dir) / block_file(block)
        save_tensors(path, tensors, {"method": method, "block": block, "linears": list(linears), "layers": layers,
                                     **stamp(model_digest, calibration,
                                             {"method": method, "layers": list(linears), "jitter": jitter})})
        paths.append(path)
    return paths


def layer_spectrum(
    weight: torch.Tensor,
    method: str,
    entry: Mapping[str, torch.Tensor],
    *,
    eigen: BlockTensors | None = None,
    features: BlockTensors | None = None,
    linear: str = "",
    group: str = "",
    block: int = -1,
) -> dict[str, torch.Tensor]:
    """`gain` (float64, one per cached rank: the output energy each component adds) and `energy`
    (E||W x||^2) of one Linear, for the spectral allocation (`sfsd.decompose.allocate`). Feature space: the
    output covariance's eigenvalues and their sum; the other methods: `allocate.captured_energy` of
    the cached factors under the input second moment E[x x^T]."""
    from sfsd.decompose.allocate import captured_energy, output_energy

    if method == "feature":
        values = statistic(eigen, f"{linear}.eigenvalues", block, "eigen").double()
        return {"gain": values[: entry["first"].shape[0]].clone(), "energy": values.sum()}
    moment = statistic(features, f"{group}.xxt", block, "feature").double() / token_count(features, group, block)
    return {"gain": captured_energy(entry["first"], entry["second"], moment),
            "energy": torch.tensor(output_energy(weight, moment), dtype=torch.float64)}


def factor_spectrum(block: Mapping[str, torch.Tensor], linear: str,
                    bias_compensation: str = "intended") -> tuple[torch.Tensor, float]:
    """(gain, energy) of one Linear from a factor-cache block file (`layer_spectrum`); a cache written
    before spectra were stored is a DataError naming the fix. Feature space without bias compensation
    ("none": y ~ P (W x + b)) also loses the output mean's dropped part: E||(I - P) y||^2 =
    sum_{i>r} (lambda_i + (v_i^T mu)^2), so each gain gains (v_i^T mu)^2 and the energy ||mu||^2."""
    try:
        gain, energy = block[f"{linear}.gain"].double(), float(block[f"{linear}.energy"])
    except DataError:
        raise DataError(f"the factor cache lacks the spectrum of {linear}; delete results/<model>/factors and rerun "
                        "(an older cache)") from None
    if bias_compensation == "none":
        try:
            mean = block[f"{linear}.mean"].double()  # stored for feature space only
        except DataError:
            return gain, energy
        along = (block[f"{linear}.second"].double().T @ mean).square()
        gain, energy = gain + along[:gain.numel()], energy + float(mean.square().sum())
    return gain, energy


def factor_entry(block: Mapping[str, torch.Tensor], linear: str) -> dict[str, torch.Tensor]:
    """One Linear's entry of a factor-cache block file (`save_factor_cache`): first, second and, where
    stored, the output mean and the bias, for `lowrank.cut_factors`."""
    entry = {k: block[f"{linear}.{k}"] for k in ("first", "second")}
    for k in ("mean", "bias"):
        try:
            entry[k] = block[f"{linear}.{k}"]
        except DataError:  # not stored for this method
            pass
    return entry


def apply_cached_plan(
    model: nn.Module,
    spec: ArchSpec,
    plan: Mapping,
    cache_dir: str | os.PathLike,
    *,
    model_digest: str | None = None,
    blocks: Collection[int] | None = None,
) -> dict:
    """Like `apply_plan` for a plan of factor methods (and dense entries), cutting every factored
    layer from the factor cache of its method (`<cache_dir>/<method>/block_NNN.safetensors`).
    `blocks`: only these blocks' layers (the others may be on the meta device, `stream.BlockStream`).
    Returns the normalised plan, a report per layer, the cache files read (`sources`, per method) and
    their `provenance` (`cache_provenance`)."""
    n_blocks = len(blocks_of(model, spec))
    norm = validate_plan(plan, spec, n_blocks, linear_shapes(model, spec), model_digest=model_digest,
                         architecture=declared_architecture(model))
    files: dict[tuple[str, int], BlockFile] = {}  # the current block's files only
    sources: dict[str, list[tuple[str, dict]]] = {}  # method -> (file, metadata) of the cache blocks used
    report = {}
    for key, entry in norm["layers"].items():
        method = entry["method"]
        if method == "dense":
            continue
        if method not in FACTOR_METHODS:
            raise ConfigError(f"layer {key}: {method} is not cached; use apply_plan for laser/vendi")
        block, linear = parse_layer_key(key, spec, n_blocks)
        if blocks is not None and block not in blocks:
            continue
        if (method, block) not in files:
            if any(b != block for _, b in files):
                files.clear()
            files[(method, block)] = BlockFile(Path(cache_dir) / method / block_file(block), model_digest)
            sources.setdefault(method, []).append((str(files[(method, block)].path), files[(method, block)].metadata))
        cache = factor_entry(files[(method, block)], linear)
        layer = model.get_submodule(linear_path(spec, block, linear))
        replace_module(model, linear_path(spec, block, linear),
                       cut_module(cache, method, entry["rank"], norm["options"]["bias_compensation"], layer))
        report[key] = {"method": method, "rank": entry["rank"]}
    return {"plan": norm, "layers": report, "sources": sources, "provenance": cache_provenance(sources, cache_dir)}


def cache_provenance(sources: Mapping[str, list[tuple[str, dict]]], cache_dir: str | os.PathLike) -> dict:
    """What a compressed model is made of, from the cache files read ({method: [(file, metadata)]}):
    per method its calibration digest and code version; one calibration run per method's cache and
    across methods, never a mix (a DataError naming the fix)."""
    provenance = {m: {"calibration_digest": common_value(items, "calibration_digest", f"{m} factor cache"),
                      "code_version": items[0][1].get("code_version")} for m, items in sources.items()}
    digests = {m: p["calibration_digest"] for m, p in provenance.items() if p["calibration_digest"] is not None}
    if len(set(digests.values())) > 1:
        raise DataError(f"the factor caches under {cache_dir} come from different calibration data {digests}; "
                        "rerun factor_cache for every method")
    return provenance


def compress_from_cache(
    source: BlockStream | WholeModel,
    plan: Mapping,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_digest: str | None = None,
    tokenizer=None,
    shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """Compress the model of `source` as `plan` says, from the factor cache, and write the folder
    (`compress.CompressedFolder`) block by block: block b is read (streamed), cut, written into the weight
    shards and dropped before block b + 1, so a streamed model never holds more than one block and one
    shard. Returns apply_cached_plan's plan, layers and provenance over all blocks."""
    spec = source.spec
    layers: dict[str, dict] = {}
    sources: dict[str, list[tuple[str, dict]]] = {}
    norm = None
    with atomic_dir(out_dir) as tmp:
        folder = CompressedFolder(tmp, source.model, shard_bytes)
        for b in range(len(source.blocks)):
            with source.block(b) as block:
                applied = apply_cached_plan(source.model, spec, plan, cache_dir, model_digest=model_digest,
                                            blocks={b})
                folder.add_block(b, block)
            norm = applied["plan"]
            layers.update(applied["layers"])
            for method, items in applied["sources"].items():
                sources.setdefault(method, []).extend(items)
        provenance = cache_provenance(sources, cache_dir)
        folder.finish(norm, tokenizer, provenance)
    return {"plan": norm, "layers": layers, "provenance": provenance}


__all__ = [
    "apply_cached_plan",
    "cache_provenance",
    "compress_from_cache",
    "factor_entry",
    "factor_spectrum",
    "full_rank_factors",
    "layer_spectrum",
    "save_factor_cache",
]
