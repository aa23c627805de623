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

import torch
from tqdm.auto import tqdm

from .arch import ArchSpec, architecture_of, blocks_of, get_arch, groups_for, select_linears
from .errors import ConfigError, NumericalError
from .io import atomic_dir, load_tensors, model_digest, save_tensors, write_json
from .models import load_model
from .provenance import require, stamp, tokenizer_digest
from .stats import InputMoments, check_finite

log = logging.getLogger(__name__)


def collect_input_moments(
    model: torch.nn.Module,
    spec: ArchSpec,
    groups: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    flush_every: int = 1,
    progress: bool = True,
) -> list[dict[str, InputMoments]]:
    """Moments of the inputs of `groups` in every block, over the unpadded tokens only.

    NaN/Inf inputs (float16 overflow, corrupt weights) stop the pass at the first float64 flush that
    holds them, naming the block, the input group and the batch: a 7B run fails in seconds, not hours."""
    device = next(model.parameters()).device
    blocks = blocks_of(model, spec)
    moments: list[dict[str, InputMoments]] = [{} for _ in blocks]
    current_valid: list[torch.Tensor] = []  # flat indices of real tokens in the batch being run

    def make_hook(block: int, group: str):
        def hook(_module, inputs):
            x = inputs[0]
            x = x.reshape(-1, x.shape[-1]).index_select(0, current_valid[0])
            acc = moments[block].get(group)
            if acc is None:
                acc = moments[block][group] = InputMoments.zeros(x.shape[-1])
            acc.update(x, flush_every=flush_every)

        return hook

    handles = []
    for b, block in enumerate(blocks):
        for g in groups:
            first = spec.input_groups[g][0]  # members share the input: hook one of them
            handles.append(block.get_submodule(spec.linears[first]).register_forward_pre_hook(make_hook(b, g)))
    decoder = model.get_submodule(spec.decoder)
    n_tokens = int(attention_mask.sum())
    try:
        with torch.inference_mode(), tqdm(total=n_tokens, unit="tok", unit_scale=True, disable=not progress,
                                         desc="collect") as bar:
            # Longest first, and each batch cut after its last real token: right padding at the end
            # of a causal sequence never influences the real tokens, so this only saves work.
            lengths = attention_mask.sum(dim=1)
            order = torch.argsort(lengths, descending=True, stable=True)
            for start in range(0, input_ids.shape[0], batch_size):
                rows = order[start : start + batch_size]
                width = int(lengths[rows].max())
                ids = input_ids[rows, :width].to(device)
                mask = attention_mask[rows, :width].to(device)
                current_valid[:] = [mask.reshape(-1).nonzero().squeeze(1)]
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                bar.update(int(mask.sum()))
                batch = start // batch_size
                if (batch + 1) % flush_every == 0:  # just flushed: the float64 sums are on the CPU
                    _check_batch(moments, spec, batch, batch_size, next(model.parameters()).dtype)
    finally:
        for h in handles:
            h.remove()
    for b, per_block in enumerate(moments):
        for g, acc in per_block.items():
            acc.flush()
            check_finite({f"{g}.xxt": acc.xxt, f"{g}.xsum": acc.xsum, f"{g}.xabs": acc.xabs}, f"block {b}")
    return moments


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
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 8,
    flush_every: int = 1,
) -> dict:
    """Load model and tokens, collect, write block_XXX.safetensors files and manifest.json."""
    digest = model_digest(model_dir)  # refuses a truncated checkpoint before the (long) load
    model, _ = load_model(model_dir, dtype=dtype, device=device)
    arch = architecture_of(model.config)
    spec = get_arch(arch)
    linears = select_linears(spec, layers)
    groups = groups_for(spec, linears)
    if batch_size < 1:
        raise ConfigError(f"collection.batch_size must be >= 1, got {batch_size}")
    tokens, tok_meta = load_tensors(tokens_path, ["input_ids", "attention_mask"])
    # tokens of another tokenizer would index other embeddings: silently wrong statistics
    require(tokens_path, tok_meta, "tokenize_calibration", tokenizer_digest=tokenizer_digest(model_dir))
    seq_len = tokens["input_ids"].shape[1]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"calibration.seq_len {seq_len} exceeds the model's context of {max_pos} tokens")
    device_used = str(next(model.parameters()).device)
    log.info("collecting %s inputs of %d blocks on %s (%s)", groups, len(blocks_of(model, spec)), device_used, dtype)
    started = time.perf_counter()
    moments = collect_input_moments(
        model, spec, groups, tokens["input_ids"], tokens["attention_mask"], batch_size, flush_every
    )
    seconds = time.perf_counter() - started
    n_tokens = int(tokens["attention_mask"].sum())
    settings = {"layers": list(layers), "dtype": dtype, "device": device, "batch_size": batch_size,
                "flush_every": flush_every}
    common = {
        "model": model_name,
        "architecture": arch,
        "tokens": n_tokens,
        "dtype": dtype,
        **stamp(digest, tok_meta.get("digest"), settings, tokenizer_digest=tok_meta.get("tokenizer_digest")),
    }
    with atomic_dir(out_dir) as tmp:
        for b, per_block in enumerate(moments):
            tensors = {}
            for g, acc in per_block.items():
                tensors[f"{g}.xxt"] = acc.xxt
                tensors[f"{g}.xsum"] = acc.xsum
                tensors[f"{g}.xabs"] = acc.xabs
                tensors[f"{g}.count"] = torch.tensor(acc.count, dtype=torch.int64)
            save_tensors(Path(tmp) / block_file(b), tensors, {**common, "block": b, "groups": groups})
        manifest = {
            **common,
            "n_blocks": len(moments),
            "groups": {g: list(spec.input_groups[g]) for g in groups},
            "linears": linears,
            "device": device_used,
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
