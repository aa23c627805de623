"""Figures and the methods table from cached results: the plotting functions on synthetic search outputs
(in the surgical search's exact file formats), their errors on malformed input, and the figure rules in
the real Snakefile on the tiny model (only figure jobs rerun; the report builds)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sfsd.errors import DataError
from sfsd.io import save_tensors
from sfsd.model.registry import LINEAR_ORDER, SEARCH_ORDER
from sfsd.report import figures as F
from sfsd.report import spectra as S
from sfsd.report import tables as T

from helpers import new_run, planned_jobs, run_cli, snakemake

# (out, in) of a small Llama-like block: hidden 64, grouped-query k/v of 32, MLP 96
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
TASKS = ("piqa", "arc_easy")
N_BLOCKS, OTHER_PARAMS = 6, 2 * 320 * 64  # embeddings + lm_head


def write_search(root: Path, name: str, *, first_block: int = 2, seed: int = 0, n: int = 40) -> dict:
    """A finished search in the format of results/{model}/search/{search}/: log.jsonl (one entry per layer,
    last block first), curve.parquet (start row + one point per finished block, every task, plus
    perplexity for perplexity searches) and plan.json. Returns the final ranks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    method, mode, target = F.parse_search_name(name)
    rng = random.Random(seed)
    dense = N_BLOCKS * sum(o * i for o, i in SHAPES.values()) + OTHER_PARAMS
    params = dense
    folder = root / name
    folder.mkdir(parents=True)
    log, curve, ranks = [], [], {}

    def point(layers_done: int, block: int):
        drop = 1 - params / dense
        for t in TASKS:
            base = {"piqa": 0.62, "arc_easy": 0.48}[t]
            for metric in ("acc", "acc_norm"):
                curve.append({"model": "tiny", "method": method, "search": name, "mode": mode, "target": target,
                              "layers_done": layers_done, "block": block, "params_model": params,
                              "params_model_fraction": params / dense, "task": t, "split": "test",
                              "metric": metric, "value": base - 0.5 * drop ** 2 + (rng.random() - 0.5) * 0.02 * drop,
                              "n": n})
        if mode == "perplexity":
            curve.append({**curve[-1], "task": target, "metric": "ppl", "value": 40 * math.exp(3 * drop), "n": 5000})

    point(0, -1)
    step = 0
    for block in range(N_BLOCKS - 1, first_block - 1, -1):
        for linear in SEARCH_ORDER:
            out_f, in_f = SHAPES[linear]
            kappa = in_f * out_f // (in_f + out_f)
            rank = rng.choice([None, 1, kappa // 10, kappa // 2, kappa - 1])
            frac = 1.0 if rank is None else rank * (in_f + out_f) / (in_f * out_f)
            params -= round(out_f * in_f * (1 - frac))
            step += 1
            ranks[(block, linear)] = rank
            log.append({"step": step, "layer": f"{block}.{linear}", "block": block, "linear": linear,
                        "in_features": in_f, "out_features": out_f, "kappa": kappa,
                        "tried": [{"rank": rank or kappa, "score": 0.5, "accepted": rank is not None}],
                        "rank": rank, "score": 0.5, "layer_params_fraction": frac, "params_model": params,
                        "params_model_fraction": params / dense})
        point(step, block)
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    pq.write_table(pa.Table.from_pylist(curve), folder / "curve.parquet")
    plan = {"version": 1, "model": "tiny", "layers": {f"{b}.{lin}": {"method": method, "rank": r} if r else
                                                     {"method": "dense"} for (b, lin), r in ranks.items()}}
    (folder / "plan.json").write_text(json.dumps(plan))
    return {"ranks": ranks, "log": log, "curve": curve, "dense": dense}


def result_rows(n: int = 40) -> list[dict]:
    """Combined evaluation rows (rows.ROW_SCHEMA subset) of a baseline and two methods at two budgets."""
    rows = []
    for method, plan, frac, acc, ppl in (("baseline", "base", 1.0, 0.55, 40.0),
                                         ("feature", "feature-b80", 0.80, 0.50, 60.0),
                                         ("weight", "weight-b80", 0.80, 0.40, 900.0),
                                         ("feature", "feature-b50", 0.50, 0.45, 300.0),
                                         ("weight", "weight-b50", 0.50, 0.30, 2.5e6)):
        common = {"model": "tiny", "method": method, "plan": plan, "split": "test", "n": n,
                  "params_model": int(frac * 1e6), "params_model_fraction": frac}
        for t, offset in zip(TASKS, (0.05, -0.05)):
            rows.append({**common, "task": t, "metric": "acc_norm", "value": acc + offset})
            rows.append({**common, "task": t, "metric": "acc", "value": acc})
        rows.append({**common, "task": "lambada", "metric": "ppl", "value": ppl, "window": 128, "n": 3000})
    return rows


def assert_images(png: Path, svg: Path) -> None:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = svg.read_text()
    assert "<svg" in text and "</svg>" in text


@pytest.fixture
def searches(tmp_path):
    root = tmp_path / "search"
    made = {name: write_search(root, name, seed=i) for i, name in enumerate(
        ["feature-accuracy-piqa", "weight-accuracy-piqa", "feature-accuracy-arc_easy", "feature-perplexity-lambada"])}
    return root, made


def test_search_curves_figure(searches, tmp_path):
    root, made = searches
    names = ["feature-accuracy-piqa", "weight-accuracy-piqa", "feature-accuracy-arc_easy"]
    curves = {n: F.read_curve(root / n / "curve.parquet") for n in names}
    png, svg = tmp_path / "f" / "search_accuracy.png", tmp_path / "f" / "search_accuracy.svg"
    panels = F.plot_search_curves(curves, png, svg, tasks=list(TASKS), metric="acc_norm", results=result_rows(),
                                  title="tiny: accuracy-driven surgical search")
    assert_images(png, svg)
    assert [(p["task"], p["metric"]) for p in panels] == [("piqa", "acc_norm"), ("arc_easy", "acc_norm"),
                                                          ("average", "acc_norm")]
    piqa, arc, avg = panels
    # a task panel shows the searches that targeted it; the average panel every search (none targets it)
    assert [s["search"] for s in piqa["series"]] == ["feature-accuracy-piqa", "weight-accuracy-piqa"]
    assert [s["search"] for s in arc["series"]] == ["feature-accuracy-arc_easy"]
    assert len(avg["series"]) == 3
    feat = made["feature-accuracy-piqa"]["curve"]
    start = [r for r in feat if r["layers_done"] == 0 and r["metric"] == "acc_norm"]
    ours = piqa["series"][0]
    assert ours["x"][0] == 100.0 and ours["x"] == sorted(ours["x"], reverse=True)  # params fall along the search
    assert ours["y"][0] == pytest.approx(100 * next(r["value"] for r in start if r["task"] == "piqa"))
    assert avg["series"][0]["y"][0] == pytest.approx(100 * sum(r["value"] for r in start) / len(start))
    assert piqa["baseline"] == pytest.approx(ours["y"][0])
    # uniform models scored on the curve's 40 docs become points; on other docs they are left out
    points = F.uniform_points(result_rows(), panels)
    assert {p["plan"] for p in points["piqa"]} == {"feature-b80", "weight-b80", "feature-b50", "weight-b50"}
    assert F.uniform_points(result_rows(n=50), panels)["piqa"] == []


def test_perplexity_curves_have_a_log_panel(searches, tmp_path):
    root, _ = searches
    curves = {"feature-perplexity-lambada": F.read_curve(root / "feature-perplexity-lambada" / "curve.parquet")}
    panels = F.plot_search_curves(curves, tmp_path / "p.png", tmp_path / "p.svg", tasks=list(TASKS))
    assert [(p["task"], p["metric"]) for p in panels][-1] == ("lambada", "ppl")
    ppl = panels[-1]["series"][0]["y"]
    assert ppl[0] == pytest.approx(40.0) and ppl[-1] > ppl[0]
    assert_images(tmp_path / "p.png", tmp_path / "p.svg")


def test_layer_budget_heatmap(searches, tmp_path):
    root, made = searches
    names = ["feature-accuracy-piqa", "feature-accuracy-arc_easy"]
    logs = {n: F.read_search_log(root / n / "log.jsonl") for n in names}
    blocks, linears, matrix = F.layer_budget_matrix(logs[names[0]])
    assert blocks == list(range(N_BLOCKS)) and linears == list(LINEAR_ORDER)
    ranks = made[names[0]]["ranks"]
    for b in blocks:
        for j, lin in enumerate(linears):
            out_f, in_f = SHAPES[lin]
            r = ranks.get((b, lin))
            expected = 100.0 if r is None else 100.0 * r * (in_f + out_f) / (in_f * out_f)
            assert matrix[b][j] == pytest.approx(expected)
    assert all(v == 100.0 for v in matrix[0] + matrix[1])  # blocks below first_block were never reached
    panels = F.plot_layer_budgets(logs, tmp_path / "h.png", tmp_path / "h.svg", title="budgets")
    assert_images(tmp_path / "h.png", tmp_path / "h.svg")
    mean = panels["mean of 2 searches"]
    other = F.layer_budget_matrix(logs[names[1]])[2]
    assert mean[4][2] == pytest.approx((matrix[4][2] + other[4][2]) / 2)


def test_energy_curve_and_spectra_rows(tiny_llama, tmp_path):
    curve = S.energy_curve(torch.tensor([1.0, 3.0, 0.0, 4.0, -1e-12]), full_rank=4, points=10)
    assert curve == [(1, 0.5), (2, 0.875), (3, 1.0), (4, 1.0)]
    # an eigen block file (stage 2's format) with made-up feature eigenvalues, the tiny model's real weights
    from sfsd.io import read_parameters

    values = {lin: torch.linspace(10, 0, out) ** 4 for lin, out in
              {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32, "gate_proj": 48, "up_proj": 48,
               "down_proj": 32}.items()}
    path = tmp_path / "block_001.safetensors"
    save_tensors(path, {f"{k}.eigenvalues": v.double() for k, v in values.items()},
                 {"model": "tiny", "block": 1, "architecture": "LlamaForCausalLM", "linears": list(values)})
    rows = S.spectra_rows([path], tiny_llama, points=50)
    gate = [r for r in rows if r["linear"] == "gate_proj"]
    assert {r["full_rank"] for r in gate} == {32} and {r["kappa"] for r in gate} == {32 * 48 // 80}
    w = read_parameters(tiny_llama, ["model.layers.1.mlp.gate_proj.weight"])["model.layers.1.mlp.gate_proj.weight"]
    s2 = torch.linalg.svdvals(w.double()).square()
    weight = {r["rank"]: r["energy"] for r in gate if r["space"] == "weight"}
    assert weight[8] == pytest.approx(float(s2[:8].sum() / s2.sum()), rel=1e-5)
    feature = {r["rank"]: r["energy"] for r in gate if r["space"] == "feature"}
    v = values["gate_proj"].double()
    assert feature[8] == pytest.approx(float(v[:8].sum() / v.sum()))
    assert max(feature) == 32 and sorted(feature.values()) == [feature[r] for r in sorted(feature)]
    S.write_spectra(rows, tmp_path / "spectra.parquet")
    S.plot_spectra(T.read_parquet_rows(tmp_path / "spectra.parquet", "spectra"), tmp_path / "s.png",
                   tmp_path / "s.svg", title="tiny")
    assert_images(tmp_path / "s.png", tmp_path / "s.svg")


def test_methods_table(tmp_path):
    from sfsd.evaluate.rows import write_rows

    write_rows(tmp_path / "results.parquet", result_rows())
    table = T.methods_table(tmp_path / "results.parquet", "acc_norm", tmp_path / "m.md", tmp_path / "m.csv")
    assert [(r["budget"], r["method"]) for r in table] == [
        ("dense", "Baseline"), ("b80", "Feature space (SFSD)"), ("b80", "Weight space (SVD)"),
        ("b50", "Feature space (SFSD)"), ("b50", "Weight space (SVD)")]
    assert table[1]["avg_acc_norm"] == pytest.approx(50.0) and table[1]["delta_vs_baseline"] == pytest.approx(-5.0)
    assert table[4]["ppl"] == 2.5e6
    md = (tmp_path / "m.md").read_text()
    # rows without a majority-class rate: no task is known to be informative, so no informative average
    assert "| b50 | Weight space (SVD) | uniform | weight-b50 | 0.5 | 50.0 | 30.0 | -25.0 |  |  | 2.5e+06 |" in md
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == \
        "budget,method,allocation,variant,params_M,params_%,avg_acc_norm,avg_acc_norm_ci95,delta_vs_baseline," \
        "informative_avg_acc_norm,informative_avg_acc_norm_ci95,informative_delta_vs_baseline,ppl"
    assert table[1]["avg_acc_norm_ci95"] is None  # rows without a stderr: no interval, the value alone


def paper_rows(n: int = 100) -> list[dict]:
    """Results of a baseline and one compressed model on boolq (lm-eval: acc only) and piqa (acc, acc_norm),
    with standard errors and a perplexity interval on the baseline."""
    rows = []
    for method, plan, frac, boolq, piqa, ppl in (("baseline", "base", 1.0, 0.60, 0.70, (40.0, 38.5, 41.7)),
                                                 ("feature", "feature-b80", 0.8, 0.50, 0.60, (60.0, None, None))):
        common = {"model": "tiny", "method": method, "plan": plan, "split": "test", "n": n,
                  "params_model": int(frac * 1e6), "params_model_fraction": frac}
        rows += [{**common, "task": "boolq", "metric": "acc", "value": boolq, "stderr": 0.04},
                 {**common, "task": "piqa", "metric": "acc", "value": 0.1, "stderr": 0.03},
                 {**common, "task": "piqa", "metric": "acc_norm", "value": piqa, "stderr": 0.03},
                 {**common, "task": "lambada", "metric": "ppl", "value": ppl[0], "ci_low": ppl[1], "ci_high": ppl[2],
                  "window": 128, "n": 3000}]
    return rows


def test_methods_table_resolves_the_paper_metric_per_task(tmp_path):
    from sfsd.errors import ConfigError
    from sfsd.evaluate.rows import write_rows

    write_rows(tmp_path / "results.parquet", paper_rows())
    table = T.methods_table(tmp_path / "results.parquet", "paper", tmp_path / "m.md", tmp_path / "m.csv")
    base, feat = table
    # boolq acc and piqa acc_norm, averaged
    assert base["avg_paper"] == pytest.approx(65.0) and feat["avg_paper"] == pytest.approx(55.0)
    assert base["avg_paper_ci95"] == pytest.approx(1.96 * 100 * math.hypot(0.04, 0.03) / 2, abs=0.005)
    assert feat["delta_vs_baseline"] == pytest.approx(-10.0)
    assert (base["ppl_ci_low"], base["ppl_ci_high"]) == (38.5, 41.7) and "ppl_ci_low" not in feat
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == \
        "budget,method,allocation,variant,params_M,params_%,avg_paper,avg_paper_ci95,delta_vs_baseline," \
        "informative_avg_paper,informative_avg_paper_ci95,informative_delta_vs_baseline,ppl,ppl_ci_low,ppl_ci_high"
    md = (tmp_path / "m.md").read_text()
    assert "| dense | Baseline |  | base | 1.0 | 100.0 | 65.0 ± 4.9 | 0.0 |  |  | 40.0 [38.5, 41.7] |" in md
    assert "| b80 | Feature space (SFSD) | uniform | feature-b80 | 0.8 | 80.0 | 55.0 ± 4.9 | -10.0 |  |  | 60.0 |" in md
    assert "boolq acc, piqa acc_norm" in md.splitlines()[0]  # the caption says which metric each task used
    acc = T.methods_table_rows(paper_rows(), "acc")
    assert acc[0]["avg_acc"] == pytest.approx(35.0)
    with pytest.raises(ConfigError, match="no acc_norm for boolq"):
        T.methods_table_rows(paper_rows(), "acc_norm")


def test_search_curves_resolve_the_paper_metric_per_task(tmp_path):
    from sfsd.errors import ConfigError

    curve = []
    for step, frac, drop in ((0, 1.0, 0.0), (7, 0.9, 0.1)):
        common = {"layers_done": step, "params_model_fraction": frac, "split": "test", "n": 40}
        curve += [{**common, "task": "boolq", "metric": "acc", "value": 0.6 - drop},
                  {**common, "task": "piqa", "metric": "acc", "value": 0.2},
                  {**common, "task": "piqa", "metric": "acc_norm", "value": 0.7 - drop}]
    curves = {"feature-accuracy-average": curve}
    panels = F.plot_search_curves(curves, tmp_path / "c.png", tmp_path / "c.svg", tasks=["boolq", "piqa"],
                                  results=paper_rows(40))
    assert [(p["task"], p["metric"]) for p in panels] == [("boolq", "acc"), ("piqa", "acc_norm"), ("average", "paper")]
    avg = panels[2]
    assert avg["metrics"] == {"boolq": "acc", "piqa": "acc_norm"}
    assert avg["series"][0]["y"] == pytest.approx([65.0, 55.0])
    assert F._metric_label("paper") == "accuracy (%, acc or acc_norm per task as lm-eval defines)"
    points = F.uniform_points(paper_rows(40), panels)
    assert [p["y"] for p in points["average"]] == pytest.approx([55.0])  # boolq acc and piqa acc_norm
    assert [p["y"] for p in points["piqa"]] == pytest.approx([60.0])
    acc = F.curve_panels(curves, ["boolq", "piqa"], "acc")
    assert [(p["task"], p["metric"]) for p in acc] == [("boolq", "acc"), ("piqa", "acc"), ("average", "acc")]
    with pytest.raises(ConfigError, match="no acc_norm for boolq"):
        F.curve_panels(curves, ["boolq", "piqa"], "acc_norm")


def test_figures_are_reproducible(searches, tmp_path):
    root, _ = searches
    logs = {"feature-accuracy-piqa": F.read_search_log(root / "feature-accuracy-piqa" / "log.jsonl")}
    F.plot_layer_budgets(logs, tmp_path / "a.png", tmp_path / "a.svg")
    F.plot_layer_budgets(logs, tmp_path / "b.png", tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_cli_figures_from_search_outputs(searches, tmp_path):
    root, _ = searches
    out = tmp_path / "out"
    proc = run_cli("figure-search-curves", "--tasks", "piqa,arc_easy", "--out-png", str(out / "c.png"),
                   "--out-svg", str(out / "c.svg"), str(root / "feature-accuracy-piqa" / "curve.parquet"),
                   str(root / "weight-accuracy-piqa" / "curve.parquet"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("figure-layer-budgets", "--annotate", "--out-png", str(out / "h.png"), "--out-svg",
                   str(out / "h.svg"), str(root / "feature-accuracy-piqa" / "log.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert_images(out / "c.png", out / "c.svg")
    assert_images(out / "h.png", out / "h.svg")


def _break(root: Path, what: str) -> Path:
    import pyarrow.parquet as pq

    folder = root / "feature-accuracy-piqa"
    if what == "curve_column":
        table = pq.read_table(folder / "curve.parquet").drop_columns(["params_model_fraction"])
        pq.write_table(table, folder / "curve.parquet")
        return folder / "curve.parquet"
    if what == "curve_empty":
        pq.write_table(pq.read_table(folder / "curve.parquet").slice(0, 0), folder / "curve.parquet")
        return folder / "curve.parquet"
    if what == "curve_garbage":
        (folder / "curve.parquet").write_bytes(b"PAR1 truncated")
        return folder / "curve.parquet"
    lines = (folder / "log.jsonl").read_text().splitlines()
    if what == "log_json":
        lines[3] = lines[3][:-5]
    elif what == "log_key":
        entry = json.loads(lines[2])
        del entry["layer_params_fraction"]
        lines[2] = json.dumps(entry)
    elif what == "log_fraction":
        lines[1] = json.dumps({**json.loads(lines[1]), "layer_params_fraction": 1.7})
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "log.jsonl"


@pytest.mark.parametrize("what, command, message", [
    ("curve_column", "figure-search-curves", "lacks column(s) ['params_model_fraction']"),
    ("curve_empty", "figure-search-curves", "holds no rows"),
    ("curve_garbage", "figure-search-curves", "is not a readable Parquet file"),
    ("log_json", "figure-layer-budgets", "line 4 is not JSON"),
    ("log_key", "figure-layer-budgets", "line 3 lacks key(s) ['layer_params_fraction']"),
    ("log_fraction", "figure-layer-budgets", "line 2: layer_params_fraction 1.7 is not in [0, 1]"),
])
def test_malformed_search_outputs_fail_in_one_line(searches, tmp_path, what, command, message):
    root, _ = searches
    path = _break(root, what)
    proc = run_cli(command, "--out-png", str(tmp_path / "x.png"), "--out-svg", str(tmp_path / "x.svg"), str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.svg").exists()


def test_bad_search_name_and_missing_inputs():
    with pytest.raises(DataError, match="not <method>-<mode>-<target>"):
        F.parse_search_name("feature-fast-piqa")
    with pytest.raises(DataError, match="missing file"):
        F.read_curve("/nonexistent/curve.parquet")
    with pytest.raises(DataError, match="spectra rows lack"):
        S.plot_spectra([{"block": 0}], "x.png", "x.svg")


# ------------------------------------------------------------------------ the figure rules in the workflow

FIGURE_RULES = {"spectra", "figure_spectra", "methods_table"}
# One real run of the tiny model's workflow takes ~75 s of CPU (15 jobs, each importing torch): with the
# checks below about 2-3 minutes on 2 shared cores, so these are `slow` (plain `pytest` runs them).
workflow_test = pytest.mark.slow


@pytest.fixture(scope="module")
def figure_run(tmp_path_factory, tiny_llama, calibration_text_file):
    """One small run of the real Snakefile: a plan but no compressed models, the base model evaluated on one
    task with the native scorer (the methods table then holds the baseline row only; its contents are
    tested above on synthetic results)."""
    root = tmp_path_factory.mktemp("figwf")
    snakefile, workdir = new_run(root)
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 16, "seq_len": 32},
        "collection": {"batch_size": 8},
        "device": "cpu",
        "compression": {"methods": ["feature"], "budgets": {"b80": 0.8}, "first_block": 0, "save_models": False},
        "evaluation": {"tasks": ["arc_easy"], "limit": 4, "batch_size": 4, "scorer": "native", "compressed": False,
                       "perplexity": {"source": "lambada", "window": 32, "max_docs": 3}},
        "figures": {"dpi": 60},
    }
    # other studies that run by default are not what this test is about
    schema = yaml.safe_load((snakefile.parent / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for study in ("laser", "speed"):
        if "enabled" in schema["properties"].get(study, {}).get("properties", {}):
            config[study] = {"enabled": False}
    snakemake(snakefile, workdir, config)
    return snakefile, workdir, config


@workflow_test
def test_workflow_makes_figures(figure_run):
    _, workdir, _ = figure_run
    figs = workdir / "results" / "figures" / "tiny"
    assert_images(figs / "spectra.png", figs / "spectra.svg")
    spectra = T.read_parquet_rows(workdir / "results" / "tiny" / "eigen" / "spectra.parquet", "spectra")
    assert {r["block"] for r in spectra} == {0, 1} and {r["space"] for r in spectra} == {"feature", "weight"}
    md = (workdir / "results" / "tables" / "tiny" / "methods.md").read_text()
    assert "| dense | Baseline | " in md and "arc_easy" in md


@workflow_test
def test_deleted_figures_rerun_only_figure_jobs(figure_run):
    snakefile, workdir, config = figure_run
    shutil.rmtree(workdir / "results" / "figures")
    (workdir / "results" / "tables" / "tiny" / "methods.md").unlink()
    jobs = planned_jobs(snakemake(snakefile, workdir, config, "--dry-run"))
    assert jobs == {"figure_spectra": 1, "methods_table": 1, "all": 1}
    snakemake(snakefile, workdir, config)
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run")) == {}


@workflow_test
def test_plot_option_reruns_only_figures(figure_run):
    snakefile, workdir, config = figure_run
    jobs = planned_jobs(snakemake(snakefile, workdir, {**config, "figures": {"dpi": 72}}, "--dry-run"))
    assert jobs == {"figure_spectra": 1, "all": 1}
    # the spectra blocks are computed by the spectra rule: it reruns too, never an earlier stage
    jobs = planned_jobs(snakemake(snakefile, workdir, {**config, "figures": {"dpi": 60, "spectra_blocks": [-1]}},
                                  "--dry-run"))
    assert set(jobs) <= FIGURE_RULES | {"all"} and jobs["spectra"] == 1
    # an out-of-range block is a one-line config error naming the key
    proc = snakemake(snakefile, workdir, {**config, "figures": {"spectra_blocks": [7]}}, "--dry-run", check=False)
    assert proc.returncode != 0 and "figures.spectra_blocks: block(s) [7] out of range" in proc.stdout + proc.stderr


@workflow_test
def test_report_builds(figure_run):
    snakefile, workdir, config = figure_run
    snakemake(snakefile, workdir, config, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert "Figures" in html and "spectra.png" in html and "methods.md" in html


@workflow_test
def test_search_figure_rules_in_the_workflow(figure_run, tmp_path):
    """The search-figure rules of the real Snakefile, from search outputs alone: synthetic outputs in the
    search's format stand in for a finished search, and --allowed-rules keeps the search rule itself out
    (as on a machine that holds only copied results)."""
    snakefile, workdir, config = figure_run
    names = ["feature-accuracy-arc_easy", "weight-accuracy-arc_easy"]
    for i, name in enumerate(names):
        write_search(workdir / "results" / "tiny" / "search", name, seed=i)
    searched = {**config, "search": {"enabled": True, "methods": ["feature", "weight"], "modes": ["accuracy"],
                                     "targets": {"accuracy": ["arc_easy"]}}}
    stems = ["search_accuracy", "layer_budgets_feature-accuracy", "layer_budgets_weight-accuracy"]
    targets = [f"results/figures/tiny/{s}.png" for s in stems]
    only = ["--allowed-rules", "figure_search_curves", "figure_layer_budgets"]
    proc = snakemake(snakefile, workdir, searched, "--dry-run", *targets, *only)
    assert planned_jobs(proc) == {"figure_search_curves": 1, "figure_layer_budgets": 2}
    snakemake(snakefile, workdir, searched, *targets, *only)
    figs = workdir / "results" / "figures" / "tiny"
    for stem in stems:
        assert_images(figs / f"{stem}.png", figs / f"{stem}.svg")
    # the figure rules list exactly these targets for this search config
    assert planned_jobs(snakemake(snakefile, workdir, searched, "--dry-run", *targets, *only)) == {}
    # a changed search log remakes its heat map only
    write_search(tmp_path, names[0], seed=7)
    shutil.copy(tmp_path / names[0] / "log.jsonl", workdir / "results" / "tiny" / "search" / names[0] / "log.jsonl")
    assert planned_jobs(snakemake(snakefile, workdir, searched, "--dry-run", *targets, *only)) == {
        "figure_layer_budgets": 1}


def test_allocations_group_by_budget_and_figure(tmp_path):
    """Uniform, spectral and searched variants of one method share a budget group in the methods table and
    become one line each in the allocations figure; the tolerance search stays its own group, off the
    figure."""
    from sfsd.report.allocations import allocation_lines, plot_allocations

    rows = []
    for method, plan, frac, score in (("baseline", "base", 1.0, 0.7), ("feature", "feature-b80", 0.80, 0.6),
                                      ("feature", "feature-spectral-b80", 0.80, 0.62),
                                      ("feature", "search-feature-kl-average-b80", 0.79, 0.61),
                                      ("feature", "feature-b50", 0.5, 0.4), ("feature", "feature-spectral-b50", 0.5, 0.45),
                                      ("feature", "search-feature-kl-average", 0.97, 0.66)):
        common = {"model": "tiny", "method": method, "plan": plan, "split": "test", "n": 100,
                  "params_model": int(frac * 1e6), "params_model_fraction": frac}
        rows += [{**common, "task": "piqa", "metric": "acc_norm", "value": score, "stderr": 0.03},
                 {**common, "task": "lambada", "metric": "ppl", "value": 10 / score, "window": 128, "n": 3000}]
    table = T.methods_table_rows(rows, "acc_norm")
    assert [(r["budget"], r["allocation"]) for r in table] == [
        ("dense", ""), ("search-feature-kl-average", "searched"), ("b80", "uniform"), ("b80", "spectral"),
        ("b80", "searched"), ("b50", "uniform"), ("b50", "spectral")]
    lines = allocation_lines(table)
    assert {k[1:]: [r["variant"] for r in v] for k, v in lines.items()} == {
        ("uniform", ""): ["feature-b50", "feature-b80"], ("spectral", ""): ["feature-spectral-b50", "feature-spectral-b80"],
        ("searched", "kl-average"): ["search-feature-kl-average-b80"]}
    plot_allocations(table, tmp_path / "a.png", tmp_path / "a.svg", title="t")
    assert (tmp_path / "a.png").stat().st_size > 0 and b"<svg" in (tmp_path / "a.svg").read_bytes()[:400]
