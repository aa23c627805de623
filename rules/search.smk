# Surgical rank search (SFSD's core): one job per (model, method, mode, target), reading the factor cache
# of its method and the search split, resumable after a crash (its state file sits next to the output);
# the searched model is then cut from the factor cache and evaluated like any compressed model.


rule search:
    input:
        model=model_dir,
        factors="results/{model}/factors/{method}",
        tasks=eval_tasks_input,
        splits=rules.eval_splits.output.splits,
        calibration=rules.calibration_texts.output.texts,
        # a local perplexity text: editing it reruns the search
        text=lambda wc: [config["evaluation"]["perplexity"]["path"]]
        if wc.mode == "perplexity" and wc.target in ("text_file", "jsonl_file") else [],
    output:
        plan="results/{model}/search/{method}-{mode}-{target}/plan.json",
        log_jsonl="results/{model}/search/{method}-{mode}-{target}/log.jsonl",
        curve="results/{model}/search/{method}-{mode}-{target}/curve.parquet",
        checkpoints=directory("results/{model}/search/{method}-{mode}-{target}/checkpoints"),
        summary="results/{model}/search/{method}-{mode}-{target}/summary.json",
    params:
        factors=lambda wc, input: Path(input.factors).parent,
        tasks_args=eval_task_args,
        settings=search_args,
        layers=",".join(config["layers"]),
        tasks=",".join(config["evaluation"]["tasks"]),
        # a text_file / jsonl_file target reads evaluation.perplexity's file (check_search_text): the search
        # tunes on its leading documents, the evaluate stage scores the rest
        ppl=lambda wc: f"--ppl-window {config['evaluation']['perplexity']['window']} "
        f"--ppl-search-fraction {config['splits']['search_fraction']}"
        # where BOS goes in the windows: only a perplexity search scores windows (its change reruns no other)
        + (f" --ppl-bos {config['evaluation']['perplexity']['bos']}" if wc.mode == "perplexity" else "")
        + f" --ppl-max-docs {config['evaluation']['perplexity']['max_docs']}"
        + (
            f" --ppl-path {shlex.quote(str(config['evaluation']['perplexity']['path']))}"
            f" --ppl-text-field {shlex.quote(config['evaluation']['perplexity']['text_field'])}"
            if wc.mode == "perplexity" and wc.target in ("text_file", "jsonl_file")
            else ""
        ),
        device=config["device"],
        dtype=config["dtype"],
        out=lambda wc, output: Path(output.summary).parent,
        code=command_version("search"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/search/{model}/{method}-{mode}-{target}.log",
    benchmark:
        "results/benchmarks/search/{model}/{method}-{mode}-{target}.tsv"
    threads: shared_threads(2)
    priority: CHAIN_PRIORITY
    resources:
        mem_mb=plan_mem_mb("search"),
        runtime=lambda wc: int(60 + 600 * model_params_b(wc.model)),
        gpu=plan_gpus("search"),
        nodes=1,  # its GPUs on one node: the job is one process
    shell:
        "python -m sfsd --threads {threads} search --model-dir {input.model:q} --model-name {wildcards.model} "
        "--factors {params.factors:q} --method {wildcards.method} --mode {wildcards.mode} "
        "--target {wildcards.target} {params.settings} --layers {params.layers} {params.tasks_args} "
        "--splits {input.splits:q} --tasks {params.tasks} {params.ppl} --calibration-texts {input.calibration:q} "
        "--device {params.device} --dtype {params.dtype} --out {params.out:q} > {log:q} 2>&1"


rule compress_searched:
    input:
        plan=rules.search.output.plan,
        factors="results/{model}/factors/{method}",
        model=model_dir,
    output:
        model=directory("results/{model}/compressed/search-{method}-{mode}-{target}"),
    params:
        factors=lambda wc, input: Path(input.factors).parent,
        streamed=config["streamed"],
        dtype=config["dtype"],
        code=command_version("compress"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/compress_searched/{model}/{method}-{mode}-{target}.log",
    benchmark:
        "results/benchmarks/compress_searched/{model}/{method}-{mode}-{target}.tsv"
    resources:
        mem_mb=plan_mem_mb("compress_searched"),
        disk_mb=plan_disk_mb("compress_searched"),
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        COMPRESS_SHELL


# How searched_plan allocates the layers a search did not decide: search.complete, auto read as loss where
# compression.allocations lists loss, else spectral (sfsd/config.py search_completion)
from sfsd.config import search_completion

SEARCH_COMPLETION = search_completion(config)


rule searched_plan:
    """A search at a parameter budget: its own plan where it landed on the budget, else its decisions with
    the layers it did not reach allocated by SEARCH_COMPLETION, spectrally from the factor cache or by the
    loss criterion of its method (sfsd make-plan --allocation searched --complete)."""
    input:
        summary=rules.search.output.summary,
        factors="results/{model}/factors/{method}",
        loss=lambda wc: f"results/{wc.model}/loss/{wc.method}" if SEARCH_COMPLETION == "loss" else [],
        model=model_dir,
    output:
        plan="results/{model}/plans/search-{method}-{mode}-{target}-{budget}.json",
    params:
        layers=",".join(config["layers"]),
        fraction=lambda wc: config["compression"]["budgets"][wc.budget],
        first_block=config["compression"]["first_block"],
        convention=config["compression"]["convention"],
        bias=config["compression"]["bias_compensation"],
        factors=lambda wc, input: Path(input.factors).parent,
        search=lambda wc, input: Path(input.summary).parent,
        groups=config["compression"]["spectral_groups"],
        complete=SEARCH_COMPLETION,
        loss=lambda wc, input: f"--loss {shlex.quote(str(Path(input.loss).parent))}" if input.loss else "",
        code=command_version("make-plan"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/searched_plan/{model}/{method}-{mode}-{target}-{budget}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    priority: CHAIN_PRIORITY
    shell:
        "python -m sfsd --threads {threads} make-plan --allocation searched --factors {params.factors:q} "
        "--complete {params.complete} {params.loss} --spectral-groups {params.groups} "
        "--search {params.search:q} --budget-label {wildcards.budget} --model-dir {input.model:q} "
        "--model-name {wildcards.model} --method {wildcards.method} --params-fraction {params.fraction} "
        "--first-block {params.first_block} --layers {params.layers} --convention {params.convention} "
        "--bias-compensation {params.bias} --out {output.plan:q} > {log:q} 2>&1"
