"""Stage 1: one pass over the calibration tokens, accumulating per block the moments of each
DISTINCT Linear input (4 per Llama block: attention in, o_proj in, MLP in, down_proj in).

Only inputs are hooked; output statistics follow from them (see stats.py). The forward runs the
decoder without the lm_head, whose 49k x 576 (or 32k x 4096) product nobody needs here.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from sfsd.defaults import choices
from sfsd.errors import ConfigError, NumericalError
from sfsd.features.stats import InputMoments, check_finite, choose_staging, staging_bytes
from sfsd.io import atomic_dir, load_tensors, model_digest, save_tensors, write_json
from sfsd.model.loading import check_device_dtype, load_model, model_config, resolve_dtype, run_dtype
from sfsd.model.placement import input_device, placement
from sfsd.model.placement import resolve_device
from sfsd.model.registry import architecture_of, blocks_of, get_arch, groups_for, select_linears
from sfsd.model.spec import ArchSpec
from sfsd.model.stream import host_available, streamed_moments, use_stream
from sfsd.provenance import require, stamp, tokenizer_digest
from sfsd.resources.decide import decide_streamed

log = logging.getLogger(__name__)

STAGING = choices("collection.staging")  # the `collection.staging` setting's values, from the config schema


class _Statistics:
    """The statistics hooks of stage 1: per block and input group, the moments of the real (unpadded)
    tokens of the batch being run (`select` sets which). With `release` (staging "host") every batch is
    reduced into the float64 totals at once and its staging buffers freed (`InputMoments.update`)."""

    def __init__(self, spec: ArchSpec, groups: list[str], n_blocks: int, flush_every: int,
                 release: bool = False) -> None:
        self.spec, self.groups, self.flush_every, self.release = spec, groups, flush_every, release
        self.moments: list[dict[str, InputMoments]] = [{} for _ in range(n_blocks)]
        self.valid: torch.Tensor | None = None  # flat indices of the real tokens of the current batch

    def select(self, mask: torch.Tensor) -> None:
        self.valid = mask.reshape(-1).nonzero().squeeze(1)

    def hooks(self, b: int, block: torch.nn.Module) -> list:
        """Register the hooks on one block (members of a group share the input: hook the first)."""
        self.moments += [{} for _ in range(b + 1 - len(self.moments))]
        def make_hook(group: str):
            def hook(_module, inputs):
                x = inputs[0]  # on the block's device (of a spread model: its GPU)
                x = x.reshape(-1, x.shape[-1]).index_select(0, self.valid.to(x.device))
                acc = self.moments[b].get(group)
                if acc is None:
                    acc = self.moments[b][group] = InputMoments.zeros(x.shape[-1])
                acc.update(x, flush_every=1 if self.release else self.flush_every, release=self.release)

            return hook

        return [block.get_submodule(self.spec.linears[self.spec.input_groups[g][0]]).register_forward_pre_hook(
            make_hook(g)) for g in self.groups]

    def finish_block(self, b: int) -> dict[str, InputMoments]:
        """Block b's final moments (flushed, staging buffers freed, checked finite)."""
        for g, acc in self.moments[b].items():
            acc.flush(release=True)
            check_finite({f"{g}.xxt": acc.xxt, f"{g}.xsum": acc.xsum, f"{g}.xabs": acc.xabs}, f"block {b}")
        return self.moments[b]

    def finish(self) -> list[dict[str, InputMoments]]:
        return [self.finish_block(b) for b in range(len(self.moments))]


def _batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
             device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Longest first, and each batch cut after its last real token: right padding at the end of a causal
    sequence never influences the real tokens, so this only saves work."""
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        out.append((input_ids[rows, :width].to(device), attention_mask[rows, :width].to(device)))
    return out


def resolve_staging(model: torch.nn.Module, spec: ArchSpec, groups: list[str], staging: str) -> str:
    """The `collection.staging` setting decided for a model in memory (logged): device or host as given,
    auto by `stats.choose_staging` on each device that holds blocks (all must fit, else host). Free memory:
    a CUDA device's; on the CPU what the host has left once the float64 totals (8 d^2 + 16 d per input
    and block), which both stagings keep there, are counted."""
    if staging not in STAGING:
        raise ConfigError(f"collection.staging {staging!r} is unknown; use one of {', '.join(STAGING)}")
    if staging != "auto":
        return staging
    blocks = blocks_of(model, spec)
    widths = [blocks[0].get_submodule(spec.linears[spec.input_groups[g][0]]).in_features for g in groups]
    on_device: dict[torch.device, int] = {}
    for block in blocks:
        where = next(block.parameters()).device
        on_device[where] = on_device.get(where, 0) + 1
    chosen = []
    for where, n in on_device.items():
        if where.type == "cuda":
            free = torch.cuda.mem_get_info(where)[0]
        else:
            free = host_available() - len(blocks) * sum(8 * d * d + 16 * d for d in widths)
        chosen.append(choose_staging(n, widths, free))
        log.info("staging %d block(s) on %s takes %.3g GB; %.3g GB free there", n, where,
                 n * staging_bytes(widths) / 1e9, free / 1e9)
    mode = "device" if all(c == "device" for c in chosen) else "host"
    log.info("staging: %s (collection.staging: auto)", mode)
    return mode


def collect_input_moments(
    model: torch.nn.Module,
    spec: ArchSpec,
    groups: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    flush_every: int = 1,
    progress: bool = True,
    staging: str = "auto",
) -> list[dict[str, InputMoments]]:
    """Moments of the inputs of `groups` in every block, over the unpadded tokens only.

    `staging` (`resolve_staging`): "device" keeps every block's float32 staging buffers on the device for
    the whole pass, reduced into float64 every `flush_every` batches; "host" reduces every batch into the
    float64 totals (on the CPU) at once and frees its buffers, so at most one input's are held. With
    `flush_every` 1 both do the same arithmetic (bit-identical statistics); above 1, host skips the
    float32 sum over batches (a difference within float32 round-off of those sums); auto decides.

    NaN/Inf inputs (float16 overflow, corrupt weights) stop the pass at the first float64 flush that
    holds them, naming the block, the input group and the batch: a 7B run fails in seconds, not hours."""
    device = input_device(model)
    blocks = blocks_of(model, spec)
    release = resolve_staging(model, spec, groups, staging) == "host"
    stats = _Statistics(spec, groups, len(blocks), flush_every, release)
    handles = [h for b, block in enumerate(blocks) for h in stats.hooks(b, block)]
    decoder = model.get_submodule(spec.decoder)
    try:
        with torch.inference_mode(), tqdm(total=int(attention_mask.sum()), unit="tok", unit_scale=True,
                                         disable=not progress, desc="collect") as bar:
            for batch, (ids, mask) in enumerate(_batches(input_ids, attention_mask, batch_size, device)):
                stats.select(mask)
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                bar.update(int(mask.sum()))
                if release or (batch + 1) % flush_every == 0:  # just flushed: the float64 sums are on the CPU
                    _check_batch(stats.moments, spec, batch, batch_size, next(model.parameters()).dtype)
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():  # the sums were made there: the last flush adds to them in place
        return stats.finish()


def collect_streamed(
    model_dir: str | os.PathLike,
    spec: ArchSpec,
    groups: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    flush_every: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    on_block: Callable[[int, dict[str, InputMoments]], None] | None = None,
    progress: bool = True,
    hidden_bytes: tuple[float, float] | None = None,
    staging: str = "auto",
) -> int | list[dict[str, InputMoments]]:
    """`collect_input_moments` with one block in memory at a time (`sfsd.model.stream`): the same batches, the
    same hooks, bit-identical moments. With `on_block(b, moments)` each block's moments are handed over
    (and dropped here) as soon as its block is done, and the number of blocks is returned; without it,
    the moments of every block. `hidden_bytes`: where the hidden states between blocks may live
    (`stream.streamed_moments`). Only the current block's staging buffers exist here, so `staging` auto
    is device; host is honoured (each batch reduced at once, as in `collect_input_moments`)."""
    release = _streamed_staging(staging) == "host"
    batches = _batches(input_ids, attention_mask, batch_size, device)
    stats = _Statistics(spec, groups, 0, flush_every, release)  # grows as the blocks come
    kept: list[dict[str, InputMoments]] = []

    def checked(batch: int) -> None:
        if release or (batch + 1) % flush_every == 0:
            _check_batch(stats.moments, spec, batch, batch_size, dtype)

    def done(b: int) -> None:
        with torch.inference_mode():  # the sums were made there: the last flush adds to them in place
            moments = stats.finish_block(b)
        if on_block is None:
            kept.append(moments)
        else:
            on_block(b, moments)
        stats.moments[b] = {}

    n_blocks = streamed_moments(model_dir, spec, stats.hooks,
                                [(ids, mask, lambda mask=mask: stats.select(mask)) for ids, mask in batches],
                                dtype, device, after_batch=checked, after_block=done, progress=progress,
                                hidden_bytes=hidden_bytes)
    return n_blocks if on_block is not None else kept


def _streamed_staging(staging: str) -> str:
    """The `collection.staging` setting of a streamed pass: host as given, else device (one block's buffers)."""
    if staging not in STAGING:
        raise ConfigError(f"collection.staging {staging!r} is unknown; use one of {', '.join(STAGING)}")
    return "host" if staging == "host" else "device"


def _check_batch(moments: list[dict[str, InputMoments]], spec: ArchSpec, batch: int, batch_size: int,
                 dtype: torch.dtype) -> None:
    """NumericalError naming the first block/group whose running input sum went NaN/Inf (a NaN or Inf
    anywhere in a batch's inputs reaches the sum), with the likely cause."""
    for b, per_block in enumerate(moments):
        for g, acc in per_block.items():
            if torch.isfinite(acc.xsum).all():
                continue
            kind = "NaN" if torch.isnan(acc.xsum).any() else "Inf"
            cause = ("collection.dtype float16 overflowed (max 65504): collect in bfloat16 or float32"
                     if dtype == torch.float16 else
                     "the model's weights or the calibration tokens are corrupt (check the checkpoint)")
            raise NumericalError(
                f"block {b} {g} (input of {', '.join(spec.input_groups[g])}): {kind} activations in calibration "
                f"batch {batch} (sequences {batch * batch_size}..{(batch + 1) * batch_size - 1}, longest first); {cause}")


def run_collect(
    model_dir: str | os.PathLike,
    tokens_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_name: str,
    layers: list[str],
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    flush_every: int = 1,
    streamed: str = "auto",
    staging: str = "auto",
) -> dict:
    """Load model and tokens, collect, write block_XXX.safetensors files and manifest.json. `dtype`: the
    model's dtype (`loading.run_dtype`: auto = the checkpoint's own; the statistics are float64 sums
    regardless). `streamed`: always / never run the model one block at a time (`sfsd.model.stream`), or
    auto: the resource planner's mode on the memory free now (`sfsd.resources.decide.decide_streamed`:
    weights, staging, statistics and activations against one block and the calibration hidden states); the
    statistics are the same either way. `staging`: where the float32 staging buffers live
    (`collect_input_moments`; auto: `resolve_staging`), recorded in the manifest as decided."""
    digest = model_digest(model_dir)  # refuses a truncated checkpoint before the (long) load
    config = model_config(model_dir)
    arch = architecture_of(config)
    spec = get_arch(arch)
    torch_device = resolve_device(device)
    dtype = run_dtype(config, dtype)  # the name the files record: float32, bfloat16 or float16
    check_device_dtype(dtype, torch_device)
    stream = use_stream(decide_streamed("collect_features", model_dir, streamed, dtype=dtype, device=torch_device,
                                        layers=layers, tokens=tokens_path, batch_size=batch_size, staging=staging))
    model = None if stream else load_model(model_dir, dtype=dtype, device=device)[0]
    linears = select_linears(spec, layers)
    groups = groups_for(spec, linears)
    staged = _streamed_staging(staging) if stream else resolve_staging(model, spec, groups, staging)
    if batch_size < 1:
        raise ConfigError(f"collection.batch_size must be >= 1, got {batch_size}")
    tokens, tok_meta = load_tensors(tokens_path, ["input_ids", "attention_mask"])
    # tokens of another tokenizer would index other embeddings: silently wrong statistics
    require(tokens_path, tok_meta, "tokenize_calibration", tokenizer_digest=tokenizer_digest(model_dir))
    seq_len = tokens["input_ids"].shape[1]
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"calibration.seq_len {seq_len} exceeds the model's context of {max_pos} tokens")
    device_used = str(torch_device) if stream else placement(model)
    log.info("collecting %s inputs on %s (%s)", groups, device_used, dtype)
    n_tokens = int(tokens["attention_mask"].sum())
    settings = {"layers": list(layers), "dtype": dtype, "device": device, "batch_size": batch_size,
                "flush_every": flush_every, "staging": staging}
    common = {
        "model": model_name,
        "architecture": arch,
        "tokens": n_tokens,
        "dtype": dtype,
        **stamp(digest, tok_meta.get("digest"), settings, tokenizer_digest=tok_meta.get("tokenizer_digest")),
    }
    with atomic_dir(out_dir) as tmp:
        def write_block(b: int, per_block: dict[str, InputMoments]) -> None:
            tensors = {}
            for g, acc in per_block.items():
                tensors[f"{g}.xxt"] = acc.xxt
                tensors[f"{g}.xsum"] = acc.xsum
                tensors[f"{g}.xabs"] = acc.xabs
                tensors[f"{g}.count"] = torch.tensor(acc.count, dtype=torch.int64)
            save_tensors(Path(tmp) / block_file(b), tensors, {**common, "block": b, "groups": groups})

        started = time.perf_counter()
        if stream:  # each block's statistics are written, and dropped, as soon as its block is done
            n_blocks = collect_streamed(model_dir, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                        batch_size, flush_every, resolve_dtype(dtype), torch_device,
                                        on_block=write_block, staging=staged)
        else:
            moments = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                            batch_size, flush_every, staging=staged)
            for b, per_block in enumerate(moments):
                write_block(b, per_block)
            n_blocks = len(moments)
        seconds = time.perf_counter() - started
        manifest = {
            **common,
            "n_blocks": n_blocks,
            "groups": {g: list(spec.input_groups[g]) for g in groups},
            "linears": linears,
            "device": device_used,
            "streamed": stream,
            "staging": staged,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(n_tokens / seconds, 1),
        }
        write_json(Path(tmp) / "manifest.json", manifest)
    log.info("collected %d tokens in %.1f s (%.0f tok/s)", n_tokens, seconds, n_tokens / seconds)
    return manifest


def block_file(block: int) -> str:
    return f"block_{block:03d}.safetensors"


def load_block_moments(path: str | os.PathLike) -> tuple[dict[str, InputMoments], dict]:
    """The moments of a block file; `xabs` is None in files collected before it was saved."""
    tensors, meta = load_tensors(path)
    out = {}
    for g in meta.get("groups", []):
        out[g] = InputMoments(tensors[f"{g}.xxt"], tensors[f"{g}.xsum"], int(tensors[f"{g}.count"]),
                              tensors.get(f"{g}.xabs"))
        check_finite({k: tensors[k] for k in (f"{g}.xxt", f"{g}.xsum", f"{g}.xabs") if k in tensors}, f"{path}")
    return out, meta
