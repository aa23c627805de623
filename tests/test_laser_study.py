"""The LASER study (sfsd.laser.study, rules/laser.smk): the baseline point, rate 0, Vendi with every row,
choosing on the search split, and a sweep extended by one rate rerunning only its new points."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import copy_workflow, new_run, planned_jobs, snakemake
from sfsd.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from sfsd.model.loading import load_model

    model, tokenizer = load_model(tiny_llama, device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def requests(tmp_path_factory, tiny):
    """Encoded search-split requests of ARC-Easy (8 docs, 4 choices each) for the tiny model."""
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.evaluate.scoring import build_requests, encode_requests, lmeval_max_length
    from sfsd.tasks.splits import split_doc_ids

    task_dir = tmp_path_factory.mktemp("tasks")
    export_local_tasks(task_dir, ["arc_easy"])
    ids = {"arc_easy": split_doc_ids("arc_easy", None, 1234, 0.1, 0.2, limit=8)}
    ids["arc_easy"].pop("test")
    model, tokenizer = tiny
    enc = encode_requests(tokenizer, build_requests(task_dir, ["arc_easy"], ids), lmeval_max_length(model, tokenizer))
    enc.task_dir, enc.split_ids = task_dir, ids  # for the lm-eval reference below
    return enc


def run(tiny, requests, point, **kw):
    from sfsd.laser.study import run_point

    model, tokenizer = tiny
    return run_point(copy.deepcopy(model), tokenizer, point, requests, model_name="tiny", batch_size=8, **kw)


def test_dont_point_equals_baseline(tiny, requests):
    from sfsd.evaluate.harness import evaluate_lmeval_detailed
    from sfsd.evaluate.scoring import score_multiple_choice
    from sfsd.laser.study import BASELINE

    model, tokenizer = tiny
    plain = score_multiple_choice(model, tokenizer, requests, batch_size=8)
    rows, items, common = run(tiny, requests, BASELINE)
    assert [i["lls"] for i in items] == [s["lls"] for s in plain]  # bit for bit
    assert [i["acc"] for i in items] == [s["acc"] for s in plain]
    # and the unchanged model as lm-eval itself scores it (the evaluation's reference), up to rounding
    _, docs = evaluate_lmeval_detailed(model, tokenizer, requests.task_dir, ["arc_easy"], requests.split_ids,
                                       batch_size=8)
    reference = {d["doc_id"]: d for d in docs}
    for it in items:
        assert it["acc"] == reference[it["doc_id"]]["acc"] and it["acc_norm"] == reference[it["doc_id"]]["acc_norm"]
        assert torch.allclose(torch.tensor(it["lls"]), torch.tensor(reference[it["doc_id"]]["lls"]), rtol=1e-5)
    assert common["method"] == "baseline" and common["plan"] == "dont" and common["laser_matrices"] == 0
    assert common["params_model"] == common["params_model_dense"]
    metrics = {r["metric"]: r for r in rows}
    assert set(metrics) == {"acc", "acc_norm", "logprob", "logprob_token", "top2_acc"}
    assert metrics["acc"]["value"] == sum(s["acc"] for s in plain) / len(plain) and metrics["acc"]["n"] == 8
    # per-item records: the gold's log-likelihood is one of the choices', its rank agrees with acc
    for it in items:
        assert it["logprob"] == it["lls"][it["gold"]] and it["tokens"] >= 1
        assert (it["gold_rank"] == 1) == (it["acc"] == 1.0) or it["lls"].count(max(it["lls"])) > 1


def test_rate_zero_equals_baseline(tiny, requests):
    from sfsd.laser.study import BASELINE, GridPoint

    _, base, _ = run(tiny, requests, BASELINE)
    # LASER at rate 0 keeps every singular direction: the very same weights, on every matrix of every block
    _, items, common = run(tiny, requests, GridPoint("laser", "all", -1, 0.0))
    assert common["laser_matrices"] == 14 and common["laser_k"].startswith("down_proj=32")
    assert [i["lls"] for i in items] == [i["lls"] for i in base]
    # Vendi at rate 0 keeps min(out, in) rows, which span the row space: equal up to float rounding
    _, items, _ = run(tiny, requests, GridPoint("vendi-quality", "all", -1, 0.0))
    assert [i["acc"] for i in items] == [i["acc"] for i in base]
    flat = [torch.tensor([x for i in its for x in i["lls"]]) for its in (items, base)]
    assert torch.allclose(*flat, atol=1e-3)
    # a real intervention changes the scores (the comparison above can fail)
    _, items, _ = run(tiny, requests, GridPoint("laser", "all", -1, 9.0))
    assert [i["lls"] for i in items] != [i["lls"] for i in base]


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("options", [{}, {"use_quality": True}, {"min_diversity": True}])
def test_vendi_with_every_row_reproduces_the_matrix(shape, options):
    from sfsd.decompose.methods import vendi_rebuild, vendi_select

    torch.manual_seed(0)
    weight = torch.randn(shape)
    rows = vendi_select(weight, shape[0], **options)
    assert sorted(rows) == list(range(shape[0]))
    rebuilt = vendi_rebuild(weight, rows)
    assert rebuilt.dtype == weight.dtype
    assert torch.allclose(rebuilt, weight, atol=1e-5)
    # and with fewer rows it does not: rank <= k
    fewer = vendi_rebuild(weight.double(), rows[: min(shape) // 2])
    assert torch.linalg.matrix_rank(fewer) == min(shape) // 2
    assert not torch.allclose(fewer, weight.double(), atol=1e-2)


def test_grid_and_choice():
    from sfsd.model.registry import get_arch
    from sfsd.laser.study import BASELINE, GridPoint, build_grid, choose, grid_points, reported_points
    from sfsd.model.shapes import ModelShapes

    shapes = ModelShapes("LlamaForCausalLM", 4, {"q_proj": (32, 32), "k_proj": (4, 32), "v_proj": (4, 32),
                                                 "o_proj": (32, 32), "gate_proj": (48, 32), "up_proj": (48, 32),
                                                 "down_proj": (32, 48)}, dict.fromkeys(["q_proj"], False), 0, (10, 32))
    spec = get_arch("LlamaForCausalLM")
    grid = build_grid(spec, shapes, lnums=[1, -1], lnames=["fc_in", "dont", "k_proj"], rates=[5, 9.5],
                      interventions=["laser", "vendi"])
    points = grid_points(grid)
    assert points[0] == BASELINE and len(points) == len(set(points))
    # vendi at 9.5 keeps floor(4 * 0.05) = 0 rows of the 4-row k_proj: skipped, and said so
    assert len(points) == 1 + 2 * 2 * 2 * 2 - 2 and len(grid["skipped"]) == 2
    assert GridPoint("laser", "k_proj", -1, 9.5).name == "laser-k_proj-Lall-r9.5"
    with pytest.raises(ConfigError, match="laser.lnums: 4 is out of range"):
        build_grid(spec, shapes, lnums=[4], lnames=["fc_in"], rates=[5], interventions=["laser"])
    full = build_grid(spec, shapes, lnums=[], lnames=[], rates=[], interventions=["laser"], full_grid=True)
    assert len(full["points"]) == 1 + 5 * 10 * 9

    def row(point, metric, value):
        return {"task": "t", "split": "search", "metric": metric, "value": value, **point.columns()}

    a, b, c = GridPoint("laser", "fc_in", 1, 5.0), GridPoint("laser", "fc_in", 1, 9.5), GridPoint("vendi", "fc_in", 1, 5.0)
    rows = [row(BASELINE, "acc", 0.5), row(a, "acc", 0.6), row(b, "acc", 0.6), row(c, "acc", 0.4),
            row(BASELINE, "logprob_token", -2.0), row(a, "logprob_token", -2.5), row(b, "logprob_token", -2.2),
            row(c, "logprob_token", -1.0)]
    chosen = choose(rows, "t", "acc")
    assert chosen["chosen"]["name"] == b.name  # tie on acc broken by the log-prob
    assert chosen["by_intervention"]["vendi"]["name"] == c.name  # the best vendi point, though below the baseline
    assert reported_points(chosen) == [BASELINE, b, c]
    # nothing beats the baseline: the baseline is chosen (an exact tie keeps it too)
    chosen = choose([row(BASELINE, "acc", 0.6), row(a, "acc", 0.6), row(c, "acc", 0.1)], "t", "acc")
    assert chosen["chosen"]["name"] == "dont"


def test_paper_metric_is_resolved_per_task(tmp_path):
    """laser.metric paper: BoolQ is chosen and reported by acc, ARC-Easy by acc_norm (lm-eval's own metric of
    each); acc_norm for BoolQ is a config error naming the key."""
    from sfsd.laser.report import best_table_rows, sweep_figure
    from sfsd.laser.study import BASELINE, GridPoint, choose
    from sfsd.evaluate.rows import write_rows

    a = GridPoint("laser", "fc_in", 1, 5.0)
    rows = []
    for task, values in (("boolq", {"acc": (0.5, 0.6), "acc_norm": (0.9, 0.1)}),
                         ("arc_easy", {"acc": (0.5, 0.4), "acc_norm": (0.3, 0.35)})):
        for metric, (base, changed) in values.items():
            for split in ("search", "test"):
                for point, value in ((BASELINE, base), (a, changed)):
                    rows.append({"task": task, "split": split, "metric": metric, "value": value, "stderr": 0.05,
                                 "n": 8, "limit": 8, "method": point.method, "plan": point.name, **point.columns(),
                                 "laser_chosen": point == a, "laser_best_of_intervention": point == a})
    boolq, arc = choose(rows, "boolq"), choose(rows, "arc_easy")
    assert (boolq["metric"], boolq["metric_setting"], boolq["chosen"]["name"]) == ("acc", "paper", a.name)
    assert (arc["metric"], arc["chosen"]["name"]) == ("acc_norm", a.name)  # by acc it would keep the baseline
    assert choose(rows, "arc_easy", "acc")["chosen"]["name"] == "dont"
    with pytest.raises(ConfigError, match="laser.metric: lm-eval defines no acc_norm for boolq"):
        choose(rows, "boolq", "acc_norm")
    table, notes = best_table_rows(rows, "paper")
    assert notes["metrics"] == {"arc_easy": "acc_norm", "boolq": "acc"}
    got = {(r["task"], r["point"]): r for r in table}
    assert got[("boolq", a.name)]["metric"] == "acc" and got[("boolq", a.name)]["val_paper"] == 60.0
    assert got[("arc_easy", a.name)]["metric"] == "acc_norm" and got[("arc_easy", a.name)]["test_paper"] == 35.0
    only_arc = [r for r in rows if r["task"] == "arc_easy"]
    assert best_table_rows(only_arc, "paper")[0][0]["val_acc_norm"] == 35.0  # one task: the column names its metric
    write_rows(tmp_path / "results.parquet", rows)
    sweep_figure(tmp_path / "results.parquet", "paper", tmp_path / "s.png", tmp_path / "s.svg")
    assert (tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.slow  # two real runs of the Snakefile
def test_sweep_extended_by_one_rate_reruns_only_new_points(tmp_path, tiny_llama):
    """The real Snakefile on the tiny model: a sweep, then the same sweep with one more rate. Points already
    scored are not rerun (their files are untouched); the new rate's points are; a finished run has nothing
    left to do; results, figure and table come out of it."""
    import pyarrow.parquet as pq

    snakefile, workdir = new_run(tmp_path)
    laser = {"enabled": True, "tasks": ["arc_easy"], "lnums": [1], "lnames": ["fc_in"], "rates": [5],
             "interventions": ["laser"], "limit": 4, "batch_size": 4}
    config = {"models": {"tiny": {"source": "local", "path": str(tiny_llama)}}, "device": "cpu",
              "compression": {"first_block": 0}, "evaluation": {"tasks": ["arc_easy"]}, "laser": laser}
    targets = ["results/tables/tiny/laser_best.md", "results/figures/tiny/laser_sweep.png"]
    snakemake(snakefile, workdir, config, *targets)
    points = workdir / "results" / "tiny" / "laser" / "points" / "arc_easy"
    before = {p: p.stat().st_mtime_ns for p in points.rglob("scores.parquet")}
    search = sorted(str(p.relative_to(points)) for p in before if p.parts[-6] == "search")
    assert search == ["search/laser/fc_in/L1/r5/scores.parquet", "search/none/dont/Lall/r0/scores.parquet"]

    extended = {**config, "laser": {**laser, "rates": [5, 9]}}
    snakemake(snakefile, workdir, extended, *targets)
    after = {p: p.stat().st_mtime_ns for p in points.rglob("scores.parquet")}
    assert all(after[p] == t for p, t in before.items()), "a point already scored was rerun"
    new = sorted(str(p.relative_to(points)) for p in set(after) - set(before) if p.parts[-6] == "search")
    assert new == ["search/laser/fc_in/L1/r9/scores.parquet"]
    assert planned_jobs(snakemake(snakefile, workdir, extended, "--dry-run", *targets)) == {}

    # every point's rows in one Parquet; the chosen point flagged, scored on both splits
    rows = pq.read_table(workdir / "results" / "tiny" / "laser" / "results.parquet").to_pylist()
    acc = [r for r in rows if r["metric"] == "acc"]
    assert {r["plan"] for r in acc if r["split"] == "search"} == {"dont", "laser-fc_in-L1-r5", "laser-fc_in-L1-r9"}
    chosen = {r["plan"] for r in acc if r["laser_chosen"]}
    assert len(chosen) == 1
    assert {r["split"] for r in acc if r["laser_chosen"]} == {"search", "test"}
    assert all(r["n"] == 4 and r["limit"] == 4 and r["model"] == "tiny" for r in acc)
    best = max((r for r in acc if r["split"] == "search"), key=lambda r: r["value"])
    assert [r["value"] for r in acc if r["laser_chosen"] and r["split"] == "search"] == [best["value"]]
    items = pq.read_table(workdir / "results" / "tiny" / "laser" / "items.parquet").to_pylist()
    assert {(i["plan"], i["split"]) for i in items} >= {("dont", "search"), ("dont", "test")}
    assert all(len(i["lls"]) == i["n_choices"] for i in items)
    table = (workdir / "results" / "tables" / "tiny" / "laser_best.md").read_text()
    assert "| arc_easy | laser |" in table and "val_acc" in table and "test_acc" in table
    assert (workdir / "results" / "figures" / "tiny" / "laser_sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("laser, message", [
    ({"tasks": ["piqa"]}, "config error: laser.tasks ['piqa'] are not in evaluation.tasks"),
    ({"lnums": [2]}, "config error: laser.lnums [2] out of range: model tiny has blocks 0..1"),
    ({"rates": [11]}, "config error: laser.rates.0: 11 is greater than the maximum of 10"),
])
def test_bad_laser_config_fails_before_any_job(tmp_path, tiny_llama, laser, message):

    snakefile = copy_workflow(tmp_path / "repo")
    config = {"models": {"tiny": {"source": "local", "path": str(tiny_llama)}}, "device": "cpu",
              "compression": {"first_block": 0}, "evaluation": {"tasks": ["arc_easy"]},
              "laser": {"enabled": True, "lnums": [1], "lnames": ["fc_in"], "rates": [5], **laser}}
    proc = snakemake(snakefile, tmp_path, config, "--dry-run", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
