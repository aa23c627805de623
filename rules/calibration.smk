# Calibration: a seeded sample of texts (model-independent), then tokens per model.


rule calibration_texts:
    output:
        texts="results/calibration/texts.jsonl",
    params:
        settings=lambda wc: json.dumps(
            {
                **{k: v for k, v in config["calibration"].items() if k != "seq_len"},
                "split_seed": config["splits"]["seed"],
                "calibration_fraction": config["splits"]["calibration_fraction"],
                "search_fraction": config["splits"]["search_fraction"],
            },
            sort_keys=True,
        ),
        code=command_version("calibration-texts"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/calibration_texts.log",
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} calibration-texts --settings {params.settings:q} --out {output.texts:q} > {log:q} 2>&1"


rule tokenize_calibration:
    input:
        texts=rules.calibration_texts.output.texts,
        model=model_dir,
    output:
        tokens="results/{model}/calibration/tokens.safetensors",
    params:
        seq_len=config["calibration"]["seq_len"],
        code=command_version("tokenize"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/tokenize_calibration/{model}.log",
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m sfsd --threads {threads} tokenize --model-dir {input.model:q} --texts {input.texts:q} "
        "--seq-len {params.seq_len} --out {output.tokens:q} > {log:q} 2>&1"
