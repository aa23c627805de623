# Calibration: a seeded sample of texts (model-independent), then tokens per model.


def calibration_settings():
    """calibration_texts' settings (sfsd.features.calibration.settings_of: one home for what it reads)."""
    from sfsd.features.calibration import settings_of

    return settings_of(config)


rule calibration_texts:
    output:
        texts="results/calibration/texts.jsonl",
    params:
        settings=lambda wc: json.dumps(calibration_settings(), sort_keys=True),
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
