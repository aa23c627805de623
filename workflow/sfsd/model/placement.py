"""Where a model runs: one device, or, for a model too large for one GPU, all the GPUs of the node.

`device: auto` puts a model on the first GPU when its weights take at most `HEADROOM` of that GPU's free
memory; otherwise, with several GPUs visible, it is spread over all of them by accelerate's device map,
whole blocks per GPU (`device_map_over`, `spread`): each block's hook moves its inputs to its GPU, so the
evaluation, the rank search (its block-input cache included) and LASER run unchanged. The weights are
loaded on the host first, so host memory holds the model once while it is placed.
`gpus_needed` is the same rule as a count, for the resources a job asks a scheduler for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

from sfsd.errors import ConfigError
from sfsd.model.registry import architecture_of, blocks_of, get_arch

log = logging.getLogger(__name__)

def resolve_device(device: str) -> torch.device:
    """'auto' picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but no CUDA device is visible; use device: auto or cpu")
    return torch.device(device)


HEADROOM = 0.8  # of a GPU's free memory for the weights; the rest for activations and the KV cache


def gpus_needed(weight_bytes: float, gpu_bytes: float, headroom: float = HEADROOM) -> int:
    """GPUs of `gpu_bytes` each that hold `weight_bytes` of weights at `headroom` of their memory."""
    if gpu_bytes <= 0:
        raise ConfigError(f"GPU memory must be positive, got {gpu_bytes} bytes")
    return max(1, math.ceil(weight_bytes / (headroom * gpu_bytes)))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied embeddings once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def devices_of(model: nn.Module) -> list[torch.device]:
    """The devices the model's parameters are on (several for a spread model)."""
    return sorted({p.device for p in model.parameters()}, key=str)


def device_map_over(model: nn.Module, max_memory: Mapping[int | str, int]) -> dict[str, int | str]:
    """accelerate's device map of `model` over the devices of `max_memory` (bytes each), never splitting
    a block; a model that does not fit them is a ConfigError naming what it needs."""
    from accelerate import infer_auto_device_map

    block = type(blocks_of(model, get_arch(architecture_of(model.config)))[0]).__name__
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=[block])
    spilled = sorted({str(d) for d in device_map.values() if d not in max_memory})
    if spilled:
        raise ConfigError(f"the model ({weight_bytes(model) / 1e9:.1f} GB) does not fit on the devices "
                          f"{', '.join(map(str, max_memory))} ({sum(max_memory.values()) / 1e9:.1f} GB usable); "
                          "use more GPUs, a smaller dtype, or device: cpu")
    return dict(device_map)


def spread(model: nn.Module, device_map: Mapping[str, int | str]) -> nn.Module:
    """Place `model` by `device_map` (accelerate's hooks move each module's inputs to its device, even
    when every entry is one device: that is how the path is tested on a CPU)."""
    from accelerate import dispatch_model

    model = dispatch_model(model, device_map=dict(device_map), force_hooks=True)
    log.info("model spread over %s", ", ".join(sorted({str(d) for d in device_map.values()})))
    return model


def place_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model` on `device` (a setting: auto, cpu, cuda, cuda:N). auto: the first GPU when the weights fit
    `HEADROOM` of its free memory or it is the only one, else spread over every visible GPU."""
    if str(device) == "auto" and torch.cuda.device_count() > 1:
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        if weight_bytes(model) > HEADROOM * free[0]:
            return spread(model, device_map_over(model, {i: int(HEADROOM * f) for i, f in enumerate(free)}))
    return model.to(resolve_device(str(device)))


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embedding."""
    return model.get_input_embeddings().weight.device


def placement(model: nn.Module) -> str:
    """The model's device, or its devices joined by '+' when it is spread (for result rows and logs)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        names = sorted({str(torch.device("cuda", d) if isinstance(d, int) else torch.device(d))
                        for d in device_map.values()})
        return "+".join(names)
    return str(input_device(model))


__all__ = ["HEADROOM", "device_map_over", "gpus_needed", "input_device", "place_model", "placement", "spread",
           "weight_bytes"]
