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
        dtype=config["collection"]["dtype"],
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
    threads: 2
    resources:
        mem_mb=collect_mem_mb,
        runtime=lambda wc: int(20 + 20 * model_params_b(wc.model)),
        gpu=gpu_wanted(),
    shell:
        "python -m sfsd --threads {threads} collect --model-dir {input.model:q} --model-name {wildcards.model} "
        "--tokens {input.tokens:q} --layers {params.layers} --dtype {params.dtype} --device {params.device} "
        "--batch-size {params.batch_size} --flush-every {params.flush_every} --staging {params.staging} "
        "--streamed {params.streamed} "
        "--out {output.features:q} "
        "> {log:q} 2>&1"
