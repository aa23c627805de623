# Models: the embedded model converted once to safetensors, or a hub model downloaded once.


rule prepare_model:
    output:
        model=directory("results/models/{model}"),
    params:
        source=lambda wc: MODELS[wc.model]["source"],
        id=lambda wc: MODELS[wc.model].get("id", ""),
        revision=lambda wc: MODELS[wc.model].get("revision", "main"),
        code=command_version("prepare-model"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/prepare_model/{model}.log",
    resources:
        mem_mb=plan_mem_mb("prepare_model"),
        disk_mb=plan_disk_mb("prepare_model"),
        runtime=lambda wc: int(30 + 10 * model_params_b(wc.model)),
    shell:
        "python -m sfsd --threads {threads} prepare-model --source {params.source} --name {params.id:q} "
        "--revision {params.revision:q} --out {output.model:q} > {log:q} 2>&1"
