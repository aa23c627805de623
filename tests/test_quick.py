"""The quick target on a tiny random Llama: its tables from an empty results/, and a default run after it
that computes none of what the two share."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from helpers import base_config, new_run, planned_jobs, snakemake

pytestmark = pytest.mark.slow  # one real run of the quick target (about a minute on 2 cores)


def planned(proc) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job of a dry run."""
    out = proc.stdout + proc.stderr
    jobs = []
    for m in re.finditer(r"(?m)^(?:local)?(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n)*)", out):
        wildcards = re.search(r"wildcards: (.*)", m.group(2))
        jobs.append((m.group(1), wildcards.group(1) if wildcards else ""))
    return jobs


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_llama, calibration_text_file):
    snakefile, workdir = new_run(tmp_path_factory.mktemp("quick"))
    config = base_config(tiny_llama, calibration_text_file)  # the tiny model, one budget (b80)
    config["evaluation"] = {"tasks": ["arc_easy", "winogrande"], "limit": 6, "batch_size": 4, "check_docs": 2,
                            "perplexity": {"source": "lambada", "window": 32, "max_docs": 20}}
    config["quick"] = {"budget": "b80", "limit": 3, "perplexity_docs": 5}
    config["speed"] = {"prompt_tokens": 16, "decode_tokens": 4, "batch_sizes": [1], "repeats": 1}
    proc = snakemake(snakefile, workdir, config, "quick")
    return snakefile, workdir, config, proc


def test_quick_writes_both_tables_from_its_own_scores(quick_run):
    _, workdir, _, _ = quick_run
    tables = workdir / "results" / "tables" / "tiny" / "quick"
    assert {p.name for p in tables.iterdir()} >= {"table1.md", "table1.csv", "comparisons.md", "comparisons.csv"}
    rows = pd.read_parquet(workdir / "results" / "tiny" / "eval" / "quick" / "results.parquet")
    assert set(rows["plan"]) == {"base", "feature-b80", "whitened-b80", "weight-b80"}
    # quick.limit documents per task, not evaluation.limit
    assert set(rows.loc[rows["metric"] != "ppl", "n"]) == {3}
    assert set(rows["ppl_docs"].dropna()) <= {1, 2, 3, 4, 5}  # of quick.perplexity_docs, not max_docs (20)
    comparisons = pd.read_csv(tables / "comparisons.csv")
    assert {"feature-b80", "whitened-b80", "weight-b80"} <= set(comparisons["a"]) | set(comparisons["b"])
    assert (comparisons["n_docs"] == 2 * 3).all()  # paired over both tasks' documents


def test_the_default_run_after_quick_computes_nothing_they_share(quick_run):
    snakefile, workdir, config, _ = quick_run
    jobs = planned(snakemake(snakefile, workdir, config, "--dry-run"))
    rules = {rule for rule, _ in jobs}
    shared = {"prepare_model", "calibration_texts", "tokenize_calibration", "export_tasks", "eval_splits",
              "collect_features", "eigendecompose", "eigen_summary"}
    assert not rules & shared, sorted(rules & shared)
    made = {"feature-b80", "whitened-b80", "weight-b80"}
    for rule, wildcards in jobs:
        if rule in ("make_plan", "compress_model"):
            assert not any(f"={name}" in wildcards for name in made), (rule, wildcards)
        if rule == "factor_cache":
            assert "method=asvd" in wildcards, wildcards  # the one method quick did not use
        if rule == "check_scorer":  # the base model and feature-b80 are checked by both targets
            assert "variant=base" not in wildcards and "variant=feature-b80" not in wildcards
    # the default run scores every variant on all its documents (evaluation.limit), quick's scores are its own
    assert ("evaluate_model", "model=tiny, variant=base") in jobs


def test_quick_again_has_nothing_to_do(quick_run):
    snakefile, workdir, config, _ = quick_run
    assert planned_jobs(snakemake(snakefile, workdir, config, "quick", "--dry-run")) == {}


def test_the_run_says_its_stages_at_the_start_and_its_tables_at_the_end(quick_run):
    *_, proc = quick_run
    out = proc.stderr
    plan = [line for line in out.splitlines() if line.startswith("run plan: ")]
    # one line per stage with its jobs (no earlier timing in a fresh folder), then the total
    assert any(line.split()[2:4] == ["collect_features", "1"] for line in plan), plan
    assert any(line.split()[2:4] == ["evaluate_quick", "4"] for line in plan), plan
    assert "per-block jobs are added once collect_features has run" in plan[-1]
    assert out.index("run plan: ") < out.index("Finished job")  # before the first job ends
    assert any(line.startswith("finished: tables in results/tables/tiny/quick") for line in out.splitlines())
