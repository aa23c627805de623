# Stage 2: eigendecomposition of each block's output covariances (CPU, one job per block).


rule eigendecompose:
    input:
        features="results/{model}/features",
        model=model_dir,
    output:
        eigen="results/{model}/eigen/block_{block}.safetensors",
    params:
        layers=",".join(config["layers"]),
        save_dtype=config["eigen"]["save_dtype"],
        code=command_version("eigen"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/eigendecompose/{model}/block_{block}.log",
    benchmark:
        "results/benchmarks/eigendecompose/{model}/block_{block}.tsv"
    threads: plan_threads("eigendecompose")
    resources:
        mem_mb=plan_mem_mb("eigendecompose"),
        disk_mb=plan_disk_mb("eigendecompose"),
        runtime=lambda wc: int(5 + 5 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        "python -m sfsd --threads {threads} eigen --features {input.features:q}/block_{wildcards.block}.safetensors "
        "--model-dir {input.model:q} --layers {params.layers} --save-dtype {params.save_dtype} "
        "--out {output.eigen:q} > {log:q} 2>&1"


rule eigen_summary:
    input:
        blocks=lambda wc: expand(
            "results/{model}/eigen/block_{block}.safetensors", model=wc.model, block=blocks_of_model(wc.model)
        ),
    output:
        summary="results/{model}/eigen/summary.json",
    params:
        code=command_version("eigen-summary"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/eigen_summary/{model}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} eigen-summary --out {output.summary:q} {input.blocks:q} > {log:q} 2>&1"
