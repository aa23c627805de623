"""`streamed: auto` decided where a stage runs: by the planner's own formulas (`modes.plan_stage`), against
the memory free there now. Stage 1 counts the weights, the staging sums, the float64 totals and one
batch's activations (whole) against the hidden states of the calibration tokens and one block (streamed);
the factor cache and compression count the weights and one block's statistics and factors against host
memory. `always` and `never` are kept as they are.
"""

from __future__ import annotations

import logging
import os

import torch

from sfsd.model.stream import STREAMED, host_available
from sfsd.errors import ConfigError
from sfsd.resources.modes import plan_stage
from sfsd.resources.needs import DTYPE_BYTES, Machine, Settings, StageNeed
from sfsd.resources.read import model_size, tokens_shape

log = logging.getLogger(__name__)


def machine_now(device: torch.device) -> Machine:
    """This machine as a stage sees it now: the free memory of a CUDA `device` (one GPU), and the host
    memory available to this process (`stream.host_available`: a cgroup limit included)."""
    gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return Machine(gpu, 1 if gpu is not None else 0, host_available())


def decide_streamed(stage: str, model_dir: str | os.PathLike, streamed: str, *, dtype: str, device: torch.device,
                    layers: list[str] | None = None, tokens: str | os.PathLike | None = None, batch_size: int = 8,
                    staging: str = "auto", method: str = "feature", kept: float = 1.0,
                    machine: Machine | None = None) -> str:
    """`always` or `never`: the `streamed` setting of `stage` (collect_features, factor_cache or
    compress_model) for the model of `model_dir` at `dtype` on `device` (`layers`: the decomposed Linear
    layers, default all); auto chooses the planner's mode on
    `machine` (default: as free now, `machine_now`), logged with its numbers; `kept`: the fraction of the
    parameters the folder compress_model writes keeps (its plan's count; 1.0 where unknown)."""
    if streamed not in STREAMED:
        raise ConfigError(f"streamed {streamed!r} is unknown; use one of {', '.join(STREAMED)}")
    if streamed != "auto":
        return streamed
    size = model_size(model_dir, layers)
    samples, seq_len = tokens_shape(tokens) if tokens is not None else (1, 1)
    s = Settings(itemsize=DTYPE_BYTES[dtype], collect_itemsize=DTYPE_BYTES[dtype], gpu=device.type == "cuda",
                 streamed="auto", staging=staging, samples=samples, seq_len=seq_len, collect_batch=batch_size,
                 methods=(method,), compressed=(kept,))
    machine = machine or machine_now(device)
    need = plan_stage(stage, size, s, machine, method=method)
    log.info("%s (streamed: auto): %s, %s%s", stage, need.mode, _numbers(need, machine),
             "" if need.fix is None else f"; it fits in no mode (set {need.fix})")
    return "always" if need.mode.startswith("streamed") else "never"


def decide_gradient_dtype(model_dir: str | os.PathLike, setting: str, *, device: torch.device, layers: list[str],
                          tokens: str | os.PathLike, batch_size: int, full: str = "auto",
                          machine: Machine | None = None) -> str:
    """The dtype of the gradient stage under gradients.dtype `setting`: a dtype as it is; auto the planner's
    mode on `machine` (default: as free now): float32 where the pass fits in it, else the checkpoint's own
    half dtype (`plan.gradient_fallback`), logged with its numbers."""
    from sfsd.model.loading import model_config
    from sfsd.resources.plan import gradient_fallback

    if setting != "auto":
        return setting
    own = gradient_fallback(setting, model_config(model_dir), "local")
    if own is None:  # a float32 checkpoint: nothing smaller to fall back to
        return "float32"
    size = model_size(model_dir, layers)
    samples, seq_len = tokens_shape(tokens)
    s = Settings(itemsize=DTYPE_BYTES[own], collect_itemsize=DTYPE_BYTES[own], gpu=device.type == "cuda",
                 samples=samples, seq_len=seq_len, grad_itemsize=4, grad_fallback=own, grad_batch=batch_size,
                 grad_full=full)
    machine = machine or machine_now(device)
    need = plan_stage("collect_gradients", size, s, machine)
    dtype = need.mode.rsplit(", ", 1)[-1]
    log.info("collect_gradients (gradients.dtype: auto): %s, %s%s", need.mode, _numbers(need, machine),
             "" if need.fix is None else f"; it fits in no mode (set {need.fix})")
    return dtype


def _numbers(need: StageNeed, machine: Machine) -> str:
    device = (f"{need.device_bytes / 1e9:.2f} GB on the GPU ({machine.gpu_bytes / 1e9:.2f} GB free), "
              if need.gpus and machine.gpu_bytes else "")
    return f"{device}{need.host_bytes / 1e9:.2f} GB of host memory ({machine.host_bytes / 1e9:.2f} GB available)"
