# Figures and the methods-comparison table, made from cached results only (Parquet/JSON/JSONL): deleting
# them or changing a `figures:` option reruns these rules alone, on the CPU, never a model or a search.
# The one exception is `spectra`, which reads the weights of a few Linear layers (CPU) for the weight-space
# side of the spectra figure; the figure itself reads its Parquet.


rule spectra:
    input:
        eigen=spectra_block_files,
        model=model_dir,
    output:
        spectra="results/{model}/eigen/spectra.parquet",
    params:
        points=config["figures"]["spectra_points"],
        code=command_version("spectra"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/spectra/{model}.log",
    benchmark:
        "results/benchmarks/spectra/{model}.tsv"
    threads: 1
    resources:
        mem_mb=plan_mem_mb("eigendecompose"),  # one block's eigen file and weights at a time
        runtime=lambda wc: int(5 + 5 * model_params_b(wc.model)),
    shell:
        "python -m sfsd --threads {threads} spectra --model-dir {input.model:q} --points {params.points} "
        "--out {output.spectra:q} {input.eigen:q} > {log:q} 2>&1"


rule figure_spectra:
    input:
        spectra=rules.spectra.output.spectra,
    output:
        png=report(
            "results/figures/{model}/spectra.png",
            caption="../workflow/report/spectra.rst",
            category="Figures",
            subcategory="{model}",
        ),
        svg="results/figures/{model}/spectra.svg",
    params:
        dpi=config["figures"]["dpi"],
        code=command_version("figure-spectra"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/figure_spectra/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} figure-spectra --spectra {input.spectra:q} "
        "--title '{wildcards.model}: energy kept against rank, feature space vs weight space' "
        "--dpi {params.dpi} --out-png {output.png:q} --out-svg {output.svg:q} > {log:q} 2>&1"


rule figure_search_curves:
    input:
        curves=lambda wc: expand("results/{model}/search/{search}/curve.parquet", model=wc.model,
                                 search=searches_of(mode=wc.mode)),
        # the uniform-budget models of Table 1 appear as points where they were scored on the same documents
        results=lambda wc: f"results/{wc.model}/results.parquet" if config["evaluation"]["enabled"] else [],
    output:
        png=report(
            "results/figures/{model}/search_{mode}.png",
            caption="../workflow/report/search_curves.rst",
            category="Figures",
            subcategory="{model}",
        ),
        svg="results/figures/{model}/search_{mode}.svg",
    wildcard_constraints:
        mode=MODES_RE + "|budget",
    params:
        tasks=",".join(config["figures"]["tasks"] or config["evaluation"]["tasks"]),
        metric=config["evaluation"]["metric"],
        results=lambda wc, input: f"--results {input.results}" if input.results else "",
        dpi=config["figures"]["dpi"],
        code=command_version("figure-search-curves"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/figure_search_curves/{model}/{mode}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} figure-search-curves --tasks {params.tasks} --metric {params.metric} "
        "{params.results} --title '{wildcards.model}: {wildcards.mode}-driven surgical search' --dpi {params.dpi} "
        "--out-png {output.png:q} --out-svg {output.svg:q} {input.curves:q} > {log:q} 2>&1"


rule figure_layer_budgets:
    input:
        logs=lambda wc: expand("results/{model}/search/{search}/log.jsonl", model=wc.model,
                               search=searches_of(mode=wc.mode, method=wc.method)),
    output:
        png=report(
            "results/figures/{model}/layer_budgets_{method}-{mode}.png",
            caption="../workflow/report/layer_budgets.rst",
            category="Figures",
            subcategory="{model}",
        ),
        svg="results/figures/{model}/layer_budgets_{method}-{mode}.svg",
    wildcard_constraints:
        mode=MODES_RE + "|budget",
    params:
        dpi=config["figures"]["dpi"],
        annotate="--annotate" if config["figures"]["annotate_heatmap"] else "",
        code=command_version("figure-layer-budgets"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/figure_layer_budgets/{model}/{method}-{mode}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} figure-layer-budgets {params.annotate} --dpi {params.dpi} "
        "--title '{wildcards.model}: final parameter budget per layer, {wildcards.method} {wildcards.mode}-driven search' "
        "--out-png {output.png:q} --out-svg {output.svg:q} {input.logs:q} > {log:q} 2>&1"


rule figure_allocations:
    input:
        results="results/{model}/results.parquet",
    output:
        png=report(
            "results/figures/{model}/allocations.png",
            caption="../workflow/report/allocations.rst",
            category="Figures",
            subcategory="{model}",
        ),
        svg="results/figures/{model}/allocations.svg",
    params:
        metric=config["evaluation"]["metric"],
        dpi=config["figures"]["dpi"],
        code=command_version("figure-allocations"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/figure_allocations/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} figure-allocations --results {input.results:q} --metric {params.metric} "
        "--title '{wildcards.model}: allocations of the ranks at equal parameters' --dpi {params.dpi} "
        "--out-png {output.png:q} --out-svg {output.svg:q} > {log:q} 2>&1"


rule methods_table:
    input:
        results="results/{model}/results.parquet",
    output:
        md=report(
            "results/tables/{model}/methods.md",
            caption="../workflow/report/methods_table.rst",
            category="Tables",
        ),
        csv="results/tables/{model}/methods.csv",
    params:
        metric=config["evaluation"]["metric"],
        code=command_version("methods-table"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/methods_table/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} methods-table --results {input.results:q} --metric {params.metric} "
        "--out-md {output.md:q} --out-csv {output.csv:q} > {log:q} 2>&1"
