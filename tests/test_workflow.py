"""The real Snakefile on a tiny random Llama (grouped-query attention): stage outputs, and what
reruns when config or code changes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import new_run, planned_jobs, snakemake
from sfsd.io import load_tensors, read_json


# Every test here reads one real run of the tiny model's workflow (about 2 minutes on 2 cores, the reruns
# checked after it several more): `slow`, so `pytest -m "not slow"` is the quick suite; plain `pytest` runs them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama, calibration_text_file):
    root = tmp_path_factory.mktemp("wf")
    snakefile, workdir = new_run(root)
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 24, "seq_len": 32},
        "collection": {"batch_size": 4},
        "device": "cpu",
        # every method, and the allocation that needs no gradient pass (as helpers.base_config)
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0, "methods": ["feature", "weight", "whitened", "asvd"],
                        "allocations": ["uniform", "spectral"]},
        "evaluation": {"tasks": ["arc_easy", "winogrande"], "limit": 4, "batch_size": 4,
                       "perplexity": {"source": "lambada", "window": 32, "max_docs": 20}},
        "speed": {"prompt_tokens": 16, "decode_tokens": 4, "batch_sizes": [1, 2], "repeats": 1, "methods": None},
    }
    # every job's log also lists the modules it imported (test_every_command_imports_only_...)
    snakemake(snakefile, workdir, config, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    return snakefile, workdir, config


def tiny_model_dir(finished_run) -> str:
    return finished_run[2]["models"]["tiny"]["path"]


def test_stage_outputs(finished_run):
    _, workdir, _ = finished_run
    results = workdir / "results" / "tiny"
    manifest = read_json(results / "features" / "manifest.json")
    assert manifest["n_blocks"] == 2
    assert list(manifest["groups"]) == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    stats, meta = load_tensors(results / "features" / "block_001.safetensors")
    assert set(stats) == {f"{g}.{k}" for g in manifest["groups"] for k in ("xxt", "xsum", "xabs", "count")}
    assert stats["attn_in.xxt"].shape == (32, 32) and stats["mlp_out.xxt"].shape == (48, 48)
    assert stats["attn_in.xxt"].dtype.is_floating_point and stats["attn_in.xxt"].dtype.itemsize == 8
    assert int(stats["attn_in.count"]) == manifest["tokens"] > 0
    assert meta["calibration_digest"] == manifest["calibration_digest"]
    eig, meta = load_tensors(results / "eigen" / "block_000.safetensors")
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32), "gate_proj": (48, 32),
              "up_proj": (48, 32), "down_proj": (32, 48)}  # (out, in): the top min(in, out) eigenpairs are stored
    for linear, (out, inp) in shapes.items():
        assert eig[f"{linear}.eigenvectors"].shape == (out, min(out, inp))
        values = eig[f"{linear}.eigenvalues"]
        assert values.shape == (min(out, inp),) and bool((values[:-1] >= values[1:]).all())
        assert eig[f"{linear}.mean"].shape == (out,)
    summary = read_json(results / "eigen" / "summary.json")
    assert [b["block"] for b in summary["blocks"]] == [0, 1]
    # plans at the budget, and compressed models that load back with their plan
    plan = read_json(workdir / "results" / "tiny" / "plans" / "feature-b80.json")
    assert 0.75 < plan["notes"]["params_fraction"] <= 0.8
    from sfsd.decompose.compress import load_compressed
    from sfsd.decompose.plan import count_params
    from sfsd.model.shapes import model_shapes

    model, saved_plan = load_compressed(workdir / "results" / "tiny" / "compressed" / "feature-b80")
    assert sum(p.numel() for p in model.parameters()) == count_params(model_shapes(tiny_model_dir(finished_run)),
                                                                       saved_plan)["model"]["compressed"]
    # the inference cost of the dense model and of each method's compressed model, as ratios to the dense one
    speed = (workdir / "results" / "tables" / "tiny" / "speed.md").read_text()
    assert "| base | 100.0 |" in speed and "(1.00x)" in speed
    assert all(f"| {m}-b80 |" in speed for m in ("feature", "weight", "whitened", "asvd")), speed
    assert "cpu, 2 threads; prompts of 16 tokens, 4 decoded tokens" in speed
    # calibration texts are recorded with their ids
    texts = (workdir / "results" / "calibration" / "texts.jsonl").read_text().splitlines()
    assert len(texts) == 24


def test_results_and_table_from_cached_results(finished_run):
    import pyarrow.parquet as pq

    snakefile, workdir, config = finished_run
    results = pq.read_table(workdir / "results" / "tiny" / "results.parquet").to_pylist()
    variants = {(r["method"], r["plan"]) for r in results}
    # every method of the schema's default, under each allocation, at the same size
    assert variants == {("baseline", "base")} | {(m, f"{m}{a}-b80") for m in ("feature", "weight", "whitened", "asvd")
                                                 for a in ("", "-spectral")}
    sizes = {r["plan"]: r["params_model"] for r in results}
    assert all(sizes[f"{m}-spectral-b80"] <= sizes[f"{m}-b80"] for m in ("feature", "weight", "whitened", "asvd"))
    test_rows = [r for r in results if r["metric"] == "acc"]
    assert {r["task"] for r in test_rows} == {"arc_easy", "winogrande"}
    # lm-eval's own metrics: acc_norm for ARC-Easy, none for WinoGrande (its config defines acc only)
    assert {r["task"] for r in results if r["metric"] == "acc_norm"} == {"arc_easy"}
    assert all(r["split"] == "test" and r["n"] == 4 and r["limit"] == 4 for r in test_rows)
    assert all(r["scorer"] == "native" and r["lm_eval_version"] for r in test_rows)
    # the native scorer was checked against lm-eval on the base model and the first compressed one
    for variant in ("base", "feature-b80"):
        check = read_json(workdir / "results" / "tiny" / "eval" / "scorer_check" / f"{variant}.json")
        assert check["mismatches"] == [] and check["docs"] == 2 * 4
    base = next(r for r in results if r["plan"] == "base")
    assert base["params_model"] == base["params_model_dense"] and base["params_model_fraction"] == 1.0
    assert any(r["metric"] == "ppl" and r["window"] == 32 for r in results)
    table = workdir / "results" / "tables" / "tiny" / "table1.md"
    text = table.read_text()
    for label in ("Baseline", "Feature space (SFSD)", "Weight space (SVD)", "Whitened SVD (SVD-LLM)"):
        assert label in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    for column in ("params_M", "params_%", "decoder_linear_%", "MACs_per_token_M", "arc_easy", "winogrande",
                   "average", "ppl_lambada_32"):
        assert column in header
    # the table is remade from cached results alone: deleting it reruns only its own rule
    table.unlink()
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run")) == {"paper_table": 1, "all": 1}
    snakemake(snakefile, workdir, config)
    assert table.read_text() == text


def test_complete_run_has_nothing_to_do(finished_run):
    snakefile, workdir, config = finished_run
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run")) == {}


def test_eigen_setting_reruns_eigen_only(finished_run):
    snakefile, workdir, config = finished_run
    changed = {**config, "eigen": {"save_dtype": "float64"}}
    jobs = planned_jobs(snakemake(snakefile, workdir, changed, "--dry-run"))
    # and what is made from the eigenvectors: factor caches and compressed models, never plans; the
    # spectra, the tables/figures made from the new results, and the uniform models' inference cost
    # (four methods, each uniform and spectral: the spectral plans read the factor caches' spectra)
    assert jobs == {"eigendecompose": 2, "eigen_summary": 1, "factor_cache": 4, "spectral_plan": 4,
                    "compress_model": 8, "evaluate_model": 8, "check_scorer": 1, "combine_results": 1,
                    "paper_table": 1, "comparisons_table": 1, "spectra": 1, "figure_spectra": 1, "methods_table": 1,
                    "figure_allocations": 1, "inference_speed": 4, "speed_table": 1, "all": 1}


def test_calibration_setting_reruns_collection(finished_run):
    snakefile, workdir, config = finished_run
    changed = {**config, "calibration": {**config["calibration"], "num_samples": 20}}
    jobs = planned_jobs(snakemake(snakefile, workdir, changed, "--dry-run"))
    assert jobs.get("calibration_texts") == 1 and jobs.get("collect_features") == 1


def test_dtype_setting_reruns_every_job_that_runs_the_model(finished_run):
    """dtype reruns collection (collection.dtype auto follows it) and everything made from it, and the base
    model's evaluation, scorer check and speed run; never the calibration text, tokens, tasks, splits or
    uniform plans (also for a change between auto and the dtype it resolves to: the rules pass the setting,
    which does not change when a model is downloaded). collection.dtype alone reruns collection and what is
    made from it, not the base model's evaluation."""
    snakefile, workdir, config = finished_run
    jobs = planned_jobs(snakemake(snakefile, workdir, {**config, "dtype": "bfloat16"}, "--dry-run"))
    # (the eigendecompositions follow collection, a checkpoint: a dry run lists them once it has run)
    expected = {"collect_features": 1, "factor_cache": 4, "compress_model": 8, "evaluate_model": 9,
                "check_scorer": 2, "inference_speed": 5}
    assert {k: jobs.get(k) for k in expected} == expected, jobs
    assert not {"calibration_texts", "tokenize_calibration", "export_tasks", "eval_splits", "make_plan"} & set(jobs)
    changed = {**config, "collection": {**config["collection"], "dtype": "bfloat16"}}
    jobs = planned_jobs(snakemake(snakefile, workdir, changed, "--dry-run"))
    expected = {"collect_features": 1, "factor_cache": 4, "compress_model": 8, "evaluate_model": 8,
                "check_scorer": 1, "inference_speed": 4}
    assert {k: jobs.get(k) for k in expected} == expected, jobs


def rule_commands(snakefile: Path) -> dict[str, str]:
    """{rule: the `python -m sfsd` command its shell runs} of every rule of the workflow."""
    out = {}
    for smk in (snakefile.parent / "rules").glob("*.smk"):
        for block in re.split(r"(?m)^(?=(?:rule|checkpoint) )", smk.read_text()):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            command = re.search(r"python -m sfsd --threads \{threads\} ([a-z-]+)", block)
            if name and command:
                out[name.group(1)] = command.group(1)
    return out


def job_reasons(proc) -> list[tuple[str, str]]:
    """(rule, reason) of every job of a dry run."""
    out = proc.stdout + proc.stderr
    return [(m.group(1), next((line for line in m.group(2).splitlines() if "reason:" in line), ""))
            for m in re.finditer(r"(?m)^(?:local)?(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n)*)", out)]


def test_every_command_imports_only_modules_its_rule_digests(finished_run):
    """The finished run's jobs ran with PYTHONPROFILEIMPORTTIME (see finished_run): every sfsd module a
    job really imported is among the modules whose digest its rule's params hold."""
    from sfsd.provenance import command_modules

    snakefile, workdir, _ = finished_run
    commands = rule_commands(snakefile)
    package = snakefile.parent / "workflow" / "sfsd"
    checked = 0
    for rule, command in commands.items():
        for log in (workdir / "results" / "logs" / rule).rglob("*.log"):
            text = log.read_text()
            if "import time:" not in text:  # remade by a later test's run, without the import log
                continue
            imported = set(re.findall(r"^import time:.*\| +sfsd\.([\w.]+)\s*$", text, re.M))
            assert imported, log
            assert imported <= set(command_modules(command, package)), (rule, imported - set(command_modules(command, package)))
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("module", ["features.eigen", "evaluate.items", "report.compare", "features.calibration"])
def test_editing_a_module_reruns_exactly_the_rules_whose_commands_import_it(finished_run, module):
    """A dry run after an edit: every rule whose command imports the module is planned, and no other rule
    has changed params (rules downstream of a changed job rerun only for their updated inputs)."""
    from sfsd.provenance import command_modules

    snakefile, workdir, config = finished_run
    commands = rule_commands(snakefile)
    package = snakefile.parent / "workflow" / "sfsd"
    path = package / f"{module.replace('.', '/')}.py"
    original = path.read_text()
    path.write_text(original + "\n# an edit of this module\n")
    try:
        jobs = job_reasons(snakemake(snakefile, workdir, config, "--dry-run"))
    finally:
        path.write_text(original)
    importing = {r for r, c in commands.items() if module in command_modules(c, package)}
    planned = {r for r, _ in jobs}
    own_change = {r for r, reason in jobs if "Params have changed" in reason}
    assert own_change and own_change <= importing
    assert {r for r, reason in jobs if "Params have changed" not in reason} - {"all"} <= \
        {r for r, reason in jobs if "Input files updated by another job" in reason}
    assert importing & {r for r in commands if (workdir / "results" / "logs" / r).exists()} <= planned
    if module == "features.eigen":
        assert "collect_features" not in planned and "eigendecompose" in own_change
    if module == "features.calibration":  # evaluation and the search read the calibration texts' ids
        assert {"calibration_texts", "evaluate_model"} <= planned


def test_search_outputs_and_what_a_tolerance_change_reruns(finished_run):
    import json

    import pyarrow.parquet as pq

    snakefile, workdir, base_config = finished_run
    config = {**base_config, "search": {"enabled": True, "first_block": -1, "search_limit": 6, "curve_limit": 4}}
    snakemake(snakefile, workdir, config)  # on top of the finished run: only the search and what it feeds
    out = workdir / "results" / "tiny" / "search" / "feature-accuracy-average"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in log] == [f"1.{n}" for n in ("down_proj", "up_proj", "gate_proj", "o_proj", "v_proj",
                                                             "k_proj", "q_proj")]  # first_block -1: the top block
    plan = read_json(out / "plan.json")
    assert set(plan["layers"]) == {r["layer"] for r in log}
    assert all(e == ({"method": "dense"} if r["rank"] is None else {"method": "feature", "rank": r["rank"]})
               for r in log for e in [plan["layers"][r["layer"]]])
    curve = pq.read_table(out / "curve.parquet").to_pylist()
    assert {r["layers_done"] for r in curve} == {0, 7}
    assert {r["task"] for r in curve} == {"arc_easy", "winogrande"}
    summary = read_json(out / "summary.json")
    assert summary["layers_searched"] == 7 and summary["search_block_forwards"] > 0
    assert not (out.parent / "feature-accuracy-average.state.jsonl").exists()
    # the searched model is evaluated with the others
    results = pq.read_table(workdir / "results" / "tiny" / "results.parquet").to_pylist()
    assert any(r["plan"] == "search-feature-accuracy-average" and r["method"] == "feature" for r in results)
    # a new tolerance reruns the search and what is made from it, never collection or eigendecomposition
    changed = {**config, "search": {**config["search"], "delta": 0.5}}
    jobs = planned_jobs(snakemake(snakefile, workdir, changed, "--dry-run"))
    assert jobs.get("search") == 1
    assert not {"collect_features", "eigendecompose", "factor_cache", "make_plan", "spectral_plan"} & set(jobs)
    # of the compressed models, only the search's own cut at the budget (search.budgets) is remade
    assert jobs.get("searched_plan") == 1 and jobs.get("compress_model") == 1
