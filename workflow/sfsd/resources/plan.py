"""The planner applied to a workflow config: which stages run for a model and how many jobs each has, the
settings and the machine the formulas read, the plan of every stage, and the checks before a run.

- `model_size_of(config, name, root)`: a model's shapes from its folder (a local model, or one prepared
  under results/models/), else a Llama-shaped model of `params_b` (`needs.llama_like`), else None.
- `settings_of(config, size, model_config)`, `machine_of(config, root, ...)`: what the formulas read.
- `plan_config(config, name, root, machine)`: {stage: the StageNeed of its chosen mode} (the factor cache
  and the loss criterion per method, `factor_cache:<method>`, `loss_spectra:<method>`), what
  rules/common.smk sizes every job from.
- `check_fit(config, root, machine)`: a ConfigError naming the stage, its need and the fix when a stage of
  a model whose shapes are known fits in no mode, or when results/ lacks the disk the stages still to run
  write; a model not downloaded yet is skipped with a log line.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from sfsd.errors import ConfigError
from sfsd.resources.modes import every_mode, plan_stage
from sfsd.resources.needs import (DTYPE_BYTES, MAX_GPUS, SAVE_DTYPE_BYTES, TASK_TOKENS, Machine, ModelSize, Settings,
                                  StageNeed, llama_like)
from sfsd.resources.read import config_size, disk_free, gpus_here, model_size

log = logging.getLogger(__name__)

PREPARED = Path("results") / "models"


def model_folder(config: Mapping, name: str, root: str | Path = ".") -> Path:
    m = config["models"][name]
    return Path(root) / (m["path"] if m["source"] == "local" else PREPARED / name)


def model_size_of(config: Mapping, name: str, root: str | Path = ".") -> tuple[ModelSize | None, str]:
    """(the model's shapes, where they come from: "shapes" of its folder or, for an embedded model not
    converted yet, of its GGUF file's config; "params_b" (a Llama-shaped model of that many parameters), or
    None when neither is known)."""
    folder, m = model_folder(config, name, root), config["models"][name]
    if (folder / "config.json").is_file():
        return model_size(folder, list(config["layers"])), "shapes"
    if m["source"] == "embedded":  # its shapes are in the package's GGUF file before it is converted
        from sfsd.model.loading import embedded_config

        return config_size(embedded_config(m["id"]), list(config["layers"])), "shapes"
    if m.get("params_b"):
        return llama_like(m["params_b"], 2 if m["source"] == "hub" else 4), "params_b"
    return None, "unknown"


def _model_config(config: Mapping, name: str, root: str | Path) -> dict | None:
    path = model_folder(config, name, root) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _itemsize(setting: str, model_config: Mapping | None, source: str) -> int:
    """Bytes per element of a dtype setting; auto is the checkpoint's own (`loading.run_dtype`), and for a
    model not on disk yet float32 (embedded) or bfloat16 (hub: most checkpoints are stored so)."""
    from sfsd.model.loading import run_dtype

    if setting == "auto":
        if model_config is None:
            return 4 if source == "embedded" else 2
        setting = run_dtype(model_config, "auto")
    return DTYPE_BYTES[setting]


def gradient_fallback(setting: str, model_config: Mapping | None, source: str) -> str | None:
    """gradients.dtype auto: the checkpoint's own dtype where it is a half one (tried where float32 does not
    fit; a model not on disk yet: as `_itemsize` assumes, bfloat16 for a hub model), else None."""
    from sfsd.model.loading import run_dtype

    if setting != "auto":
        return None
    own = run_dtype(model_config, "auto") if model_config is not None else (
        "float32" if source == "embedded" else "bfloat16")
    return own if DTYPE_BYTES[own] < 4 else None


def variants(config: Mapping) -> dict[str, list[tuple[str, float]]]:
    """The variants a config makes of each model, with the fraction of the parameters each keeps (1.0 for a
    searched model cut at no budget: an upper bound): "budget" (every method, allocation and budget, and
    the searches cut at each budget), "evaluated" and "written" (the compressed folders), as
    rules/common.smk names them."""
    comp, search, evaluation = config["compression"], config["search"], config["evaluation"]
    budgets = comp["budgets"]
    searches = [f"{m}-{mode}-{t}" for m in search["methods"] for mode in search["modes"]
                for t in search["targets"][mode]] if search["enabled"] else []
    budget = [(f"{m}-{b}" if a == "uniform" else f"{m}-{a}-{b}", f) for b, f in budgets.items()
              for m in comp["methods"] for a in comp["allocations"]]
    if searches and search["budgets"]:
        budget += [(f"search-{s}-{b}", f) for s in searches for b, f in budgets.items()]
    evaluated = []
    if evaluation["enabled"] and evaluation["compressed"]:
        evaluated = budget + ([(f"search-{s}", 1.0) for s in searches] if search["evaluate"] else [])
    written = dict(evaluated)
    if comp["save_models"]:
        written.update(budget)
    return {"budget": budget, "evaluated": evaluated, "written": sorted(written.items()), "searches": searches}


def _model_fraction(size: ModelSize, fraction: float, convention: str) -> float:
    """A budget as a fraction of all the model's parameters (decoder_linear budgets count the decoder's
    Linear layers only: the rest stays whole)."""
    if convention != "decoder_linear":
        return fraction
    linear = size.n_blocks * sum(o * i for _, o, i in size.linears)
    return 1 - (1 - fraction) * linear / size.total_params


def settings_of(config: Mapping, size: ModelSize, model_config: Mapping | None, source: str,
                written: list[float] | None = None, searched: int = 0) -> Settings:
    """The planner's settings of a validated config (defaults filled) for one model (`written`: the fraction
    each budget variant's folder keeps; `searched`: the searched folders written)."""
    cal, col, ev, search, speed = (config[k] for k in ("calibration", "collection", "evaluation", "search", "speed"))
    dtype = config["dtype"]
    collect_dtype = col["dtype"] if col["dtype"] != "auto" else dtype
    window = ev["perplexity"]["window"] if ev["perplexity"]["source"] != "none" else 0
    return Settings(
        itemsize=_itemsize(dtype, model_config, source),
        collect_itemsize=_itemsize(collect_dtype, model_config, source),
        gpu=config["device"] != "cpu", fixed_device=config["device"].startswith("cuda"),
        streamed=config["streamed"], staging=col["staging"],
        samples=cal["num_samples"], seq_len=cal["seq_len"], collect_batch=col["batch_size"],
        eigen_itemsize=SAVE_DTYPE_BYTES[config["eigen"]["save_dtype"]], eigen_threads=config["eigen"]["threads"],
        methods=tuple(dict.fromkeys([*config["compression"]["methods"],
                                     *(search["methods"] if search["enabled"] else [])])),
        compressed=tuple(_model_fraction(size, f, config["compression"]["convention"]) for f in (written or [])),
        searched=searched,
        eval_batch=ev["batch_size"], eval_context=max(TASK_TOKENS, window), ppl_window=window,
        grad_itemsize=DTYPE_BYTES.get(config["gradients"]["dtype"], 4),
        grad_fallback=gradient_fallback(config["gradients"]["dtype"], model_config, source),
        grad_batch=config["gradients"]["batch_size"],
        grad_full=str(config["gradients"]["full"]).lower(),
        search_batch=search["batch_size"], search_cache_bytes=search["cache_max_mb"] * 1e6 if search["cache"] else 0.0,
        laser_batch=config["laser"]["batch_size"], speed_batch=max(speed["batch_sizes"]),
        speed_tokens=(speed["prompt_tokens"], speed["decode_tokens"]))


def machine_of(config: Mapping, root: str | Path = ".", gpu_gb: float | None = None, host_gb: float | None = None,
               gpus: int | None = None) -> Machine:
    """The machine a run is planned for: GPUs of `gpu_gb` (default gpu_memory_gb) where the GPU stages run
    on one (device not cpu; with auto, where nvidia-smi lists one or `gpu_gb` is given), as many as given,
    else as this machine has, else one of `gpu_gb`, else a node's worth (`MAX_GPUS`: planning on a login
    node); `host_gb` of
    host memory (default host_memory_gb, else what this machine has available now); the free disk of
    results/."""
    from sfsd.model.stream import host_available

    here, _ = gpus_here()
    device = config["device"]
    on_gpu = device != "cpu" and (device != "auto" or here > 0 or gpu_gb is not None)
    gpu_bytes = (gpu_gb or config["gpu_memory_gb"]) * 1e9 if on_gpu else None
    host = (host_gb or config.get("host_memory_gb") or host_available() / 1e9) * 1e9
    gpus = gpus or here or (1 if gpu_gb is not None else MAX_GPUS)
    return Machine(gpu_bytes, gpus, host, disk_free(Path(root) / "results"))


def stage_jobs(config: Mapping, name: str, every: bool = False) -> dict[str, dict]:
    """The stages that run for model `name`: {stage (the factor cache and the loss criterion as
    factor_cache:<method>, loss_spectra:<method>): keywords of `modes.plan_stage` (method, source, jobs)};
    with `every`, also those the config switches off (a rule's resources are sized whether it runs or not:
    the loss criterion then of every method with a factor cache)."""
    m, ev, made = config["models"][name], config["evaluation"], variants(config)
    out: dict[str, dict] = {}
    if m["source"] != "local":
        out["prepare_model"] = {"source": m["source"]}
    out["collect_features"] = {}
    # the loss allocation's shots after the first each take a gradient pass and a loss criterion (per budget
    # and method; rules/loss_shots.smk)
    extra = (config["compression"]["loss_shots"] - 1) * len(config["compression"]["budgets"])
    if "loss" in config["compression"]["allocations"] or every:  # read by the loss allocation only
        out["collect_gradients"] = {"jobs": 1 + extra * len(config["compression"]["methods"])}
    out["eigendecompose"] = {}
    methods = dict.fromkeys([*config["compression"]["methods"],
                             *(config["search"]["methods"] if config["search"]["enabled"] else [])])
    out.update({f"factor_cache:{method}": {"method": method} for method in methods})
    if "loss" in config["compression"]["allocations"] or every:  # the loss plans of compression.methods
        loss_methods = methods if every else config["compression"]["methods"]
        out.update({f"loss_spectra:{method}": {"method": method, "jobs": 1 + extra} for method in loss_methods})
    searched = _searched_written(made)
    if len(made["written"]) > len(searched) or every:
        out["compress_model"] = {}
    if searched or every:
        out["compress_searched"] = {}
    if ev["enabled"] or every:
        out["evaluate_model"] = {"jobs": 1 + len(made["evaluated"])}
        if ev["scorer"] == "native" and ev["check_docs"] or every:
            out["check_scorer"] = {"jobs": min(2, 1 + len(made["evaluated"]))}
    if made["searches"] or every:
        out["search"] = {"jobs": max(1, len(made["searches"]))}
    laser = config["laser"]
    if laser["enabled"] and (laser["models"] is None or name in laser["models"]) or every:
        out["laser_point"] = {}
    if config["speed"]["enabled"] or every:
        allocations = [a for a in config["speed"]["allocations"] if a in config["compression"]["allocations"]]
        out["inference_speed"] = {"jobs": 1 + len(config["compression"]["budgets"]) * len(
            config["compression"]["methods"]) * len(allocations)}
    return out


def _searched_written(made: Mapping) -> list[str]:
    """The searched folders among `variants`' written ones (rule compress_searched; the searches cut at a
    budget are budget variants, compressed by compress_model)."""
    names = {f"search-{s}" for s in made["searches"]}
    return [v for v, _ in made["written"] if v in names]


def _settings(config: Mapping, name: str, root: str | Path, size: ModelSize) -> Settings:
    made = variants(config)
    searched = _searched_written(made)
    written = [f for v, f in made["written"] if v not in searched]
    return settings_of(config, size, _model_config(config, name, root), config["models"][name]["source"], written,
                       len(searched))


def plan_config(config: Mapping, name: str, root: str | Path = ".", machine: Machine | None = None,
                size: ModelSize | None = None, every: bool = False) -> dict[str, StageNeed]:
    """{stage: the StageNeed of its chosen mode on `machine` (default `machine_of`)} for every stage that runs
    for model `name` (`stage_jobs`, `every`); {} when its shapes are unknown and it has no params_b. A stage
    that fits in no mode carries its `fix`."""
    if size is None:
        size, _ = model_size_of(config, name, root)
        if size is None:
            return {}
    machine = machine or machine_of(config, root)
    s = _settings(config, name, root, size)
    return {stage: plan_stage(stage.split(":")[0], size, s, machine, **kw)
            for stage, kw in stage_jobs(config, name, every).items()}


def plan_rows(config: Mapping, name: str, root: str | Path, machine: Machine) -> tuple[str, list]:
    """(a heading, rows (StageNeed, chosen, fits)) of model `name`: every mode of every stage that runs
    (`modes.every_mode`), whether it is the mode the stage runs in, and whether it fits `machine`."""
    size, source = model_size_of(config, name, root)
    if size is None:
        return "shapes unknown (not on disk, no params_b): skipped", []
    heading = f"{size.total_params / 1e9:.2f} B parameters, checkpoint {size.stored_bytes / 1e9:.1f} GB"
    if source == "params_b":
        heading += " (not on disk: a Llama-shaped model of params_b)"
    s, rows = _settings(config, name, root, size), []
    for stage, kw in stage_jobs(config, name).items():
        kind = stage.split(":")[0]
        chosen = plan_stage(kind, size, s, machine, **kw)
        for need in every_mode(kind, size, s, machine, **kw):
            same = need.mode == chosen.mode
            rows.append((chosen if same else need, same, need.fits(machine)))
    return heading, rows


def _output(stage: str, name: str) -> Path:
    """Where a stage's outputs for model `name` go (their existence means nothing is left to write)."""
    kind, _, method = stage.partition(":")
    return {"prepare_model": PREPARED / name, "collect_features": Path("results") / name / "features",
            "collect_gradients": Path("results") / name / "gradients",
            "eigendecompose": Path("results") / name / "eigen" / "summary.json",
            "factor_cache": Path("results") / name / "factors" / method,
            "loss_spectra": Path("results") / name / "loss" / method,
            "compress_model": Path("results") / name / "compressed",
            "compress_searched": Path("results") / name / "compressed"}.get(kind, Path("results") / name / kind)


def _left_to_write(config: Mapping, name: str, root: Path, stage: str, size: ModelSize) -> float:
    """The share of a stage's disk still to be written: 0 where its output exists; of the compressed
    folders, those not written yet (each in proportion to the parameters it keeps)."""
    if stage not in ("compress_model", "compress_searched"):
        return 0.0 if (root / _output(stage, name)).exists() else 1.0
    made = variants(config)
    searched = _searched_written(made)
    kept = {v: _model_fraction(size, f, config["compression"]["convention"]) for v, f in made["written"]
            if (v in searched) == (stage == "compress_searched")}
    missing = sum(f for v, f in kept.items() if not (root / _output(stage, name) / v).exists())
    return missing / sum(kept.values()) if kept else 0.0


def describe(need: StageNeed, machine: Machine) -> str:
    """A need in words, against the machine: '30.1 GB on one 24 GB GPU and 70.2 GB of host memory (23.0 GB)'."""
    parts = []
    if need.gpus:
        gpu = f"{machine.gpu_bytes / 1e9:.0f} GB" if machine.gpu_bytes else "no"
        where = "one" if need.gpus == 1 else f"each of {need.gpus}"
        parts.append(f"{need.device_bytes / 1e9:.1f} GB on {where} {gpu} GPU")
    parts.append(f"{need.host_bytes / 1e9:.1f} GB of host memory ({machine.host_bytes / 1e9:.1f} GB)")
    return " and ".join(parts)


def check_fit(config: Mapping, root: str | Path = ".", machine: Machine | None = None) -> None:
    """One ConfigError line when a stage of a model whose shapes are known fits in no mode on `machine`
    (default `machine_of`): the stage, what it needs and the setting that would make it fit; or when the
    stages still to run write more than results/ has free. Models not on disk yet are skipped (logged)."""
    root = Path(root)
    machine = machine or machine_of(config, root)
    disk_need, biggest = 0.0, ("", 0.0)
    for name in config["models"]:
        size, source = model_size_of(config, name, root)
        if source != "shapes":
            log.warning("resources of model %s are checked once it is downloaded (%s)", name,
                        "planned from params_b meanwhile" if size else "set models.%s.params_b to size its jobs" % name)
            continue
        for stage, need in plan_config(config, name, root, machine, size).items():
            if need.fix is not None:
                raise ConfigError(f"{stage.split(':')[0]} of model {name} fits in no mode: {need.mode} needs "
                                  f"{describe(need, machine)}; set {need.fix}")
            left = need.disk_total * _left_to_write(config, name, root, stage, size)
            disk_need += left
            if left > biggest[1]:
                biggest = (f"{stage.split(':')[0]} of model {name}", left)
    if machine.disk_bytes is not None and disk_need > machine.disk_bytes:
        raise ConfigError(f"results/ has {machine.disk_bytes / 1e9:.1f} GB free, the stages still to run write "
                          f"{disk_need / 1e9:.1f} GB (the most: {biggest[0]}, {biggest[1] / 1e9:.1f} GB); free disk, "
                          "or set compression.save_models: false and fewer compression.methods or budgets")


def job_resources(need: StageNeed, attempt: int = 1) -> dict[str, int]:
    """A job's Snakemake resources from its stage's need: mem_mb (host memory, scaled by the attempt so a
    retry gets more), disk_mb, gpu."""
    return {"mem_mb": math.ceil(need.host_bytes / 1e6) * attempt, "disk_mb": max(1, math.ceil(need.disk_bytes / 1e6)),
            "gpu": need.gpus}


def job_needs(config: Mapping, name: str, root: str | Path = ".", machine: Machine | None = None) -> dict[str, StageNeed]:
    """What rules/common.smk sizes model `name`'s jobs from: `plan_config` of every stage (`every`), its
    shapes from disk, else params_b, else (logged) a 7B Llama-shaped model, as a hub model before its
    download."""
    planned = plan_config(config, name, root, machine, every=True)
    if planned:
        return planned
    log.warning("model %s: no shapes and no params_b; its jobs are sized for a 7B model", name)
    source = config["models"][name]["source"]
    return plan_config(config, name, root, machine, size=llama_like(7.0, 2 if source == "hub" else 4), every=True)
