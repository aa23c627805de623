# Evaluation: the six benchmarks as local lm-eval tasks (or lm-eval's own hub tasks), seeded search/test
# splits, the base and the compressed models scored on the test split (plus perplexity), results combined,
# and the paper's table.

rule export_tasks:
    output:
        tasks=directory("results/tasks"),
    params:
        tasks=",".join(config["evaluation"]["tasks"]),
        code=command_version("export-tasks"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/export_tasks.log",
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} export-tasks --tasks {params.tasks} --out {output.tasks:q} > {log:q} 2>&1"


rule eval_splits:
    output:
        splits="results/splits.json",
    params:
        tasks=",".join(config["evaluation"]["tasks"]),
        seed=config["splits"]["seed"],
        calibration=config["splits"]["calibration_fraction"],
        search=config["splits"]["search_fraction"],
        source=EVAL["source"],  # hub: downloads lm-eval's task data to count and check its eval docs
        code=command_version("splits"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/eval_splits.log",
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} splits --tasks {params.tasks} --seed {params.seed} "
        "--calibration-fraction {params.calibration} --search-fraction {params.search} --source {params.source} "
        "--out {output.splits:q} > {log:q} 2>&1"


rule evaluate_model:
    input:
        model=model_dir,
        compressed=compressed_input,
        tasks=eval_tasks_input,
        splits=rules.eval_splits.output.splits,
        calibration=rules.calibration_texts.output.texts,
        ppl_text=perplexity_input,
    output:
        rows="results/{model}/eval/{variant}.parquet",
        docs="results/{model}/eval/{variant}.docs.parquet",
    params:
        compressed=lambda wc, input: f"--compressed {input.compressed} --method {variant_method(wc.variant)}"
        if input.compressed
        else "",
        tasks=",".join(config["evaluation"]["tasks"]),
        split=config["evaluation"]["split"],
        limit=f"--limit {config['evaluation']['limit'] or 'none'}",
        scorer=config["evaluation"]["scorer"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        task_args=eval_task_args,
        ppl=perplexity_args,
        code=command_version("evaluate"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/evaluate_model/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_model/{model}/{variant}.tsv"
    threads: 1
    resources:
        mem_mb=plan_mem_mb("evaluate_model"),
        runtime=lambda wc: int(30 + 30 * model_params_b(wc.model)),
        gpu=plan_gpus("evaluate_model"),
        nodes=1,  # its GPUs on one node: the job is one process
    shell:
        "python -m sfsd --threads {threads} evaluate --model-dir {input.model:q} {params.compressed} "
        "--model-name {wildcards.model} --variant {wildcards.variant} {params.task_args} "
        "--tasks {params.tasks} --splits {input.splits:q} --split {params.split} {params.limit} "
        "--scorer {params.scorer} --batch-size {params.batch_size} --device {params.device} --dtype {params.dtype} "
        "{params.ppl} "
        "--calibration-texts {input.calibration:q} --out {output.rows:q} --items-out {output.docs:q} > {log:q} 2>&1"


rule check_scorer:
    input:
        model=model_dir,
        compressed=compressed_input,
        tasks=eval_tasks_input,
        splits=rules.eval_splits.output.splits,
    output:
        report="results/{model}/eval/scorer_check/{variant}.json",
    params:
        compressed=lambda wc, input: f"--compressed {input.compressed}" if input.compressed else "",
        tasks=",".join(config["evaluation"]["tasks"]),
        # the first check_docs of the documents the evaluation scores
        limit=min(EVAL["check_docs"], EVAL["limit"] or EVAL["check_docs"]),
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        task_args=eval_task_args,
        code=command_version("check-scorer"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/check_scorer/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/check_scorer/{model}/{variant}.tsv"
    threads: 1
    resources:
        mem_mb=plan_mem_mb("check_scorer"),
        runtime=lambda wc: int(20 + 10 * model_params_b(wc.model)),
        gpu=plan_gpus("check_scorer"),
        nodes=1,  # its GPUs on one node: the job is one process
    shell:
        "python -m sfsd --threads {threads} check-scorer --model-dir {input.model:q} {params.compressed} "
        "{params.task_args} --tasks {params.tasks} --splits {input.splits:q} --limit {params.limit} "
        "--batch-size {params.batch_size} --device {params.device} --dtype {params.dtype} --out {output.report:q} "
        "> {log:q} 2>&1"


rule combine_results:
    input:
        rows=lambda wc: expand("results/{{model}}/eval/{variant}.parquet", variant=evaluated_variants())
        + laser_results_of(wc),
        # no table or figure from a native scorer that disagrees with lm-eval
        checks=scorer_checks,
    output:
        results="results/{model}/results.parquet",
    params:
        code=command_version("combine-results"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/combine_results/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} combine-results --out {output.results:q} {input.rows:q} > {log:q} 2>&1"


rule paper_table:
    input:
        results=rules.combine_results.output.results,
    output:
        md=report(
            "results/tables/{model}/table1.md",
            caption="../workflow/report/table1.rst",
            category="Tables",
        ),
        csv="results/tables/{model}/table1.csv",
    params:
        metric=config["evaluation"]["metric"],
        code=command_version("paper-table"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/paper_table/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} paper-table --results {input.results:q} --metric {params.metric} "
        "--out-md {output.md:q} --out-csv {output.csv:q} > {log:q} 2>&1"


rule comparisons_table:
    input:
        docs=expand("results/{{model}}/eval/{variant}.docs.parquet", variant=evaluated_variants()),
        checks=scorer_checks,
    output:
        md=report(
            "results/tables/{model}/comparisons.md",
            caption="../workflow/report/comparisons.rst",
            category="Tables",
        ),
        csv="results/tables/{model}/comparisons.csv",
    params:
        metric=config["evaluation"]["metric"],
        seed=config["evaluation"]["bootstrap"]["seed"],
        resamples=config["evaluation"]["bootstrap"]["resamples"],
        code=command_version("comparisons"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/comparisons_table/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} comparisons --metric {params.metric} --seed {params.seed} "
        "--n-boot {params.resamples} --out-md {output.md:q} --out-csv {output.csv:q} {input.docs:q} > {log:q} 2>&1"
