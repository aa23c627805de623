# The loss allocation in shots (compression.loss_shots = N > 1), as LLM Surgeon re-estimates its curvature
# between shots: shot j of N allocates every layer at the fraction shot_fractions(budget, N)[j - 1] by the loss
# criterion weighed with the output gradients of the model shot j - 1 compressed (shot 1: the dense model's,
# rule collect_gradients). Shots 1..N-1 live in results/{model}/loss_shots/{method}-{budget}/{shot}/; rule
# loss_plan makes shot N, the loss variant's plan. Their models are temporary, kept only for the gradient pass.
# Each shot's rule is the stage's own rule (loss_plan, compress_model, collect_gradients, loss_spectra) with
# the shot's files: its settings, resources and command have one home there.

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


use rule loss_plan as loss_shot_plan with:
    input:
        loss=lambda wc: shot_loss(wc, wc.shot),
        model=model_dir,
    output:
        plan=f"{SHOT_DIR}/plan.json",
    params:
        fraction=lambda wc: shot_fractions(config["compression"]["budgets"][wc.budget], LOSS_SHOTS)[int(wc.shot) - 1],
    log:
        "results/logs/loss_shot_plan/{model}/{method}-{budget}-{shot}.log",


use rule compress_model as loss_shot_model with:
    input:
        plan=rules.loss_shot_plan.output.plan,
        factors="results/{model}/factors/{method}",
        model=model_dir,
    output:
        model=temp(directory(f"{SHOT_DIR}/model")),
    log:
        "results/logs/loss_shot_model/{model}/{method}-{budget}-{shot}.log",
    benchmark:
        "results/benchmarks/loss_shot_model/{model}/{method}-{budget}-{shot}.tsv"


use rule collect_gradients as loss_shot_gradients with:
    input:
        model=model_dir,
        compressed=rules.loss_shot_model.output.model,
        tokens=rules.tokenize_calibration.output.tokens,
    output:
        gradients=directory(f"{SHOT_DIR}/gradients"),
    params:
        compressed=lambda wc, input: f"--compressed {input.compressed} ",
    log:
        "results/logs/loss_shot_gradients/{model}/{method}-{budget}-{shot}.log",
    benchmark:
        "results/benchmarks/loss_shot_gradients/{model}/{method}-{budget}-{shot}.tsv"


use rule loss_spectra as loss_shot_spectra with:
    input:
        factors="results/{model}/factors/{method}",
        features="results/{model}/features",
        gradients=rules.loss_shot_gradients.output.gradients,
        model=model_dir,
    output:
        loss=directory(f"{SHOT_DIR}/loss/{{method}}"),
    params:
        gradients=lambda wc, input: f"--gradients {input.gradients} ",
    log:
        "results/logs/loss_shot_spectra/{model}/{method}-{budget}-{shot}.log",
    benchmark:
        "results/benchmarks/loss_shot_spectra/{model}/{method}-{budget}-{shot}.tsv"
