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
        ppl=lambda wc: f"--ppl-window {config['evaluation']['perplexity']['window']} "
        f"--ppl-search-fraction {config['splits']['search_fraction']}"
        + (f" --ppl-max-docs {n}" if (n := config["evaluation"]["perplexity"]["max_docs"]) is not None else ""),
        device=config["device"],
        out=lambda wc, output: Path(output.summary).parent,
        code=command_version("search"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/search/{model}/{method}-{mode}-{target}.log",
    benchmark:
        "results/benchmarks/search/{model}/{method}-{mode}-{target}.tsv"
    threads: 2
    resources:
        mem_mb=collect_mem_mb,
        runtime=lambda wc: int(60 + 600 * model_params_b(wc.model)),
        gpu=gpu_wanted(),
    shell:
        "python -m sfsd --threads {threads} search --model-dir {input.model:q} --model-name {wildcards.model} "
        "--factors {params.factors:q} --method {wildcards.method} --mode {wildcards.mode} "
        "--target {wildcards.target} {params.settings} --layers {params.layers} {params.tasks_args} "
        "--splits {input.splits:q} --tasks {params.tasks} {params.ppl} --calibration-texts {input.calibration:q} "
        "--device {params.device} --out {params.out:q} > {log:q} 2>&1"


rule compress_searched:
    input:
        plan=rules.search.output.plan,
        factors="results/{model}/factors/{method}",
        model=model_dir,
    output:
        model=directory("results/{model}/compressed/search-{method}-{mode}-{target}"),
    params:
        factors=lambda wc, input: Path(input.factors).parent,
        code=command_version("compress"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/compress_searched/{model}/{method}-{mode}-{target}.log",
    resources:
        mem_mb=collect_mem_mb,
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
    shell:
        "python -m sfsd --threads {threads} compress --model-dir {input.model:q} "
        "--plan {input.plan:q} --factors {params.factors:q} --out {output.model:q} > {log:q} 2>&1"
