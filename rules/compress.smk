# Compressed models: full-rank factors per method (computed once, with each layer's spectrum), rank
# plans at parameter budgets (uniform, spectral, loss; searched ones in search.smk), and the compressed models
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
        dtype=config["dtype"],
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
        mem_mb=plan_mem_mb("factor_cache"),
        disk_mb=plan_disk_mb("factor_cache"),
        runtime=lambda wc: int(10 + 30 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        "python -m sfsd --threads {threads} factor-cache --model-dir {input.model:q} --results {params.results:q} "
        "--method {wildcards.method} --layers {params.layers} --streamed {params.streamed} --dtype {params.dtype} "
        "--out {output.factors:q} "
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
    priority: CHAIN_PRIORITY
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


# The loss criterion of one method, weighed by the dense model's gradients or a shot's (rules/loss_shots.smk)
LOSS_SPECTRA_SHELL = (
    "python -m sfsd --threads {threads} loss-spectra --model-dir {input.model:q} --results {params.results:q} "
    "{params.gradients}--factors {params.factors:q} --method {wildcards.method} --layers {params.layers} "
    "--bias-compensation {params.bias} --out {output.loss:q} > {log:q} 2>&1"
)


rule loss_spectra:
    """Per factor method, every layer's predicted loss increase at every rank (sfsd/decompose/criteria.py):
    the factor cache, stage 1's input statistics and the output gradients (collect_gradients). Sized by the
    resource planner (sfsd/resources/loss_needs.py loss_spectra: one block's files and one Linear's float64
    working set)."""
    input:
        factors=rules.factor_cache.output.factors,
        features="results/{model}/features",
        gradients="results/{model}/gradients",
        model=model_dir,
    output:
        loss=directory("results/{model}/loss/{method}"),
    params:
        layers=",".join(config["layers"]),
        results=lambda wc, input: Path(input.features).parent,
        factors=lambda wc, input: Path(input.factors).parent,
        bias=config["compression"]["bias_compensation"],
        gradients="",  # results/<model>/gradients
        code=command_version("loss-spectra"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/loss_spectra/{model}/{method}.log",
    benchmark:
        "results/benchmarks/loss_spectra/{model}/{method}.tsv"
    threads: plan_threads("loss_spectra")
    resources:
        mem_mb=plan_mem_mb("loss_spectra"),
        disk_mb=plan_disk_mb("loss_spectra"),
        runtime=lambda wc: int(10 + 30 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        LOSS_SPECTRA_SHELL


# The loss allocation's plan, of the last shot where compression.loss_shots > 1 (rules/loss_shots.smk)
LOSS_PLAN_SHELL = (
    "python -m sfsd --threads {threads} make-plan --allocation loss --loss {params.loss:q} "
    "--spectral-groups {params.groups} "
    "--model-dir {input.model:q} --model-name {wildcards.model} --method {wildcards.method} "
    "--params-fraction {params.fraction} --first-block {params.first_block} --layers {params.layers} "
    "--convention {params.convention} --bias-compensation {params.bias} --out {output.plan:q} > {log:q} 2>&1"
)


rule loss_plan:
    input:
        loss=lambda wc: shot_loss(wc, LOSS_SHOTS),
        model=model_dir,
    output:
        plan="results/{model}/plans/{method}-loss-{budget}.json",
    params:
        layers=",".join(config["layers"]),
        fraction=lambda wc: config["compression"]["budgets"][wc.budget],
        first_block=config["compression"]["first_block"],
        convention=config["compression"]["convention"],
        bias=config["compression"]["bias_compensation"],
        loss=lambda wc, input: Path(input.loss).parent,
        groups=config["compression"]["spectral_groups"],
        code=command_version("make-plan"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/loss_plan/{model}/{method}-{budget}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    priority: CHAIN_PRIORITY
    shell:
        LOSS_PLAN_SHELL


# A plan cut from the factor cache into a model folder (also compress_searched and loss_shot_model)
COMPRESS_SHELL = (
    "python -m sfsd --threads {threads} compress --model-dir {input.model:q} --plan {input.plan:q} "
    "--factors {params.factors:q} --streamed {params.streamed} --dtype {params.dtype} --out {output.model:q} "
    "> {log:q} 2>&1"
)


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
        dtype=config["dtype"],
        code=command_version("compress"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/compress_model/{model}/{plan}.log",
    benchmark:
        "results/benchmarks/compress_model/{model}/{plan}.tsv"
    resources:
        mem_mb=plan_mem_mb("compress_model"),
        disk_mb=plan_disk_mb("compress_model"),
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        COMPRESS_SHELL
