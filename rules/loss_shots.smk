# The loss allocation in shots (compression.loss_shots = N > 1), as LLM Surgeon re-estimates its curvature
# between shots: shot j of N allocates every layer at the fraction shot_fractions(budget, N)[j - 1] by the loss
# criterion weighed with the output gradients of the model shot j - 1 compressed (shot 1: the dense model's,
# rule collect_gradients). Shots 1..N-1 live in results/{model}/loss_shots/{method}-{budget}/{shot}/; rule
# loss_plan makes shot N, the loss variant's plan. Their models are temporary, kept only for the gradient pass.

from sfsd.decompose.allocate import shot_fractions

LOSS_SHOTS = config["compression"]["loss_shots"]
SHOT_DIR = "results/{model}/loss_shots/{method}-{budget}/{shot}"  # one shot's files


def shot_loss(wc, shot):
    """The loss criterion shot `shot` allocates by: the dense model's (shot 1), else the one weighed by the
    gradients of shot - 1's model."""
    if int(shot) == 1:
        return f"results/{wc.model}/loss/{wc.method}"
    previous = SHOT_DIR.format(model=wc.model, method=wc.method, budget=wc.budget, shot=int(shot) - 1)
    return f"{previous}/loss/{wc.method}"


wildcard_constraints:
    shot=r"\d+",


rule loss_shot_plan:
    input:
        loss=lambda wc: shot_loss(wc, wc.shot),
        model=model_dir,
    output:
        plan=f"{SHOT_DIR}/plan.json",
    params:
        layers=",".join(config["layers"]),
        fraction=lambda wc: shot_fractions(config["compression"]["budgets"][wc.budget], LOSS_SHOTS)[int(wc.shot) - 1],
        first_block=config["compression"]["first_block"],
        convention=config["compression"]["convention"],
        bias=config["compression"]["bias_compensation"],
        loss=lambda wc, input: Path(input.loss).parent,
        groups=config["compression"]["spectral_groups"],
        code=command_version("make-plan"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/loss_shot_plan/{model}/{method}-{budget}-{shot}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    priority: CHAIN_PRIORITY
    shell:
        LOSS_PLAN_SHELL


rule loss_shot_model:
    input:
        plan=rules.loss_shot_plan.output.plan,
        factors="results/{model}/factors/{method}",
        model=model_dir,
    output:
        model=temp(directory(f"{SHOT_DIR}/model")),
    params:
        factors=lambda wc, input: Path(input.factors).parent,
        streamed=config["streamed"],
        dtype=config["dtype"],
        code=command_version("compress"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/loss_shot_model/{model}/{method}-{budget}-{shot}.log",
    resources:
        mem_mb=plan_mem_mb("compress_model"),
        disk_mb=plan_disk_mb("compress_model"),
        runtime=lambda wc: int(10 + 10 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        COMPRESS_SHELL


rule loss_shot_gradients:
    input:
        model=model_dir,
        compressed=rules.loss_shot_model.output.model,
        tokens=rules.tokenize_calibration.output.tokens,
    output:
        gradients=directory(f"{SHOT_DIR}/gradients"),
    params:
        layers=",".join(config["layers"]),
        full=str(config["gradients"]["full"]).lower(),
        dtype=config["gradients"]["dtype"],
        device=config["device"],
        batch_size=config["gradients"]["batch_size"],
        streamed=config["streamed"],
        compressed=lambda wc, input: f"--compressed {input.compressed} ",
        code=command_version("gradients"),
    conda:
        "../envs/gpu-stages.yaml"
    log:
        "results/logs/loss_shot_gradients/{model}/{method}-{budget}-{shot}.log",
    benchmark:
        "results/benchmarks/loss_shot_gradients/{model}/{method}-{budget}-{shot}.tsv"
    threads: plan_threads("collect_gradients")
    resources:
        mem_mb=plan_mem_mb("collect_gradients"),
        disk_mb=plan_disk_mb("collect_gradients"),
        runtime=lambda wc: int(20 + 60 * model_params_b(wc.model)),
        gpu=plan_gpus("collect_gradients"),
    priority: CHAIN_PRIORITY
    shell:
        GRADIENTS_SHELL


rule loss_shot_spectra:
    input:
        factors="results/{model}/factors/{method}",
        features="results/{model}/features",
        gradients=rules.loss_shot_gradients.output.gradients,
        model=model_dir,
    output:
        loss=directory(f"{SHOT_DIR}/loss/{{method}}"),
    params:
        layers=",".join(config["layers"]),
        results=lambda wc, input: Path(input.features).parent,
        factors=lambda wc, input: Path(input.factors).parent,
        bias=config["compression"]["bias_compensation"],
        gradients=lambda wc, input: f"--gradients {input.gradients} ",
        code=command_version("loss-spectra"),
    conda:
        "../envs/cpu-stages.yaml"
    log:
        "results/logs/loss_shot_spectra/{model}/{method}-{budget}-{shot}.log",
    benchmark:
        "results/benchmarks/loss_shot_spectra/{model}/{method}-{budget}-{shot}.tsv"
    threads: plan_threads("loss_spectra")
    resources:
        mem_mb=plan_mem_mb("loss_spectra"),
        disk_mb=plan_disk_mb("loss_spectra"),
        runtime=lambda wc: int(10 + 30 * model_params_b(wc.model)),
    priority: CHAIN_PRIORITY
    shell:
        LOSS_SPECTRA_SHELL
