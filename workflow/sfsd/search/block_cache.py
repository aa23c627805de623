"""The rank search's block-input cache and block-forward counter (`BlockCache`).

Going top-down, the blocks below the layer being searched are still the original ones, so the hidden
states entering its block are the same for every candidate: they are recorded once per block and every
candidate then runs only that block, the blocks above and the head. Work is counted in block forwards
(sequences x transformer blocks run), a deterministic counter.

The recorded inputs never take more than `max_bytes`: each batch's is sized (its shape times its dtype's
bytes) before it is copied, and a block whose inputs would pass the bound keeps none of them and is run
with full forwards, as are the blocks after it (every block's inputs have the shapes of the first's).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from sfsd.model.registry import blocks_of
from sfsd.model.spec import ArchSpec

log = logging.getLogger(__name__)


class _Skip(nn.Module):
    """Stands in for a block a pass need not run: hands its input on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Capture(_Skip):
    """Stands in for the block whose input is being recorded: stores it under the current batch."""

    def __init__(self, owner: BlockCache) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.owner._store(hidden_states)
        return hidden_states


def _batch_key(input_ids: torch.Tensor) -> tuple:
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    return tuple(ids.shape), hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).hexdigest()


class BlockCache:
    """Counts block forwards and, when asked, feeds recorded block inputs instead of running the blocks
    below. Batches are recognised by their token ids (the embedding's input), so any scorer that runs
    the same batches again (the native scorer and perplexity do: fixed order and batch size) is fed the
    states recorded for exactly those batches. `held`: the bytes of the recorded inputs (at most
    `max_bytes`); `exceeded`: a record did not fit, so one of the same batches would not either."""

    def __init__(self, model: nn.Module, spec: ArchSpec, max_bytes: float = float("inf")) -> None:
        self.blocks = blocks_of(model, spec)
        self.originals = list(self.blocks)
        self.max_bytes = max_bytes
        self.forwards: Counter = Counter()
        self.phase = "search"
        self.batch_key: tuple | None = None
        self.block: int | None = None  # block whose inputs are recorded, None = full forwards
        self.states: dict[tuple, torch.Tensor] = {}
        self.held = 0  # bytes of self.states
        self.needed = 0  # bytes the current record's inputs take (held, or more once past max_bytes)
        self.exceeded = False
        self.peak_bytes = 0
        self._hooks = [b.register_forward_pre_hook(self._count, with_kwargs=True) for b in self.originals]
        self._hooks.append(model.get_input_embeddings().register_forward_pre_hook(self._remember))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.states, self.held = {}, 0

    def _store(self, hidden: torch.Tensor) -> None:
        """Keep the current batch's block input, unless it would take the held bytes past max_bytes: then
        drop every input of this record and keep none of the rest (its size known before any copy)."""
        size = hidden.numel() * hidden.element_size()
        old = self.states.pop(self.batch_key, None)
        if old is not None:  # the same batch run again within one record
            self.held -= old.numel() * old.element_size()
            self.needed -= old.numel() * old.element_size()
        self.needed += size
        if self.needed > self.max_bytes:
            self.states, self.held = {}, 0
            return
        self.states[self.batch_key] = hidden.detach().clone()
        self.held += size

    def _count(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.forwards[self.phase] += int(hidden.shape[0])

    def _remember(self, module, args) -> None:
        self.batch_key = _batch_key(args[0])

    @contextlib.contextmanager
    def counting(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @contextlib.contextmanager
    def _replaced(self, replacements: Mapping[int, nn.Module]) -> Iterator[None]:
        for i, module in replacements.items():
            self.blocks[i] = module
        try:
            yield
        finally:
            for i in replacements:
                self.blocks[i] = self.originals[i]

    def record(self, block: int, run: Callable[[], object], *, complete: bool = False, phase: str = "inputs"):
        """Record the inputs of `block` for every batch `run()` makes, running only the blocks below it;
        complete=True runs the whole model and returns run()'s result (the baseline pass records the top
        block's inputs for free). Inputs that would take more than max_bytes are not kept (`_store`):
        later forwards are then full (logged, and `exceeded` set)."""
        self.states, self.held, self.needed, self.block = {}, 0, 0, None
        if complete:
            def capture(module, args, kwargs) -> None:
                self._store(args[0] if args else kwargs["hidden_states"])

            handle = self.originals[block].register_forward_pre_hook(capture, with_kwargs=True)
            try:
                with self.counting(phase), torch.no_grad():
                    result = run()
            finally:
                handle.remove()
        else:
            skip = {i: _Skip() for i in range(block + 1, len(self.blocks))}
            with self.counting(phase), self._replaced({block: _Capture(self), **skip}), torch.no_grad():
                result = run()
        if self.needed > self.max_bytes:
            log.warning("block %d inputs need %.1f MB > cache bound %.1f MB: full forwards from here",
                        block, self.needed / 2**20, self.max_bytes / 2**20)
            self.exceeded = True
        else:
            self.peak_bytes = max(self.peak_bytes, self.held)
            self.block = block
        return result

    def _feed(self, module, args, kwargs):
        try:
            hidden = self.states[self.batch_key]
        except KeyError:
            raise RuntimeError("a batch that was not recorded reached the cached block: the scorer must run the "
                               "same batches on every call") from None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Inside: forwards start at the recorded block from its recorded inputs (no-op without one)."""
        if self.block is None:
            yield
            return
        handle = self.originals[self.block].register_forward_pre_hook(self._feed, with_kwargs=True)
        try:
            with self._replaced({i: _Skip() for i in range(self.block)}):
                yield
        finally:
            handle.remove()


__all__ = ["BlockCache"]
