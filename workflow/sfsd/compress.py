"""Applying a rank plan (`sfsd.plan`) to a model, and saving / loading the compressed model.

A factored Linear becomes a `LowRankLinear` (two nn.Linear, `first`: in -> r without bias, `second`:
r -> out) registered at the same attribute path, so the model stays an ordinary transformers model:
`generate()` and lm-eval's HFLM work unchanged. LASER and Vendi write a dense matrix back into the
original Linear.

All reads of cached statistics go through `cached_statistics` (eigen/ and features/ block files);
`apply_plan` itself takes per-block tensors from callables or dicts, so tests feed it in memory.
A compressed model is saved as `compressed.safetensors` (state dict, tied weights once) + plan.json +
config.json (+ tokenizer): deliberately NOT `model.safetensors`, so `from_pretrained` cannot load it
half-right; use `load_compressed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .arch import ArchSpec, architecture_of, blocks_of, get_arch
from .collect import block_file
from .errors import ConfigError, DataError
from .io import atomic_dir, load_tensors, read_json, read_metadata, safetensors_header, save_tensors, write_json
from .methods import (
    Factors,
    asvd,
    feature_space,
    laser,
    laser_rank,
    max_rank,
    vendi_rebuild,
    vendi_select,
    weight_space,
    whitened,
)
from .plan import FACTOR_METHODS, Shapes, layer_key, parse_layer_key, validate_plan
from .provenance import common_value, stamp

log = logging.getLogger(__name__)

WEIGHTS_FILE = "compressed.safetensors"
PLAN_FILE = "plan.json"
FORMAT = "sfsd-compressed-1"

FEATURE_METHODS = ("whitened", "asvd")  # factor methods that read the input statistics (features/)

BlockTensors = Mapping[str, torch.Tensor]
BlockSource = Callable[[int], BlockTensors] | Mapping[int, BlockTensors]


class LowRankLinear(nn.Module):
    """y = second(first(x)): first = nn.Linear(in, rank, bias=False), second = nn.Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: Factors) -> LowRankLinear:
        """A module holding exactly the given factors (their dtype and device)."""
        first, second = factors.first, factors.second
        module = cls(first.shape[1], second.shape[0], first.shape[0], factors.bias is not None,
                     device=first.device, dtype=first.dtype)
        with torch.no_grad():
            module.first.weight.copy_(first)
            module.second.weight.copy_(second)
            if factors.bias is not None:
                module.second.bias.copy_(factors.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_path(spec: ArchSpec, block: int, linear: str) -> str:
    """Module path of a Linear inside the CausalLM, e.g. model.layers.3.self_attn.q_proj."""
    return f"{spec.blocks}.{block}.{spec.linears[linear]}"


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted attribute `path` (setattr on its parent)."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def linear_shapes(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each short Linear name, read from block 0 (dense or factored)."""
    block = blocks_of(model, spec)[0]
    out = {}
    for name, path in spec.linears.items():
        mod = block.get_submodule(path)
        out[name] = (mod.out_features, mod.in_features)
    return out


def _architecture(model: nn.Module) -> str | None:
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

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = load_tensors(self.path, [key])[0][key]
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


def _block(source: BlockSource | None, block: int, what: str) -> BlockTensors:
    if source is None:
        raise ConfigError(f"the plan needs {what} statistics; pass them (see compress.cached_statistics)")
    if callable(source):
        return source(block)
    try:
        return source[block]
    except KeyError:
        raise DataError(f"no {what} statistics for block {block}") from None


def _stat(tensors: BlockTensors, key: str, block: int, what: str) -> torch.Tensor:
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


def _token_count(features: BlockTensors, group: str, block: int) -> int:
    """Tokens behind a group's feature statistics; none is a DataError."""
    count = int(_stat(features, f"{group}.count", block, "feature"))
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
        vectors = _stat(eigen, f"{linear}.eigenvectors", block, "eigen").to(device)
        mean = _stat(eigen, f"{linear}.mean", block, "eigen").to(device)
        return feature_space(weight, bias, vectors, mean, rank, bias_compensation), {}
    if method == "weight":
        return weight_space(weight, bias, rank), {}
    if method in FEATURE_METHODS:
        count = _token_count(features, group, block)
        if method == "asvd":
            return asvd(weight, bias, _mean_abs(features, group, block, count).to(device), rank), {}
        xxt = _stat(features, f"{group}.xxt", block, "feature")
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
                         architecture=_architecture(model))
    options = norm["options"]
    report: dict[str, dict] = {}
    by_block: dict[int, list[tuple[str, str, dict]]] = {}
    for key, entry in norm["layers"].items():
        block, linear = parse_layer_key(key, spec, len(blocks))
        by_block.setdefault(block, []).append((key, linear, entry))
    for block, entries in by_block.items():
        methods = {e["method"] for _, _, e in entries}
        eigen = _block(eigen_blocks, block, "eigen") if "feature" in methods else None
        features = _block(feature_blocks, block, "feature") if methods & set(FEATURE_METHODS) else None
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
                    replace_module(model, path, LowRankLinear.from_factors(factors))
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


def _no_init():
    """transformers' context that skips random initialisation (every weight is loaded afterwards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def save_compressed(model: nn.Module, plan: Mapping, out_dir: str | os.PathLike, tokenizer=None,
                    factors: Mapping | None = None) -> Path:
    """Write `out_dir` atomically: compressed.safetensors (state dict; a tied tensor once), plan.json
    (normalised against the model), config.json, generation_config.json and the tokenizer if given.
    `factors`: the provenance of the factor caches used (apply_cached_plan's), recorded in the metadata."""
    spec = get_arch(architecture_of(model.config))
    norm = validate_plan(plan, spec, len(blocks_of(model, spec)), linear_shapes(model, spec))
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            tied[name] = seen[ident]
        else:
            seen[ident] = name
            tensors[name] = t
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ConfigError(f"model holds floating tensors of several dtypes {sorted(dtypes)}; cast it to one first")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_tensors(Path(tmp) / WEIGHTS_FILE, tensors,
                     {"format": FORMAT, "tied": tied, "dtype": dtypes.pop(), "model": norm.get("model"),
                      "factors": dict(factors or {}),
                      **stamp(norm.get("model_digest"),
                              next((v["calibration_digest"] for v in (factors or {}).values()
                                    if v.get("calibration_digest")), None),
                              {"options": norm.get("options")})})
        write_json(Path(tmp) / PLAN_FILE, norm)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_compressed(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_compressed`: architecture from config.json, LowRankLinear
    modules shaped by plan.json and the saved factors, then the weights. Returns (model in eval mode,
    plan). Its logits equal those of the model that was saved, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    plan = read_json(out_dir / PLAN_FILE)
    tensors, meta = load_tensors(out_dir / WEIGHTS_FILE)
    if meta.get("format") != FORMAT:
        raise DataError(f"{out_dir / WEIGHTS_FILE} is not a compressed model of this format ({meta.get('format')!r})")
    config = AutoConfig.from_pretrained(out_dir)
    spec = get_arch(architecture_of(config))
    dtype = getattr(torch, meta["dtype"])
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # transformers 5 ties inside init_weights, which no_init_weights skips
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
        replace_module(model, path, LowRankLinear(dense.in_features, dense.out_features, entry["rank"],
                                                  f"{path}.second.bias" in tensors, dtype=dtype))
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(meta.get("tied", {}))
    if missing or result.unexpected_keys:
        raise DataError(f"{out_dir}: weights do not fit the architecture (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(result.unexpected_keys)[:3]}); save it again")
    for name, source in meta.get("tied", {}).items():  # tied in the saved model: tied here too
        if model.get_parameter(name) is not model.get_parameter(source):
            raise DataError(f"{out_dir}: {name} was tied to {source} but this config does not tie them")
    return model.to(device).eval(), norm


# ---------------------------------------------------------------- full-rank factor cache


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
    Any rank r < kappa is then `cut_factors(cache, r)`: the same factors as computing at rank r.
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
        out["mean"] = _stat(eigen, f"{linear}.mean", block, "eigen").to(weight.dtype)
        if bias is not None:
            out["bias"] = bias
    elif factors.bias is not None:
        out["bias"] = factors.bias
    return out


def cut_factors(cache: Mapping[str, torch.Tensor], method: str, rank: int,
                bias_compensation: str = "intended") -> Factors:
    """Factors at `rank` from a full-rank cache entry (`full_rank_factors`) by slicing."""
    if not 1 <= rank <= cache["first"].shape[0]:
        raise ConfigError(f"rank {rank} is not in the cache (1..{cache['first'].shape[0]})")
    first, second = cache["first"][:rank], cache["second"][:, :rank]
    bias = cache.get("bias")
    if method == "feature":
        v = second.double()
        b = None if bias is None else bias.double()
        if bias_compensation == "none":
            new = None if b is None else v @ (v.T @ b)
        else:
            mu = cache["mean"].double()
            new = mu - v @ (v.T @ (mu if b is None else mu - b))
        bias = None if new is None else new.to(first.dtype)
    return Factors(first, second, bias)


def save_factor_cache(
    model: nn.Module,
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
    kappa - 1 for a factor method, so any plan of that method is cut by slicing (`cached_factor_blocks`)."""
    if method not in FACTOR_METHODS:
        raise ConfigError(f"save_factor_cache: {method!r} is not a factor method ({', '.join(FACTOR_METHODS)})")
    all_blocks = blocks_of(model, spec)
    paths = []
    sources: list[tuple[str, dict]] = []  # (file, metadata) of the statistics read, for provenance
    for block in (range(len(all_blocks)) if blocks is None else blocks):
        eigen = _block(eigen_blocks, block, "eigen") if method == "feature" else None
        # whitened and asvd factors read the input statistics; weight-space SVD reads them (when given) only
        # for its layers' spectra (`layer_spectrum`), which the spectral allocation needs
        features = _block(feature_blocks, block, "feature") if method in FEATURE_METHODS or (
            method == "weight" and feature_blocks is not None) else None
        stats = eigen if eigen is not None else features
        if isinstance(stats, BlockFile):
            sources.append((str(stats.path), stats.metadata))
        # every block's statistics from one calibration run (a stale block of an older run is refused)
        calibration = common_value(sources, "calibration_digest", f"{method} statistics")
        tensors = {}
        layers: dict[str, dict] = {}
        for linear in linears:
            layer = model.get_submodule(linear_path(spec, block, linear))
            extra: dict = {}
            with torch.no_grad():
                entry = full_rank_factors(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                          method, eigen=eigen, features=features, linear=linear,
                                          group=spec.group_of(linear), block=block, jitter=jitter, report=extra)
            tensors.update({f"{linear}.{k}": v for k, v in entry.items()})
            if eigen is not None or features is not None:
                tensors.update({f"{linear}.{k}": v for k, v in layer_spectrum(
                    layer.weight.detach(), method, entry, eigen=eigen, features=features, linear=linear,
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
    (E||W x||^2) of one Linear, for the spectral allocation (`sfsd.allocate`). Feature space: the
    output covariance's eigenvalues and their sum; the other methods: `allocate.captured_energy` of
    the cached factors under the input second moment E[x x^T]."""
    from .allocate import captured_energy, output_energy

    if method == "feature":
        values = _stat(eigen, f"{linear}.eigenvalues", block, "eigen").double()
        return {"gain": values[: entry["first"].shape[0]].clone(), "energy": values.sum()}
    moment = _stat(features, f"{group}.xxt", block, "feature").double() / _token_count(features, group, block)
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
    stored, the output mean and the bias, for `cut_factors`."""
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
) -> dict:
    """Like `apply_plan` for a plan of factor methods (and dense entries), cutting every factored
    layer from the factor cache of its method (`<cache_dir>/<method>/block_NNN.safetensors`)."""
    blocks = blocks_of(model, spec)
    norm = validate_plan(plan, spec, len(blocks), linear_shapes(model, spec), model_digest=model_digest,
                         architecture=_architecture(model))
    files: dict[tuple[str, int], BlockFile] = {}  # the current block's files only
    sources: dict[str, list[tuple[str, dict]]] = {}  # method -> (file, metadata) of the cache blocks used
    report = {}
    for key, entry in norm["layers"].items():
        method = entry["method"]
        if method == "dense":
            continue
        if method not in FACTOR_METHODS:
            raise ConfigError(f"layer {key}: {method} is not cached; use apply_plan for laser/vendi")
        block, linear = parse_layer_key(key, spec, len(blocks))
        if (method, block) not in files:
            if any(b != block for _, b in files):
                files.clear()
            files[(method, block)] = BlockFile(Path(cache_dir) / method / block_file(block), model_digest)
            sources.setdefault(method, []).append((str(files[(method, block)].path), files[(method, block)].metadata))
        cache = factor_entry(files[(method, block)], linear)
        layer = model.get_submodule(linear_path(spec, block, linear))
        factors = cut_factors(cache, method, entry["rank"], norm["options"]["bias_compensation"])
        factors = Factors(*(None if t is None else t.to(layer.weight.device, layer.weight.dtype)
                            for t in (factors.first, factors.second, factors.bias)))
        replace_module(model, linear_path(spec, block, linear), LowRankLinear.from_factors(factors))
        report[key] = {"method": method, "rank": entry["rank"]}
    # what the compressed model is made of: one calibration run per method's cache, never a mix
    provenance = {m: {"calibration_digest": common_value(items, "calibration_digest", f"{m} factor cache"),
                      "code_version": items[0][1].get("code_version")} for m, items in sources.items()}
    digests = {m: p["calibration_digest"] for m, p in provenance.items() if p["calibration_digest"] is not None}
    if len(set(digests.values())) > 1:
        raise DataError(f"the factor caches under {cache_dir} come from different calibration data {digests}; "
                        "rerun factor_cache for every method")
    return {"plan": norm, "layers": report, "provenance": provenance}


__all__ = [
    "LowRankLinear",
    "Shapes",
    "apply_cached_plan",
    "apply_plan",
    "cached_statistics",
    "cut_factors",
    "factor_spectrum",
    "factors_for",
    "full_rank_factors",
    "layer_key",
    "layer_spectrum",
    "linear_path",
    "linear_shapes",
    "load_compressed",
    "replace_module",
    "save_compressed",
    "save_factor_cache",
]
