"""The workflow's configuration checks: the JSON schema's, and those the schema cannot make alone.

- `validate(config)`: the schema check (first violation as one line), filling in the defaults.
- `config_warnings(config, root)`: what the run will do differently from what was asked (more calibration
  samples than the source holds), one line each, printed before any job.
- `check_config(config, root)`: what needs files, the model's own limits or several keys at once (a
  model folder without config.json, a binary calibration file, a search block range the model does not
  have, a metric lm-eval does not define for a task, a stage that fits the machine in no mode or a disk
  too small for the outputs (`sfsd.resources.plan.check_fit`), ...), as one `ConfigError` line naming
  the key and the fix. The rules call it before any job starts; tests call it directly.

The defaults themselves and the reading of block numbers: `sfsd.defaults`.

Pure functions of a config mapping and a working folder (`root`, where results/ lives); nothing here
writes a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from sfsd.defaults import SCHEMA_PATH, block_range, resolve_completion, schema
from sfsd.errors import ConfigError

TASK_EXPORT = Path("results") / "tasks"  # rules/evaluate.smk's export_tasks output, under the working folder
PREPARED_MODELS = Path("results") / "models"  # rules/models.smk's prepared embedded / hub models


def validate(config: dict) -> None:
    """The schema check: the first violation (its key path and reason) as one ConfigError line; then
    Snakemake's validation, which fills in the schema's defaults in place."""
    import jsonschema
    from snakemake.utils import validate as snakemake_validate

    if "streamed" in (config.get("collection") or {}):
        raise ConfigError("collection.streamed is now the top-level key streamed (it also governs the factor cache "
                          "and compression); move it there")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"{key}: {error.message} (see workflow/schemas/{SCHEMA_PATH.name})")
    snakemake_validate(config, str(SCHEMA_PATH))


def check_config(config: Mapping, root: str | Path = ".", machine=None) -> None:
    """Every check of a validated config (defaults filled) that the schema cannot make alone; the first
    problem raises one ConfigError line. `root` is the working folder (results/ lives under it); `machine`
    (a `sfsd.resources.needs.Machine`) what the resource check plans for (default: this one, with the
    config's gpu_memory_gb and host_memory_gb)."""
    root = Path(root)
    _check_models(config, root)
    _check_calibration(config["calibration"], config["splits"], root)
    _check_model_limits(config, root)
    _check_dtype(config, root)
    _check_search(config)
    _check_metrics(config)
    _check_evaluation(config, root)
    _check_laser(config, root)
    _check_quick(config)
    _check_resources(config, root, machine)


def _model_dir(name: str, model: Mapping, root: Path) -> Path:
    return root / model["path"] if model["source"] == "local" else root / PREPARED_MODELS / name


def _model_config(name: str, model: Mapping, root: Path) -> dict | None:
    """config.json of a model wherever it is readable before any job starts (a local model, or an
    embedded / hub model already prepared under results/models/); None otherwise."""
    path = _model_dir(name, model, root) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_models(config: Mapping, root: Path) -> None:
    from sfsd.model.registry import REGISTRY, SEARCH_ORDER, check_linears, get_arch, select_linears
    from sfsd.errors import SfsdError
    from sfsd.model.loading import EMBEDDED

    for name, m in config["models"].items():
        arch = None
        if m["source"] == "embedded":
            if m.get("id") not in EMBEDDED:
                raise ConfigError(f"models.{name}.id {m.get('id')!r} is not an embedded model; choose one of {sorted(EMBEDDED)}")
            arch = EMBEDDED[m["id"]].architecture
        if m["source"] == "hub" and not m.get("id"):
            raise ConfigError(f"models.{name}.id must name a hub repo (e.g. huggyllama/llama-7b) for source hub")
        if m["source"] == "local":
            folder = root / (m.get("path") or "")
            if not m.get("path") or not (folder / "config.json").is_file():
                raise ConfigError(f"models.{name}.path {m.get('path')!r} is not a model folder with config.json")
            arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["?"])[0]
        if arch is not None:  # hub models are checked once downloaded, by the stages themselves
            try:  # the registry, or inspection of the transformers class (a small probe on the CPU)
                spec = get_arch(arch)
                if m["source"] == "local" and arch not in REGISTRY:  # its own config builds those Linears
                    check_linears(_meta_model(root / m["path"]), spec, arch)
                select_linears(spec, config["layers"])
                order = config["search"]["order"]
                unknown = [n for n in order if n not in spec.linears]
                if unknown and tuple(order) != SEARCH_ORDER:  # the default adapts (sfsd.search.algorithm.search_order)
                    raise ConfigError(f"search.order names {unknown}, not Linear layers of {arch}; "
                                      f"use {', '.join(spec.linears)}")
            except SfsdError as err:
                raise ConfigError(f"models.{name}: {err}") from None


def _meta_model(folder: Path):
    """The model of a folder's config.json on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise ConfigError(f"{folder}/config.json does not build a causal LM: {str(err).splitlines()[0]}") from None


def _check_calibration(cal: Mapping, splits: Mapping, root: Path) -> None:
    if cal["source"] == "hub" and not cal["hub_dataset"]:
        raise ConfigError("calibration.hub_dataset must be set for calibration.source hub")
    if cal["source"] in ("text_file", "jsonl_file"):
        path = root / (cal["path"] or "")
        if not cal["path"] or not path.is_file():
            raise ConfigError(f"calibration.path {cal['path']!r} is not a file (needed by source {cal['source']})")
        if path.stat().st_size == 0:
            raise ConfigError(f"calibration.path {cal['path']!r} is empty; give it some text")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"calibration.path {cal['path']!r} is not UTF-8 text (byte {err.start}); "
                              "give a text or JSONL file") from None
        if cal["source"] == "jsonl_file":
            first = next((line for line in text.splitlines() if line.strip()), "")
            try:
                row = json.loads(first)
            except json.JSONDecodeError:
                raise ConfigError(f"calibration.path {cal['path']!r} is not JSONL (its first line is not JSON); "
                                  "use source text_file") from None
            if not isinstance(row, dict) or cal["text_field"] not in row:
                raise ConfigError(f"calibration.text_field {cal['text_field']!r} is not a field of {cal['path']!r}; "
                                  f"its first row has {sorted(row) if isinstance(row, dict) else type(row).__name__}")
        # calibration text must never come from an evaluated split
        if path.resolve().is_relative_to((root / TASK_EXPORT).resolve()):
            raise ConfigError(f"calibration.path {cal['path']!r} is an exported evaluation task file: calibration would "
                              "overlap the evaluated splits; use calibration.source combination (it draws from the "
                              "held-out calibration part)")
    if cal["source"] == "combination" and cal["task_source"] == "local" and splits["calibration_fraction"] == 0:
        raise ConfigError("splits.calibration_fraction is 0, so every task document is in an evaluated split and "
                          "calibration.source combination would calibrate on them; set it above 0 (default 0.1) or "
                          "choose another calibration.source")


def config_warnings(config: Mapping, root: str | Path = ".") -> list[str]:
    """What a validated config asks for that the run will not do as asked, though it can run: one line each,
    printed before any job (rules/common.smk), where the stage would otherwise say it only in its log."""
    root = Path(root)
    return [w for w in (_calibration_size(config, root), _speed_selection(config)) if w]


def _speed_selection(config: Mapping) -> str | None:
    """speed.methods and speed.allocations name what compression builds; one that names none of it measures
    only the dense model."""
    speed, comp = config["speed"], config["compression"]
    if not speed["enabled"]:
        return None
    for key, built in (("methods", comp["methods"]), ("allocations", comp["allocations"])):
        chosen = speed[key]
        if chosen is not None and not set(chosen) & set(built):
            return (f"speed.{key} {list(chosen)} names none of compression.{key} {list(built)}: the inference-cost "
                    f"table holds the dense model alone; add one of compression.{key} to speed.{key}")
    return None


def _calibration_size(config: Mapping, root: Path) -> str | None:
    """calibration.num_samples against the documents its source offers, where they are countable now."""
    from sfsd.features.calibration import available_documents, from_settings, settings_of

    cal = config["calibration"]
    settings = settings_of(config)
    if cal["source"] in ("text_file", "jsonl_file"):
        settings["path"] = str(root / cal["path"])
    available = available_documents(from_settings(settings))
    if available is not None and cal["num_samples"] > available:
        where = " (the calibration part of each task, splits.calibration_fraction)" if cal["source"] == "combination" else ""
        return (f"calibration.num_samples {cal['num_samples']} exceeds the {available} documents that calibration.source "
                f"{cal['source']} offers{where}: the run calibrates on those {available}; set it to {available} or less "
                "to say so, or give a larger source")
    return None


def _check_model_limits(config: Mapping, root: Path) -> None:
    """The model's context and depth against the settings, for every model whose config.json is readable
    now; the stages check the others."""
    cal, ppl, search = config["calibration"], config["evaluation"]["perplexity"], config["search"]
    for name, m in config["models"].items():
        mc = _model_config(name, m, root)
        if mc is None:
            continue
        context = mc.get("max_position_embeddings") or mc.get("n_positions")  # GPT-J's names
        if context and cal["seq_len"] > context:
            raise ConfigError(f"calibration.seq_len {cal['seq_len']} exceeds the context of model {name} ({context} "
                              f"tokens); set it to {context} or less")
        if context and config["evaluation"]["enabled"] and ppl["source"] != "none" and ppl["window"] > context:
            raise ConfigError(f"evaluation.perplexity.window {ppl['window']} exceeds the context of model {name} "
                              f"({context} tokens); set it to {context} or less")
        n_blocks = mc.get("num_hidden_layers") or mc.get("n_layer")
        if not n_blocks:
            continue
        block_range(config["compression"]["first_block"], None, n_blocks, "compression.first_block", f"model {name}")
        if search["enabled"] and not search["full"]:
            block_range(search["first_block"], search["last_block"], n_blocks, "search.first_block", f"model {name}")


def _check_dtype(config: Mapping, root: Path) -> None:
    """The dtype settings (dtype; collection.dtype unless auto, which follows it): each model's run dtype
    where its config.json is readable now (with auto, the checkpoint's own must be one the workflow runs;
    `sfsd.model.loading.run_dtype`), then whether the device runs each dtype, where this machine can tell
    (a CUDA device is probed only where one is visible; the stages check the rest when they load the model)."""
    import torch

    from sfsd.model.loading import check_device_dtype, run_dtype

    keys = {"dtype": config["dtype"]}
    if config["collection"]["dtype"] != "auto":
        keys["collection.dtype"] = config["collection"]["dtype"]
    runs: dict[str, str] = {}  # dtype -> the key that asks for it
    for name, m in config["models"].items():
        mc = _model_config(name, m, root)
        for key, setting in keys.items():
            if mc is not None or setting != "auto":
                try:
                    runs.setdefault(run_dtype(mc or {}, setting), key)
                except ConfigError as err:
                    raise ConfigError(f"models.{name}: {err}") from None
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        return
    for dtype, key in runs.items():
        check_device_dtype(dtype, config["device"], key)


def _check_search(config: Mapping) -> None:
    search = config["search"]
    if not search["enabled"]:
        return
    tasks = config["evaluation"]["tasks"]
    for mode in ("accuracy", "loglik", "kl"):
        unknown = [t for t in search["targets"][mode] if t != "average" and t not in tasks]
        if mode in search["modes"] and unknown:
            raise ConfigError(f"search.targets.{mode} {unknown} are not in evaluation.tasks {tasks}; add them there "
                              "(the search scores their search split) or use average")
    if search["budgets"] and search["complete"] == "loss" and "loss" not in config["compression"]["allocations"]:
        raise ConfigError("search.complete loss reads the loss criterion, which runs (and is sized) only where "
                          "compression.allocations lists loss; add loss there or set search.complete to spectral")
    empty = [m for m in search["modes"] if not search["targets"][m]]
    if empty:
        raise ConfigError(f"search.targets.{empty[0]} is empty while search.modes lists {empty[0]}; name a target "
                          "or drop the mode")
    if "perplexity" in search["modes"]:
        from sfsd.evaluate.perplexity import search_text_conflict

        for target in search["targets"]["perplexity"]:
            conflict = search_text_conflict(target, config["evaluation"]["perplexity"], config["calibration"])
            if conflict:
                raise ConfigError(conflict)


def search_completion(config: Mapping) -> str:
    """How `searched_plan` allocates the layers a search cut at a budget did not decide: search.complete,
    `auto` read as loss where compression.allocations lists loss (its loss criterion is made anyway), else
    spectral (`sfsd.defaults.resolve_completion`). rules/search.smk reads it here."""
    return resolve_completion(config["search"]["complete"], "loss" in config["compression"]["allocations"])


def _check_metrics(config: Mapping) -> None:
    """evaluation.metric, search.metric and laser.metric against the tasks they score: a metric lm-eval's
    task config does not define (acc_norm for boolq or winogrande) names the key (sfsd.tasks.registry.task_metric)."""
    from sfsd.tasks.registry import task_metric

    def check(key: str, tasks) -> None:
        for task in tasks:
            try:
                task_metric(task, config[key.split(".")[0]]["metric"])
            except ConfigError as err:
                raise ConfigError(f"{key}: {err}") from None

    tasks = config["evaluation"]["tasks"]
    check("evaluation.metric", tasks)
    search = config["search"]
    if search["enabled"] and "accuracy" in search["modes"]:
        targets = search["targets"]["accuracy"]
        check("search.metric", tasks if "average" in targets else targets)
    if config["laser"]["enabled"]:
        check("laser.metric", config["laser"]["tasks"])


def _check_evaluation(config: Mapping, root: Path) -> None:
    from sfsd.evaluate.perplexity import calibration_conflict

    ppl = config["evaluation"]["perplexity"]
    if ppl["source"] in ("text_file", "jsonl_file") and (not ppl["path"] or not (root / ppl["path"]).is_file()):
        raise ConfigError(f"evaluation.perplexity.path {ppl['path']!r} is not a file (needed by source {ppl['source']})")
    conflict = calibration_conflict(ppl["source"], config["calibration"])
    if conflict:
        raise ConfigError(conflict)


def laser_models(config: Mapping) -> list[str]:
    """Models of the LASER study: laser.models, or every configured model when it is null."""
    laser = config["laser"]
    return list(laser["models"]) if laser["models"] is not None else list(config["models"])


def _check_laser(config: Mapping, root: Path) -> None:
    from sfsd.laser.study import format_rate

    laser, models = config["laser"], config["models"]
    if not laser["enabled"]:
        return
    unknown = [m for m in laser_models(config) if m not in models]
    if unknown:
        raise ConfigError(f"laser.models {unknown} are not configured under models; use some of {sorted(models)} "
                          "or null (all)")
    missing = [t for t in laser["tasks"] if t not in config["evaluation"]["tasks"]]
    if missing:
        raise ConfigError(f"laser.tasks {missing} are not in evaluation.tasks, whose splits the study uses; add "
                          "them there")
    for rate in laser["rates"]:
        format_rate(rate)
    if not laser["full_grid"] and not (set(laser["lnames"]) - {"dont"}):
        raise ConfigError("laser.lnames lists only dont (the baseline); add a layer type such as fc_in, or set "
                          "laser.full_grid")
    for name in [] if laser["full_grid"] else laser_models(config):
        mc = _model_config(name, models[name], root)
        n_blocks = mc.get("num_hidden_layers") if mc else None
        bad = [n for n in laser["lnums"] if n_blocks and n >= n_blocks]
        if bad:
            raise ConfigError(f"laser.lnums {bad} out of range: model {name} has blocks 0..{n_blocks - 1} "
                              "(-1 = every block)")


def _check_quick(config: Mapping) -> None:
    budgets = config["compression"]["budgets"]
    if config["quick"]["budget"] is not None and config["quick"]["budget"] not in budgets:
        raise ConfigError(f"quick.budget {config['quick']['budget']!r} is not a name of compression.budgets "
                          f"{sorted(budgets)}; use one of them (the quick target shares their compressed models)")


def _check_resources(config: Mapping, root: Path, machine) -> None:
    """A stage that fits in no mode, or results/ without the disk the stages still to run write, for the
    models whose shapes are on disk (`sfsd.resources.plan.check_fit`)."""
    from sfsd.resources.plan import check_fit

    check_fit(config, root, machine)
