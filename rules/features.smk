# Stage 1: per-block input moments of the target Linear layers (GPU when present, else CPU); a model whose
# weights do not fit the device runs one block at a time (streamed, sfsd/model/stream.py).
# A checkpoint: the number of blocks (hence of eigendecomposition jobs) is read from its manifest.


checkpoint collect_features:
    input:
        model=model_dir,
        tokens=rules.tokenize_calibration.output.tokens,
    output:
        features=directory("results/{model}/features"),
    params:
        layers=",".join(config["layers"]),
        dtype=collection_dtype(),  # collection.dtype, or dtype where that is auto
        device=config["device"],
        batch_size=config["collection"]["batch_size"],
        flush_every=config["collection"]["flush_every"],
        staging=config["collection"]["staging"],
        streamed=config["streamed"],
        code=command_version("collect"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/collect_features/{model}.log",
    benchmark:
        "results/benchmarks/collect_features/{model}.tsv"
    threads: plan_threads("collect_features")
    resources:
        mem_mb=plan_mem_mb("collect_features"),
        disk_mb=plan_disk_mb("collect_features"),
        runtime=lambda wc: int(20 + 20 * model_params_b(wc.model)),
        gpu=plan_gpus("collect_features"),
    priority: CHAIN_PRIORITY
    shell:
        "python -m sfsd --threads {threads} collect --model-dir {input.model:q} --model-name {wildcards.model} "
        "--tokens {input.tokens:q} --layers {params.layers} --dtype {params.dtype} --device {params.device} "
        "--batch-size {params.batch_size} --flush-every {params.flush_every} --staging {params.staging} "
        "--streamed {params.streamed} "
        "--out {output.features:q} "
        "> {log:q} 2>&1"


# Beside stage 1: per targeted Linear, G = E[g g^T] of the gradient of the summed token NLL at its output
# (sfsd/features/gradients.py): one forward and backward pass over the calibration tokens. Read only by the
# loss allocation (compression.allocations: loss); a model that does not fit the device is refused. Sized by
# the resource planner (sfsd/resources/loss_needs.py gradients), whose rule the stage decides gradients.full auto by.
# The gradient pass of the dense model, or of a shot's compressed model (rules/loss_shots.smk)
GRADIENTS_SHELL = (
    "python -m sfsd --threads {threads} gradients --model-dir {input.model:q} --model-name {wildcards.model} "
    "{params.compressed}--tokens {input.tokens:q} --layers {params.layers} --full {params.full} "
    "--dtype {params.dtype} --device {params.device} --batch-size {params.batch_size} --streamed {params.streamed} "
    "--labels {params.labels} --seed {params.seed} {params.pack}--out {output.gradients:q} > {log:q} 2>&1"
)


rule collect_gradients:
    input:
        model=model_dir,
        tokens=rules.tokenize_calibration.output.tokens,
    output:
        gradients=directory("results/{model}/gradients"),
    params:
        layers=",".join(config["layers"]),
        full=str(config["gradients"]["full"]).lower(),
        dtype=config["gradients"]["dtype"],
        device=config["device"],
        batch_size=config["gradients"]["batch_size"],
        labels=config["gradients"]["labels"],
        seed=config["gradients"]["seed"],
        pack="--pack " if config["gradients"]["pack"] else "",
        streamed=config["streamed"],
        compressed="",  # the dense model (a shot of the loss allocation passes its compressed model)
        code=command_version("gradients"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/collect_gradients/{model}.log",
    benchmark:
        "results/benchmarks/collect_gradients/{model}.tsv"
    threads: plan_threads("collect_gradients")
    resources:
        mem_mb=plan_mem_mb("collect_gradients"),
        disk_mb=plan_disk_mb("collect_gradients"),
        runtime=lambda wc: int(20 + 60 * model_params_b(wc.model)),
        gpu=plan_gpus("collect_gradients"),
    priority: CHAIN_PRIORITY
    shell:
        GRADIENTS_SHELL
