# Helpers of rules/evaluate.smk and of other stages that score the benchmarks (the task source of
# evaluation.source) and perplexity arguments.
import shlex

EVAL = config["evaluation"]


def eval_tasks_input(wildcards):
    """The exported local tasks (evaluation.source local); nothing for the hub source, whose jobs load
    lm-eval's built-in tasks themselves. Rules that score benchmarks take this as an input..."""
    return rules.export_tasks.output.tasks if EVAL["source"] == "local" else []


def eval_task_args(wildcards, input):
    """...and these CLI arguments (`--task-source`, `--tasks-dir`) of `python -m sfsd evaluate`."""
    if EVAL["source"] == "local":
        return f"--task-source local --tasks-dir {shlex.quote(str(input.tasks))}"
    return "--task-source hub"


def perplexity_args(wildcards, input):
    ppl = EVAL["perplexity"]
    if ppl["source"] == "none":
        return "--ppl-source none"
    # the leading search_fraction of the documents belongs to the rank search: never scored here
    args = (f"--ppl-source {ppl['source']} --ppl-window {ppl['window']} --ppl-bos {ppl['bos']} "
            f"--ppl-search-fraction {config['splits']['search_fraction']} --ppl-max-docs {ppl['max_docs']}")
    if ppl["source"] in ("text_file", "jsonl_file"):
        args += f" --ppl-path {shlex.quote(str(input.ppl_text))} --ppl-text-field {shlex.quote(ppl['text_field'])}"
    return args


def perplexity_input(wildcards):
    """A local perplexity text file is an input, so editing it reruns the evaluation."""
    ppl = EVAL["perplexity"]
    return ppl["path"] if ppl["source"] in ("text_file", "jsonl_file") else []


def scorer_checks(wildcards):
    """With the native scorer: its check against lm-eval (check_scorer) on the base model and on the
    first compressed variant (the low-rank layers), when evaluation.check_docs > 0."""
    if EVAL["scorer"] != "native" or not EVAL["check_docs"]:
        return []
    variants = evaluated_variants()[:2]
    return expand("results/{model}/eval/scorer_check/{variant}.json", model=wildcards.model, variant=variants)
