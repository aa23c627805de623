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


def perplexity_args_for(max_docs):
    """The perplexity arguments of `python -m sfsd evaluate` with at most `max_docs` documents (None: all)."""

    def args_of(wildcards, input):
        ppl = EVAL["perplexity"]
        if ppl["source"] == "none":
            return "--ppl-source none"
        # the leading search_fraction of the documents belongs to the rank search: never scored here
        args = (f"--ppl-source {ppl['source']} --ppl-window {ppl['window']} --ppl-bos {ppl['bos']} "
                f"--ppl-search-fraction {config['splits']['search_fraction']} --ppl-max-docs {max_docs}")
        if ppl["source"] in ("text_file", "jsonl_file"):
            args += f" --ppl-path {shlex.quote(str(input.ppl_text))} --ppl-text-field {shlex.quote(ppl['text_field'])}"
        return args

    return args_of


perplexity_args = perplexity_args_for(EVAL["perplexity"]["max_docs"])


def perplexity_input(wildcards):
    """A local perplexity text file is an input, so editing it reruns the evaluation."""
    ppl = EVAL["perplexity"]
    return ppl["path"] if ppl["source"] in ("text_file", "jsonl_file") else []


def scorer_checks_of(variants):
    """With the native scorer: its check against lm-eval (check_scorer) on the first two of `variants` (a
    function: the base model and the first compressed one, whose low-rank layers it checks), when
    evaluation.check_docs > 0."""

    def checks(wildcards):
        if EVAL["scorer"] != "native" or not EVAL["check_docs"]:
            return []
        return expand("results/{model}/eval/scorer_check/{variant}.json", model=wildcards.model,
                      variant=variants()[:2])

    return checks


scorer_checks = scorer_checks_of(lambda: evaluated_variants())
