# The LASER study: one cached job per grid point (intervention x layer type x layer number x rate) scored on
# the search split (LASER's validation part), the best point chosen there, the chosen points and the
# baseline scored on the test split, all rows in one Parquet, then the sweep figure and the best-point table.
# Library: workflow/sfsd/laser/study.py. Layout under results/<model>/laser/:
#   grid.json                      the grid's points (a checkpoint: `lnums` may need the model's block count)
#   points/<task>/<split>/<intervention>/<lname>/L<lnum>/r<rate>/{scores,items}.parquet
#   chosen/<task>.json             the choice on the search split (a checkpoint: it decides the test jobs)
#   results.parquet, items.parquet every point's rows; per-item records of the reported points
include: "laser_common.smk"


checkpoint laser_grid:
    input:
        model=model_dir,
    output:
        grid="results/{model}/laser/grid.json",
    params:
        settings=json.dumps({k: LASER[k] for k in ("lnums", "lnames", "rates", "interventions", "full_grid")}),
        code=command_version("laser-grid"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/laser_grid/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} laser-grid --model-dir {input.model:q} --settings {params.settings:q} "
        "--out {output.grid:q} > {log:q} 2>&1"


rule laser_point:
    input:
        model=model_dir,
        tasks=eval_tasks_input,
        splits=rules.eval_splits.output.splits,
    output:
        scores="results/{model}/laser/points/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}/scores.parquet",
        per_item="results/{model}/laser/points/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}/items.parquet",
    wildcard_constraints:
        task="|".join(config["evaluation"]["tasks"]),
        split="search|test",
        intervention="|".join([LASER_BASELINE.intervention, *LASER_INTERVENTIONS]),
        lname="|".join([*LASER_LNAMES, "dont"]),
        lnum=r"all|\d+",
        rate=r"\d+(\.\d+)?",
    params:
        task_args=eval_task_args,
        limit=f"--limit {LASER['limit'] or 'none'}",
        batch_size=LASER["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        vendi=" ".join(
            [f"--vendi-bandwidth {LASER['vendi']['bandwidth'] or 'none'}"]
            + (["--vendi-exact"] if LASER["vendi"]["exact"] else [])
        ),
        code=command_version("laser-point"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/laser_point/{model}/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}.log",
    benchmark:
        "results/benchmarks/laser_point/{model}/{task}/{split}/{intervention}/{lname}/L{lnum}/r{rate}.tsv"
    threads: 1
    resources:
        mem_mb=plan_mem_mb("laser_point"),
        runtime=lambda wc: int(20 + 30 * model_params_b(wc.model)),
        gpu=plan_gpus("laser_point"),
        nodes=1,  # its GPUs on one node: the job is one process
    shell:
        "python -m sfsd --threads {threads} laser-point --model-dir {input.model:q} --model-name {wildcards.model} "
        "{params.task_args} --splits {input.splits:q} --task {wildcards.task} --split {wildcards.split} "
        "--intervention {wildcards.intervention} --lname {wildcards.lname} --lnum {wildcards.lnum} "
        "--rate {wildcards.rate} {params.limit} --batch-size {params.batch_size} --device {params.device} "
        "--dtype {params.dtype} "
        "{params.vendi} --out-scores {output.scores:q} --out-items {output.per_item:q} > {log:q} 2>&1"


checkpoint laser_choose:
    input:
        scores=laser_search_scores,
    output:
        chosen="results/{model}/laser/chosen/{task}.json",
    params:
        metric=LASER["metric"],
        code=command_version("laser-choose"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/laser_choose/{model}/{task}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} laser-choose --task {wildcards.task} --metric {params.metric} "
        "--out {output.chosen:q} {input.scores:q} > {log:q} 2>&1"


rule laser_results:
    input:
        scores=laser_results_scores,
        per_item=laser_results_items,
        chosen=expand("results/{{model}}/laser/chosen/{task}.json", task=LASER["tasks"]),
    output:
        results="results/{model}/laser/results.parquet",
        per_item="results/{model}/laser/items.parquet",
    params:
        code=command_version("laser-results"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/laser_results/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} laser-results --scores {input.scores:q} --items {input.per_item:q} "
        "--chosen {input.chosen:q} --out-results {output.results:q} --out-items {output.per_item:q} > {log:q} 2>&1"


rule laser_figure:
    input:
        results=rules.laser_results.output.results,
    output:
        png=report(
            "results/figures/{model}/laser_sweep.png",
            caption="../workflow/report/laser_sweep.rst",
            category="LASER",
        ),
        svg="results/figures/{model}/laser_sweep.svg",
    params:
        metric=LASER["metric"],
        code=command_version("laser-figure"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/laser_figure/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} laser-figure --results {input.results:q} --metric {params.metric} "
        "--out-png {output.png:q} --out-svg {output.svg:q} > {log:q} 2>&1"


rule laser_table:
    input:
        results=rules.laser_results.output.results,
    output:
        md=report(
            "results/tables/{model}/laser_best.md",
            caption="../workflow/report/laser_best.rst",
            category="LASER",
        ),
        csv="results/tables/{model}/laser_best.csv",
    params:
        metric=LASER["metric"],
        code=command_version("laser-table"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/laser_table/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} laser-table --results {input.results:q} --metric {params.metric} "
        "--out-md {output.md:q} --out-csv {output.csv:q} > {log:q} 2>&1"
