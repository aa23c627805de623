# Helpers shared by the rules: config checks, paths, resources, code versions.
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(workflow.basedir) / "workflow" / "sfsd"
# Jobs run `python -m sfsd` from whatever environment is active (the venv of workflow/setup.sh, or
# a conda env of envs/ with --sdm conda): put this checkout's package first on their path, so the
# stages always run the code whose digest is in their params (see command_version).
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")])))
# pyarrow (under datasets and lm-eval) allocates from jemalloc or mimalloc by default, which reserve about a GB
# of address space they never touch: under an address-space limit (`ulimit -v`, as some clusters set) the
# scoring stages would fail on memory they do not use. The system allocator reserves only what it uses.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def fail(message):
    """Stop before any job starts, with one line naming the key and the fix (an exception would add
    Snakemake's traceback lines to it)."""
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(1)


def check_config():
    """The schema (one line for its first violation; fills in its defaults), then every check the schema
    cannot make alone (sfsd.config.check_config): both before any job starts."""
    sys.path.insert(0, str(PACKAGE_DIR.parent))  # the package, also when not pip-installed
    from sfsd import config as sfsd_config
    from sfsd.errors import ConfigError

    try:
        sfsd_config.validate(config)
        sfsd_config.check_config(config, root=".")
    except ConfigError as err:
        fail(str(err))
    for warning in sfsd_config.config_warnings(config, root="."):
        print(f"config warning: {warning}", file=sys.stderr)


check_config()
MODELS = config["models"]


def job_machine():
    """The machine jobs are sized for (sfsd.resources.plan.machine_of): GPUs of gpu_memory_gb where the GPU
    stages run on one, host_memory_gb or the memory this machine has available now."""
    from sfsd.resources.plan import machine_of

    return machine_of(config, ".")


JOB_MACHINE = job_machine()
# Snakemake holds jobs to mem_mb only against a global limit: without --resources mem_mb=N, the machine's
# host memory, so `--cores 8` never starts more memory-heavy jobs than it holds (a job planned above it is
# capped to it and runs alone). mem_mb is a local resource, never summed over cluster jobs (SLURM).
if "mem_mb" not in workflow.global_resources:
    workflow.register_resource("mem_mb", max(1, int(JOB_MACHINE.host_bytes / 1e6)))


METHODS_RE = "feature|weight|whitened|asvd"  # sfsd.decompose.variants.METHOD_NAMES
MODES_RE = "accuracy|loglik|kl|perplexity"  # sfsd.search.settings.MODES
BUDGETS_RE = "|".join(sorted(config["compression"]["budgets"])) or "(?!)"


wildcard_constraints:
    model="|".join(sorted(MODELS)),
    block=r"\d{3}",
    method=METHODS_RE,
    budget=BUDGETS_RE,
    # variant and plan names: sfsd/decompose/variants.py
    plan=rf"({METHODS_RE})-(spectral-|loss-)?({BUDGETS_RE})|search-({METHODS_RE})-({MODES_RE})-[a-zA-Z0-9_]+-({BUDGETS_RE})",
    variant=rf"base|({METHODS_RE})-(spectral-|loss-)?[a-zA-Z0-9_]+|search-({METHODS_RE})-({MODES_RE})-[a-zA-Z0-9_]+(-[a-zA-Z0-9_]+)?",
    mode=MODES_RE,
    target=r"[a-zA-Z0-9_]+",


def command_version(command):
    """Digest of the library modules `python -m sfsd <command>` runs, found from its imports
    (`sfsd.provenance.command_modules`): Snakemake sees a rule's own code, not the modules it imports, so
    this goes into params and an edit of any of them, and of no other module, reruns the stage."""
    sys.path.insert(0, str(PACKAGE_DIR.parent))
    from sfsd.provenance import command_digest

    return command_digest(command, PACKAGE_DIR)


def model_dir(wildcards):
    """Folder of a model: the user's own for source local, else the prepared copy under results/."""
    m = MODELS[wildcards.model]
    return m["path"] if m["source"] == "local" else f"results/models/{wildcards.model}"


def _model_folder(name):
    m = MODELS[name]
    return Path(m["path"]) if m["source"] == "local" else Path(f"results/models/{name}")


def model_params_b(name):
    """Approximate parameter count (billions) for resource sizing: params_b, else counted from the
    safetensors headers of the weights on disk (a file that is not readable: its size at 2 bytes a weight)."""
    m = MODELS[name]
    if "params_b" in m:
        return m["params_b"]
    files = sorted(_model_folder(name).glob("*.safetensors")) if _model_folder(name).exists() else []
    if files:
        return _stored_params(tuple(files)) / 1e9
    return 0.135 if m["source"] == "embedded" else 7.0


@functools.lru_cache(maxsize=None)
def _stored_params(files):
    sys.path.insert(0, str(PACKAGE_DIR.parent))
    from sfsd.errors import DataError
    from sfsd.io import safetensors_header

    total = 0
    for f in files:
        try:
            header = json.loads(safetensors_header(f))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except DataError:
            total += f.stat().st_size // 2
    return total


def collection_dtype():
    """The dtype setting of stage 1: collection.dtype, or dtype where that is auto."""
    return config["dtype"] if config["collection"]["dtype"] == "auto" else config["collection"]["dtype"]


@functools.lru_cache(maxsize=None)
def planned(model):
    """Every stage's need for `model` from the resource planner (sfsd.resources.plan.job_needs: its shapes,
    the settings, GPUs of gpu_memory_gb and host_memory_gb or this machine's memory), once per model."""
    sys.path.insert(0, str(PACKAGE_DIR.parent))
    from sfsd.resources.plan import job_needs

    return job_needs(config, model, ".", JOB_MACHINE)


def stage_need(stage, wildcards):
    per_method = stage in ("factor_cache", "loss_spectra")  # planned as <stage>:<method>
    return planned(wildcards.model)[f"{stage}:{wildcards.method}" if per_method else stage]


def plan_mem_mb(stage):
    """A rule's mem_mb: the planned peak host memory of `stage` (its chosen mode), times the attempt."""
    return lambda wildcards, attempt: math.ceil(stage_need(stage, wildcards).host_bytes / 1e6) * attempt


def plan_disk_mb(stage):
    """A rule's disk_mb: what one job of `stage` writes (at least 1 MB)."""
    return lambda wildcards: max(1, math.ceil(stage_need(stage, wildcards).disk_bytes / 1e6))


def plan_gpus(stage):
    """A rule's gpu: the GPUs the planner gives `stage` (0 on the CPU; device auto: those that hold the
    weights at 80% of gpu_memory_gb each, sfsd.model.placement.gpus_needed)."""
    return lambda wildcards: stage_need(stage, wildcards).gpus


def local_cores():
    """--cores of a local run; None for a cluster run, which has no total (asking for it is an error)."""
    try:
        return workflow.cores
    except Exception:  # snakemake's WorkflowError: "Workflow requires a total number of cores"
        return None


def shared_threads(threads):
    """Threads of a multi-threaded job that must not wait for the whole machine: at most half of a local
    run's cores (at least 1). On 2 cores a 2-thread job starts only when both cores are free at once, which
    a stream of 1-thread jobs never leaves, so the stage-1 chain would start after them (a cluster job
    keeps its count)."""
    cores = local_cores()
    return threads if cores is None else max(1, min(threads, cores // 2))


def plan_threads(stage):
    return lambda wildcards: shared_threads(stage_need(stage, wildcards).threads)


# Jobs on the path to the search and the compressed models run before the scoring jobs that wait beside
# them (Snakemake starts the ready job of highest priority first): the evaluations then fill the cores
# while the chain runs, instead of the chain waiting for them.
CHAIN_PRIORITY = 10


def blocks_of_model(model):
    """Block indices, known once the features checkpoint has run."""
    folder = checkpoints.collect_features.get(model=model).output.features
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return [f"{b:03d}" for b in range(manifest["n_blocks"])]


def budget_variants():
    """Every compressed variant at a parameter budget: each method under each allocation of
    compression.allocations (uniform, spectral, loss), and each configured search landed on or completed to each
    budget when search.budgets is on (names: sfsd/decompose/variants.py)."""
    comp = config["compression"]
    names = [f"{m}-{b}" if a == "uniform" else f"{m}-{a}-{b}" for b in comp["budgets"] for m in comp["methods"]
             for a in comp["allocations"]]
    if config["search"]["enabled"] and config["search"]["budgets"]:
        names += [f"search-{s}-{b}" for s in search_names() for b in comp["budgets"]]
    return names


def compression_targets():
    """Plans of every budget variant; the compressed models themselves when save_models is on."""
    kind = "compressed/{name}" if config["compression"]["save_models"] else "plans/{name}.json"
    return expand(f"results/{{model}}/{kind}", model=MODELS, name=budget_variants())


def compressed_input(wildcards):
    """The compressed model folder of a variant; nothing for the base model."""
    if wildcards.variant == "base":
        return []
    return f"results/{wildcards.model}/compressed/{wildcards.variant}"


def evaluated_variants():
    """`base` and, when evaluation.compressed is on, every budget variant (budget_variants) and every
    searched model (search-<method>-<mode>-<target>, when search.evaluate is on)."""
    variants = ["base"]
    if config["evaluation"]["compressed"]:
        variants += budget_variants()
        if config["search"]["enabled"] and config["search"]["evaluate"]:
            variants += [f"search-{s}" for s in search_names()]
    return variants


def variant_method(variant):
    """The decomposition method of an evaluated variant (the results' `method` column)."""
    parts = variant.split("-")
    return parts[1] if parts[0] == "search" else parts[0]


def search_names():
    """`{method}-{mode}-{target}` of every configured search (methods x modes x that mode's targets)."""
    s = config["search"]
    if not s["enabled"]:
        return []
    return [f"{method}-{mode}-{target}" for method in s["methods"] for mode in s["modes"]
            for target in s["targets"][mode]]


def search_args(wildcards):
    """The search settings as CLI options. `search.full` switches to the paper's full settings and the
    released code's procedure: blocks from compression.first_block, whole splits, strategy released,
    delta 0 (the released default) and its checkpoints at 91% and 81.5% of the parameters."""
    s = config["search"]
    full = s["full"]
    first_block = config["compression"]["first_block"] if full else s["first_block"]
    checkpoints = [0.91, 0.815] if full else s["checkpoints"]
    args = [
        f"--metric {s['metric']}", f"--delta {0.0 if full else s['delta']}", f"--eps {s['eps']}",
        f"--loglik-delta {s['loglik_delta']}", f"--kl-max {s['kl_max']}", f"--order {','.join(s['order'])}",
        f"--fractions {','.join(str(f) for f in s['fractions'])}", f"--first-block {first_block}",
        f"--strategy {'released' if full else s['strategy']}", f"--convention {config['compression']['convention']}",
        f"--bias-compensation {config['compression']['bias_compensation']}",
        f"--checkpoints {','.join(str(c) for c in checkpoints) or 'none'}",
        f"--curve-every {s['curve_every']}", f"--cache-max-mb {s['cache_max_mb']}", f"--batch-size {s['batch_size']}",
    ]
    if s["budgets"] and config["compression"]["budgets"]:
        args.append("--budgets " + ",".join(f"{k}={v}" for k, v in config["compression"]["budgets"].items()))
    # whole splits and every block up to the top for search.full; None is passed as `none`
    args += [f"--last-block {None if full else s['last_block']}", f"--stop-at {s['stop_at']}",
             f"--search-limit {None if full else s['search_limit']}", f"--curve-limit {None if full else s['curve_limit']}"]
    if not s["cache"]:
        args.append("--no-cache")
    return " ".join(args)


def search_targets():
    """Every configured search's output folder (and, via evaluated_variants, its evaluation)."""
    return expand("results/{model}/search/{search}/summary.json", model=MODELS, search=search_names())


def figure_searches():
    """Search names `{method}-{mode}-{target}` whose outputs the figures read (the search stage's
    search_names()); [] while the config has no search section."""
    return list(search_names()) if "search" in config else []


def figures_targets():
    """Figures (and the methods table) of every model: spectra always, search curves per search mode and
    layer-budget heat maps per (method, mode) once searches are configured."""
    fig = config["figures"]
    if not fig["enabled"]:
        return []
    targets = expand("results/figures/{model}/spectra.{ext}", model=MODELS, ext=("png", "svg"))
    if config["evaluation"]["enabled"]:
        targets += expand("results/tables/{model}/methods.{ext}", model=MODELS, ext=("md", "csv"))
        if config["evaluation"]["compressed"] and budget_variants():
            targets += expand("results/figures/{model}/allocations.{ext}", model=MODELS, ext=("png", "svg"))
    searches = [s.split("-", 2) for s in figure_searches()]
    modes = sorted({mode for _, mode, _ in searches})
    pairs = sorted({f"{method}-{mode}" for method, mode, _ in searches})
    targets += expand("results/figures/{model}/search_{mode}.{ext}", model=MODELS, mode=modes, ext=("png", "svg"))
    targets += expand("results/figures/{model}/layer_budgets_{pair}.{ext}", model=MODELS, pair=pairs,
                      ext=("png", "svg"))
    return targets


def laser_results_of(wildcards):
    """The LASER study's rows of a model (same row format), combined into its results.parquet."""
    laser = config["laser"]
    models = laser["models"] if laser["models"] is not None else list(MODELS)
    return [f"results/{wildcards.model}/laser/results.parquet"] if laser["enabled"] and wildcards.model in models else []


def laser_targets():
    """The LASER study's sweep figure and best-point table of each of its models (rules/laser.smk)."""
    laser = config["laser"]
    if not laser["enabled"]:
        return []
    models = laser["models"] if laser["models"] is not None else list(MODELS)
    return expand("results/figures/{model}/laser_sweep.{ext}", model=models, ext=("png", "svg")) + expand(
        "results/tables/{model}/laser_best.{ext}", model=models, ext=("md", "csv")
    )


def spectra_block_files(wildcards):
    """Eigen files of the blocks shown in the spectra figure (figures.spectra_blocks; negative indices count
    from the last block; null = four blocks spread over the depth)."""
    n = len(blocks_of_model(wildcards.model))
    chosen = config["figures"]["spectra_blocks"]
    if chosen is None:
        blocks = sorted({round(i * (n - 1) / 3) for i in range(4)})
    else:
        bad = [b for b in chosen if not -n <= b < n]
        if bad:
            fail(f"figures.spectra_blocks: block(s) {bad} out of range; model {wildcards.model} has blocks 0..{n - 1}")
        blocks = sorted({b % n for b in chosen})
    return [f"results/{wildcards.model}/eigen/block_{b:03d}.safetensors" for b in blocks]


def searches_of(mode=None, method=None):
    """Search names of the figures (see figure_searches in rules/common.smk), filtered by mode/method."""
    return [s for s in figure_searches() if (mode is None or s.split("-", 2)[1] == mode)
            and (method is None or s.split("-", 2)[0] == method)]


def all_targets():
    targets = [f"results/{m}/eigen/summary.json" for m in MODELS] + compression_targets()
    if config["evaluation"]["enabled"]:
        targets += expand("results/tables/{model}/table1.md", model=MODELS)
        if len(evaluated_variants()) >= 2:  # something to compare with the base model
            targets += expand("results/tables/{model}/comparisons.{ext}", model=MODELS, ext=("md", "csv"))
    targets += search_targets()
    targets += figures_targets()
    targets += laser_targets()
    targets += speed_targets()
    return targets
