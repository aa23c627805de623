"""Block-streamed stage 1: input statistics of a model that does not fit the device, one block at a time.

The model is built without weights (parameters on the meta device, buffers real); the modules outside
the blocks that the decoder runs before them (the embedding, rotary tables) get their weights from the
checkpoint, the lm_head none. A first pass runs the decoder over every calibration batch with each block
replaced by a stand-in that records the block's own arguments (the hidden states and, per block, the
mask and position tables the decoder hands it: Gemma 2 gives alternate layers other masks), up to the
last block. Then, block by block: its weights are read from the safetensors shards (only its own
tensors), it runs on every batch's hidden states with the statistics hooks of `sfsd.collect` on its
Linears, its outputs replace the hidden states, and its weights are dropped again.

Peak memory: one block's weights, the modules before the blocks, and the hidden states of all calibration
tokens (tokens x hidden, kept on the device: 16k tokens of a 4096-wide model in float32 are 256 MB).
Every block sees exactly the tensors the whole-model pass feeds it, batch by batch in the same order, so
the statistics are bit-identical to `collect.collect_input_moments` on the whole model (tested).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, architecture_of, blocks_of, check_linears
from .errors import DataError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint folder (one file or shards with an index), read by name."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        folder = Path(model_dir)
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                self.files = {name: folder / SINGLE_FILE for name in f.keys()}
        else:
            raise DataError(f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}; block streaming reads safetensors "
                            "checkpoints only (set collection.streamed: false)")
        self.folder = folder

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise DataError(f"{self.folder}: the checkpoint lacks {missing[:3]} (its tensor names differ from the "
                            "model's); set collection.streamed: false to load it whole")
        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.files[n] for n in names}):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    if self.files[name] == path:
                        out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return out


def empty_model(model_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model of `model_dir` with its parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _load_into(module: nn.Module, checkpoint: Checkpoint, prefix: str, names: list[str], dtype: torch.dtype,
               device: torch.device) -> None:
    """Give `module` (whose parameters live at `prefix` in the checkpoint) the checkpoint's weights."""
    tensors = checkpoint.read([prefix + n for n in names], dtype, device)
    module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)


def _meta_parameters(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.is_meta]


class _Done(Exception):
    """Raised by the last block's stand-in: the first pass has what it needs (nothing after the blocks runs)."""


class _Record(nn.Module):
    """Stands in for a block in the first pass: records the block's arguments (and, for the first block,
    its input hidden states). It hands the hidden states on as they came; where a decoder takes the
    first element of a block's output (GPT-J), the next stand-in receives a slice instead, which does not
    matter: only the first block's hidden states are kept, and the last stand-in ends the pass."""

    def __init__(self, calls: list, keep_hidden: bool, last: bool) -> None:
        super().__init__()
        self.calls, self.keep_hidden, self.last = calls, keep_hidden, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls.append((hidden_states if self.keep_hidden else None, args, kwargs))
        if self.last:
            raise _Done
        return hidden_states


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta:
                sub._buffers[name] = buf.to(device)


def streamed_moments(
    model_dir: str | os.PathLike,
    spec: ArchSpec,
    hooks_for: Callable[[int, nn.Module], list],
    batches: list[tuple[torch.Tensor, torch.Tensor, Callable[[], None]]],
    dtype: torch.dtype,
    device: torch.device,
    after_batch: Callable[[int], None] | None = None,
    after_block: Callable[[int], None] | None = None,
    progress: bool = True,
) -> int:
    """Run the blocks of `model_dir` one at a time over `batches` ((input_ids, attention_mask, select) on
    `device`; `select()` is called before a batch runs, so the hooks know which tokens are real).
    `hooks_for(block, module)` registers the statistics hooks on a block and returns their handles;
    `after_batch(batch)` runs after each batch of each block, `after_block(block)` after each block (its
    weights already dropped). Returns the number of blocks."""
    checkpoint = Checkpoint(model_dir)
    model = empty_model(model_dir, dtype)
    check_linears(model, spec, architecture_of(model.config))
    blocks = blocks_of(model, spec)
    originals = list(blocks)
    block_prefix = spec.blocks + "."
    # the modules the decoder runs before the blocks (embedding, norms' weights it may touch): real weights
    outside = [n for n in _meta_parameters(model) if not n.startswith(block_prefix) and not n.startswith(spec.lm_head)]
    _load_into(model, checkpoint, "", outside, dtype, device)
    _buffers_to(model, device)
    decoder = model.get_submodule(spec.decoder)
    calls: list[list] = [[] for _ in originals]
    for i in range(len(originals)):
        blocks[i] = _Record(calls[i], keep_hidden=i == 0, last=i == len(originals) - 1)
    try:
        with torch.inference_mode():
            for ids, mask, _ in batches:
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Done:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    states = [hidden for hidden, _, _ in calls[0]]
    n_tokens = sum(int(mask.sum()) for _, mask, _ in batches)
    bar = tqdm(total=n_tokens * len(originals), unit="tok", unit_scale=True, disable=not progress,
               desc="collect (streamed)")
    for b, block in enumerate(originals):
        _load_into(block, checkpoint, f"{block_prefix}{b}.", _meta_parameters(block), dtype, device)
        handles = hooks_for(b, block)
        try:
            with torch.inference_mode():
                for i, (_, mask, select) in enumerate(batches):
                    select()
                    _, args, kwargs = calls[b][i]
                    out = block(states[i], *args, **kwargs)
                    states[i] = out[0] if isinstance(out, tuple) else out
                    bar.update(int(mask.sum()))
                    if after_batch is not None:
                        after_batch(i)
        finally:
            for h in handles:
                h.remove()
        block.to_empty(device="meta")  # drop its weights
        calls[b] = []
        if after_block is not None:
            after_block(b)
    bar.close()
    return len(originals)
