# Inference cost (sfsd/evaluate/speed.py): the dense model and the compressed variants of speed.allocations on the
# same seeded prompts, one process per model (its peak memory), each with every core of the run so no
# other job runs beside it; then the table of ratios to the dense model.


def speed_variants():
    """`base` and every budget variant of speed.methods under the allocations in speed.allocations
    (sfsd/decompose/variants.py names)."""
    comp, speed = config["compression"], config["speed"]
    allocations = [a for a in speed["allocations"] if a in comp["allocations"]]
    methods = [m for m in comp["methods"] if speed["methods"] is None or m in speed["methods"]]
    return ["base"] + [f"{m}-{b}" if a == "uniform" else f"{m}-{a}-{b}" for b in comp["budgets"]
                       for m in methods for a in allocations]


def speed_threads():
    """Every core of the run (so no other job runs beside a measurement); 8 where the run has no core
    count (a cluster profile sets jobs, not cores)."""
    return local_cores() or 8


def speed_targets():
    if not config["speed"]["enabled"]:
        return []
    return expand("results/tables/{model}/speed.{ext}", model=MODELS, ext=("md", "csv"))


rule inference_speed:
    input:
        model=model_dir,
        compressed=compressed_input,
    output:
        "results/{model}/speed/{variant}.json",
    params:
        compressed=lambda wc, input: input.compressed or "none",
        device=config["device"],
        dtype=config["dtype"],
        prompt_tokens=config["speed"]["prompt_tokens"],
        decode_tokens=config["speed"]["decode_tokens"],
        batch_sizes=",".join(map(str, config["speed"]["batch_sizes"])),
        repeats=config["speed"]["repeats"],
        code=command_version("inference-speed"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/inference_speed/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/inference_speed/{model}/{variant}.tsv"
    threads: speed_threads()
    resources:
        mem_mb=plan_mem_mb("inference_speed"),
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
        gpu=plan_gpus("inference_speed"),
        nodes=1,  # its GPUs on one node: the job is one process
    shell:
        "python -m sfsd --threads {threads} inference-speed --model-dir {input.model:q} --compressed {params.compressed:q} "
        "--variant {wildcards.variant} --device {params.device} --dtype {params.dtype} "
        "--prompt-tokens {params.prompt_tokens} "
        "--decode-tokens {params.decode_tokens} --batch-sizes {params.batch_sizes} --repeats {params.repeats} "
        "--out {output:q} > {log:q} 2>&1"


rule speed_table:
    input:
        expand("results/{{model}}/speed/{variant}.json", variant=speed_variants()),
    output:
        md=report(
            "results/tables/{model}/speed.md",
            caption="../workflow/report/speed.rst",
            category="Tables",
        ),
        csv="results/tables/{model}/speed.csv",
    params:
        code=command_version("speed-table"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/speed_table/{model}.log",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m sfsd --threads {threads} speed-table --out-md {output.md:q} --out-csv {output.csv:q} {input:q} "
        "> {log:q} 2>&1"
