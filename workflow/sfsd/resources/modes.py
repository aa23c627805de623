"""Which mode each stage runs in, and what would make a stage fit that fits in none (pure functions).

`candidates(stage, ...)` lists the modes the code can run a stage in under the settings, in the order it
prefers them: stage 1 whole with every block's staging on the device, streamed with one block's staging on
the device, whole with the staging of one input at a time (the float64 totals on the host), streamed so;
the output gradients with the whole G or its diagonal (gradients.full; auto by `gradients_full`, the rule
the stage runs by; never streamed); the loss criterion a block at a time, reading the G that stage chose;
the factor cache and compression whole, then streamed (`streamed: auto`; `always`/`never` keep one); the
GPU stages on as many GPUs as hold the weights (device auto).
`plan_stage` returns the first candidate that the code runs (a mode it refuses carries its `fix` already)
and that fits the machine; when none does, the one that comes closest, with `fix` set to the first change
of `FIXES` (a setting, or GPUs of device auto) under which the same formulas fit.
"""

from __future__ import annotations

from dataclasses import replace

from sfsd.resources.loss_needs import gradients, loss_spectra
from sfsd.resources.needs import (
    MAX_GPUS,
    PROCESS_BYTES,
    STAGING_SHARE,
    CUDA_CONTEXT_BYTES,
    Machine,
    ModelSize,
    Settings,
    StageNeed,
    collect,
    compress,
    eigen,
    factor_cache,
    full_fits,
    gpu_stage,
    prepare,
    staging_bytes,
)

STAGES = ("prepare_model", "collect_features", "collect_gradients", "eigendecompose", "factor_cache",
          "loss_spectra", "compress_model", "compress_searched", "evaluate_model", "check_scorer", "search",
          "laser_point", "inference_speed")

COMPRESS_STAGES = ("compress_model", "compress_searched")  # one formula (`needs.compress`), their own folders
GRADIENTS_UNSTREAMED = "streamed: auto (the gradient pass holds the whole model; its backward is not streamed)"

# the setting that sets each GPU stage's batch (Settings field, config key)
BATCH_KEYS = {"collect_features": ("collect_batch", "collection.batch_size"),
              "collect_gradients": ("grad_batch", "gradients.batch_size"),
              "evaluate_model": ("eval_batch", "evaluation.batch_size"),
              "check_scorer": ("eval_batch", "evaluation.batch_size"),
              "search": ("search_batch", "search.batch_size"),
              "laser_point": ("laser_batch", "laser.batch_size"),
              "inference_speed": ("speed_batch", "speed.batch_sizes")}


def _streamed_options(streamed: str) -> list[bool]:
    return {"always": [True], "never": [False]}.get(streamed, [False, True])


def staging_on_device(size: ModelSize, s: Settings, m: Machine) -> bool:
    """collection.staging auto for the whole-model pass (the rule of features/stats.py choose_staging):
    device when every block's staging takes at most half the device memory left beside the weights."""
    if not (s.gpu and m.gpu_bytes is not None):
        return True  # on the CPU both stagings are host memory; device keeps one buffer per input
    free = m.gpu_bytes - size.total_params * s.collect_itemsize - CUDA_CONTEXT_BYTES
    return size.n_blocks * staging_bytes(size) <= STAGING_SHARE * free


def gradients_full(size: ModelSize, s: Settings, m: Machine) -> bool:
    """Whether the gradient stage keeps the whole G: gradients.full true or false as set; auto by the rule
    the stage runs by (`needs.full_fits`, on the host memory it measures free once the model is loaded),
    here on the memory predicted free then: the host memory less `PROCESS_BYTES`, and less the weights at
    gradients.dtype where the stage runs on the CPU."""
    if s.grad_full != "auto":
        return s.grad_full == "true"
    weights = 0 if s.gpu and m.gpu_bytes is not None else size.total_params * s.grad_itemsize
    return full_fits([o for _, o, _ in size.linears] * size.n_blocks, m.host_bytes - PROCESS_BYTES - weights)


def _repeated(need: StageNeed, jobs: int) -> StageNeed:
    """A stage whose every job writes its own files (the output gradients and loss criterion of each shot of
    the loss allocation, rules/loss_shots.smk): `jobs` times its disk."""
    return replace(need, jobs=jobs, disk_total=need.disk_bytes * jobs)


def candidates(stage: str, size: ModelSize, s: Settings, m: Machine, method: str = "feature",
               source: str = "hub", jobs: int = 1) -> list[StageNeed]:
    """The modes a stage can run in under the settings, in the order the code prefers them."""
    if stage == "prepare_model":
        return [prepare(size, s, source)]
    if stage == "collect_features":
        if s.staging == "auto":
            whole = [(False, "device")] if staging_on_device(size, s, m) else []
            order = whole + [(True, "device"), (False, "host")]
        else:
            order = [(False, s.staging), (True, s.staging)]
        allowed = _streamed_options(s.streamed)
        return [collect(size, s, m, streamed, staging) for streamed, staging in order if streamed in allowed]
    if stage == "collect_gradients":  # gradients.dtype auto: float32, then the checkpoint's half dtype
        options = [s] + ([replace(s, grad_itemsize=2)] if s.grad_fallback and s.grad_itemsize > 2 else [])
        needs = [_repeated(gradients(size, o, m, gradients_full(size, o, m)), jobs) for o in options]
        if s.streamed == "always":  # the backward pass is not streamed: the stage refuses it
            return [replace(n, fix=GRADIENTS_UNSTREAMED) for n in needs]
        return needs
    if stage == "eigendecompose":
        return [eigen(size, s)]
    if stage == "factor_cache":
        return [factor_cache(size, s, streamed, method) for streamed in _streamed_options(s.streamed)]
    if stage == "loss_spectra":  # reads the gradients files, whole G or diagonal as that stage chose
        return [_repeated(loss_spectra(size, s, method, gradients_full(size, s, m)), jobs)]
    if stage in COMPRESS_STAGES:
        return [compress(size, s, streamed, searched=stage == "compress_searched")
                for streamed in _streamed_options(s.streamed)]
    return [gpu_stage(size, s, m, stage, jobs=jobs)]


def every_mode(stage: str, size: ModelSize, s: Settings, m: Machine, **kw) -> list[StageNeed]:
    """Every mode of a stage whatever the settings choose (the table shows them all): stage 1 in its four
    combinations of whole/streamed and device/host staging, the factor cache and compression whole and
    streamed, the output gradients and the loss criterion with the whole G and its diagonal."""
    if stage == "collect_features":
        return [collect(size, s, m, streamed, staging) for staging in ("device", "host") for streamed in (False, True)]
    if stage in ("factor_cache", *COMPRESS_STAGES):
        return candidates(stage, size, replace(s, streamed="auto"), m, **kw)
    if stage == "collect_gradients":
        return [gradients(size, s, m, full) for full in (True, False)]
    if stage == "loss_spectra":
        return [loss_spectra(size, s, kw.get("method", "feature"), full) for full in (True, False)]
    return candidates(stage, size, s, m, **kw)


def _overshoot(need: StageNeed, m: Machine) -> float:
    device = need.device_bytes / m.gpu_bytes if need.gpus and m.gpu_bytes else 0.0
    return max(device, need.host_bytes / m.host_bytes, need.gpus / max(m.gpus, 1))


def _runs(need: StageNeed, m: Machine) -> bool:
    """A mode the code runs (no `fix` preset: the stage does not refuse it) and that fits the machine."""
    return need.fix is None and need.fits(m)


def _first_fitting(stage: str, size: ModelSize, s: Settings, m: Machine, **kw) -> StageNeed | None:
    return next((n for n in candidates(stage, size, s, m, **kw) if _runs(n, m)), None)


def _halvings(value: int) -> list[int]:
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out


def _fixes(stage: str, s: Settings, m: Machine, kw: dict) -> list[tuple[str, Settings, Machine, dict]]:
    """Changes to try, in order: (what to set, the settings and machine with it, the stage's keywords)."""
    out: list[tuple[str, Settings, Machine, dict]] = []
    if stage in ("collect_features", "factor_cache", *COMPRESS_STAGES) and s.streamed == "never":
        out.append(("streamed: always", replace(s, streamed="always"), m, kw))
    if stage == "collect_gradients":
        if s.streamed == "always":
            out.append((GRADIENTS_UNSTREAMED, replace(s, streamed="auto"), m, kw))
        if s.grad_full != "false":
            out.append(("gradients.full: false", replace(s, grad_full="false"), m, kw))
        out += [(f"gradients.batch_size: {b}", replace(s, grad_batch=b), m, kw) for b in _halvings(s.grad_batch)]
        if s.grad_itemsize > 2 and not s.grad_fallback:
            out.append(("gradients.dtype: bfloat16", replace(s, grad_itemsize=2), m, kw))
        return out
    if stage == "loss_spectra":  # one block at a time already: only the diagonal of G holds less
        return [("gradients.full: false", replace(s, grad_full="false"), m, kw)] if s.grad_full != "false" else []
    if stage == "collect_features":
        if s.staging != "host":
            out.append(("collection.staging: host", replace(s, staging="host"), m, kw))
        field, key = BATCH_KEYS[stage]
        out += [(f"{key}: {b}", replace(s, **{field: b}), m, kw) for b in _halvings(getattr(s, field))]
        out += [(f"calibration.num_samples: {n} (less calibration)", replace(s, samples=n), m, kw)
                for n in _halvings(s.samples)]
        if s.collect_itemsize > 2:
            out.append(("collection.dtype: bfloat16", replace(s, collect_itemsize=2), m, kw))
    elif stage in BATCH_KEYS:
        field, key = BATCH_KEYS[stage]
        out += [(f"{key}: {b}", replace(s, **{field: b}), m, kw) for b in _halvings(getattr(s, field))]
        if s.gpu and m.gpu_bytes is not None:
            for n in range(2, MAX_GPUS + 1):
                more = replace(m, gpus=max(m.gpus, n))
                out.append((f"device: auto on a node with {n} GPUs of {m.gpu_bytes / 1e9:g} GB",
                            replace(s, fixed_device=False), more, kw))
        if stage == "search":
            out += [(f"search.cache_max_mb: {mb}", replace(s, search_cache_bytes=mb * 1e6), m, kw)
                    for mb in _halvings(int(s.search_cache_bytes / 1e6))]
    if stage in ("factor_cache", *COMPRESS_STAGES) or stage in BATCH_KEYS and stage != "collect_features":
        if s.itemsize > 2:
            out.append(("dtype: bfloat16", replace(s, itemsize=2), m, kw))
    return out


def plan_stage(stage: str, size: ModelSize, s: Settings, m: Machine, **kw) -> StageNeed:
    """The mode a stage runs in on machine `m`: the first candidate that fits; else the closest, its `fix`
    the first change (`_fixes`) under which a candidate fits, or the memory it would take."""
    options = candidates(stage, size, s, m, **kw)
    if not options:
        raise ValueError(f"{stage}: no mode under streamed {s.streamed!r} and staging {s.staging!r}")
    chosen = next((n for n in options if _runs(n, m)), None)
    if chosen is not None:
        return chosen
    best = min(options, key=lambda n: _overshoot(n, m))
    for what, s2, m2, kw2 in _fixes(stage, s, m, kw):
        if _first_fitting(stage, size, s2, m2, **kw2) is not None:
            return replace(best, fix=what)
    return replace(best, fix=best.fix or shortfall(best, m))


def shortfall(need: StageNeed, m: Machine) -> str:
    """What a need takes beyond the machine, as the fix of last resort."""
    parts = []
    if need.gpus and (m.gpu_bytes is None or need.device_bytes > m.gpu_bytes):
        parts.append(f"a GPU with {need.device_bytes / 1e9:.1f} GB")
    if need.gpus > m.gpus:
        parts.append(f"{need.gpus} GPUs")
    if need.host_bytes > m.host_bytes:
        parts.append(f"{need.host_bytes / 1e9:.1f} GB of host memory")
    return "a machine with " + " and ".join(parts or ["more memory"])

