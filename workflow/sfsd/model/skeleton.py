"""Models built without their weights: every parameter on the meta device, every buffer real.

A stage that loads weights itself (block streaming, a compressed folder) first builds the model's modules
with nothing behind their parameters. accelerate's `init_empty_weights` moves each parameter to the meta
device after its module has made it, so every weight is still allocated once on the way: the memory comes
back, but glibc keeps most of it as address space (allocations under its 32 MiB mmap threshold come from
its heap, which fragments). Building a 2.26B model's skeleton that way left 2.8 GB of address space
behind, and the stage failed under an address-space cap (`ulimit -v`) that its weights alone fit.

`without_weights` makes torch's tensor constructors (`empty`, `zeros`, `ones`, `full`: what nn.Linear,
nn.Embedding and the norms use for their parameters) return meta tensors while the model is built, so no
weight is ever allocated. Buffers that the modules compute by other means (the rotary frequencies from
`torch.arange`, Gemma's embedding scale from `torch.tensor`) stay real. A model whose buffers come out on
the meta device anyway (one that builds a buffer with `torch.zeros`) is built again the allocating way,
which is correct and only costs the address space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

CONSTRUCTORS = ("empty", "zeros", "ones", "full")  # the factories modules make their parameters with

M = TypeVar("M", bound=nn.Module)


def no_init():
    """transformers' context that skips random initialisation (every weight is loaded afterwards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def meta_constructors() -> Iterator[None]:
    """torch.empty/zeros/ones/full make meta tensors inside the context, whatever device is asked for."""
    meta = torch.device("meta")
    saved = {name: getattr(torch, name) for name in CONSTRUCTORS}

    def on_meta(fn):
        def make(*args, **kwargs):
            kwargs["device"] = meta
            return fn(*args, **kwargs)
        return make

    try:
        for name, fn in saved.items():
            setattr(torch, name, on_meta(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def meta_buffers(model: nn.Module) -> list[str]:
    return [name for name, b in model.named_buffers() if b.is_meta]


def without_weights(build: Callable[[], M]) -> M:
    """`build()` (which makes a model and may replace its modules) with every parameter on the meta device,
    never allocated, and every buffer real."""
    from accelerate import init_empty_weights

    # init_empty_weights still catches a parameter made by another factory (torch.randn, a copy)
    with no_init(), init_empty_weights(include_buffers=False), meta_constructors():
        model = build()
    empty = meta_buffers(model)
    if not empty:
        return model
    log.debug("buffers %s were built on the meta device; building the model again with its weights "
              "allocated on the way", empty[:3])
    with no_init(), init_empty_weights(include_buffers=False):
        return build()


__all__ = ["CONSTRUCTORS", "meta_buffers", "meta_constructors", "no_init", "without_weights"]
