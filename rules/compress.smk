# Compressed models: full-rank factors per method (computed once, with each layer's spectrum), rank
# plans at parameter budgets (uniform, spectral; searched ones in search.smk), and the compressed models
# cut from the factors (safetensors + plan.json). Variant names: sfsd/decompose/variants.py.


rule factor_cache:
    input:
        eigen="results/{model}/eigen/summary.json",
        features="results/{model}/features",
        model=model_dir,
    output:
        factors=directory("results/{model}/factors/{method}"),
    params:
        layers=",".join(config["layers"]),
        results=lambda wc, input: Path(input.features).parent,
        streamed=config["streamed"],
        code=command_version("factor-cache"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/factor_cache/{model}/{method}.log",
    benchmark:
        "results/benchmarks/factor_cache/{model}/{method}.tsv"
    # one thread: LAPACK's SVD/eigh gain little from two here, and two jobs then share the cores
    threads: 1
    resources:
        mem_mb=collect_mem_mb,
        runtime=lambda wc: int(10 + 30 * model_params_b(wc.model)),
    shell:
        "python -m sfsd --threads {threads} factor-cache --model-dir {input.model:q} --results {params.results:q} "
        "--method {wildcards.method} --layers {params.layers} --streamed {params.streamed} --out {output.factors:q} "
        "> {log:q} 2>&1"


rule make_plan:
    input:
        model=model_dir,
    output:
        plan="results/{model}/plans/{method}-{budget}.json",
    params:
        layers=",".join(config["layers"]),
        fraction=lambda wc: config["compression"]["budgets"][wc.budget],
        first_block=config["compression"]["first_block"],
        convention=config["compression"]["convention"],
        bias=config["compression"]["bias_compensation"],
        code=command_version("make-plan"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/make_plan/{model}/{method}-{budget}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} make-plan --model-dir {input.model:q} --model-name {wildcards.model} "
        "--method {wildcards.method} --params-fraction {params.fraction} --first-block {params.first_block} "
        "--layers {params.layers} --convention {params.convention} --bias-compensation {params.bias} "
        "--out {output.plan:q} > {log:q} 2>&1"


rule spectral_plan:
    input:
        factors=rules.factor_cache.output.factors,
        model=model_dir,
    output:
        plan="results/{model}/plans/{method}-spectral-{budget}.json",
    params:
        layers=",".join(config["layers"]),
        fraction=lambda wc: config["compression"]["budgets"][wc.budget],
        first_block=config["compression"]["first_block"],
        convention=config["compression"]["convention"],
        bias=config["compression"]["bias_compensation"],
        factors=lambda wc, input: Path(input.factors).parent,
        groups=config["compression"]["spectral_groups"],
        code=command_version("make-plan"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/spectral_plan/{model}/{method}-{budget}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} make-plan --allocation spectral --factors {params.factors:q} "
        "--spectral-groups {params.groups} "
        "--model-dir {input.model:q} --model-name {wildcards.model} --method {wildcards.method} "
        "--params-fraction {params.fraction} --first-block {params.first_block} --layers {params.layers} "
        "--convention {params.convention} --bias-compensation {params.bias} --out {output.plan:q} > {log:q} 2>&1"


rule compress_model:
    input:
        plan="results/{model}/plans/{plan}.json",
        factors=lambda wc: f"results/{wc.model}/factors/{variant_method(wc.plan)}",
        model=model_dir,
    output:
        model=directory("results/{model}/compressed/{plan}"),
    params:
        factors=lambda wc, input: Path(input.factors).parent,
        streamed=config["streamed"],
        code=command_version("compress"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/compress_model/{model}/{plan}.log",
    resources:
        mem_mb=collect_mem_mb,
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
    shell:
        "python -m sfsd --threads {threads} compress --model-dir {input.model:q} --plan {input.plan:q} --factors {params.factors:q} "
        "--streamed {params.streamed} --out {output.model:q} > {log:q} 2>&1"
