# The quick target (`snakemake --cores 2 quick`): a first Table 1 and comparisons table in minutes. The dense
# model and quick.methods at quick.budget (uniform allocation), scored on the first quick.limit test documents
# per task and quick.perplexity_docs perplexity documents. Everything before the scores (calibration,
# statistics, eigenvectors, factor caches, compressed folders, scorer checks) is the default target's own
# files, so the default run that follows computes none of them again.

QUICK = config["quick"]


def quick_variants():
    """`base` and `<method>-<budget>` for each of quick.methods (names: sfsd/decompose/variants.py) at
    quick.budget, or the first of compression.budgets (none when there is none)."""
    budget = QUICK["budget"] or next(iter(config["compression"]["budgets"]), None)
    return ["base"] + ([f"{m}-{budget}" for m in QUICK["methods"]] if budget else [])


def quick_limit():
    """Test documents per task: quick.limit, never more than the default run's evaluation.limit."""
    return QUICK["limit"] if EVAL["limit"] is None else min(QUICK["limit"], EVAL["limit"])


def quick_perplexity_docs():
    docs = EVAL["perplexity"]["max_docs"]
    return QUICK["perplexity_docs"] if docs is None else min(QUICK["perplexity_docs"], docs)


use rule evaluate_model as evaluate_quick with:
    output:
        rows="results/{model}/eval/quick/{variant}.parquet",
        docs="results/{model}/eval/quick/{variant}.docs.parquet",
    params:
        limit=f"--limit {quick_limit()}",
        ppl=perplexity_args_for(quick_perplexity_docs()),
    log:
        "results/logs/evaluate_quick/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_quick/{model}/{variant}.tsv"


use rule combine_results as combine_quick with:
    input:
        rows=expand("results/{{model}}/eval/quick/{variant}.parquet", variant=quick_variants()),
        checks=scorer_checks_of(quick_variants),
    output:
        results="results/{model}/eval/quick/results.parquet",
    log:
        "results/logs/combine_quick/{model}.log",


use rule paper_table as paper_table_quick with:
    input:
        results=rules.combine_quick.output.results,
    output:
        md=report(
            "results/tables/{model}/quick/table1.md",
            caption="../workflow/report/table1.rst",
            category="Quick",
        ),
        csv="results/tables/{model}/quick/table1.csv",
    log:
        "results/logs/paper_table_quick/{model}.log",


use rule comparisons_table as comparisons_quick with:
    input:
        docs=expand("results/{{model}}/eval/quick/{variant}.docs.parquet", variant=quick_variants()),
        checks=scorer_checks_of(quick_variants),
    output:
        md=report(
            "results/tables/{model}/quick/comparisons.md",
            caption="../workflow/report/comparisons.rst",
            category="Quick",
        ),
        csv="results/tables/{model}/quick/comparisons.csv",
    log:
        "results/logs/comparisons_quick/{model}.log",


rule quick:
    input:
        expand("results/tables/{model}/quick/{table}.md", model=MODELS,
               table=("table1", "comparisons") if len(quick_variants()) > 1 else ("table1",)),
    localrule: True
