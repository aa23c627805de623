"""The informative average: each task's majority-class rate and chance from the gold labels of the documents
scored (sfsd.tasks.baselines), the evaluate stage recording them, which tasks enter the average (decided
from the dense model alone: its 95% interval above the higher of the two), and the average with its
interval in the tables and its paired bootstrap interval in the comparisons, on hand-made cases whose
answers are known."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from sfsd.errors import DataError
from sfsd.evaluate.items import Z95, write_items
from sfsd.report import compare as C
from sfsd.report.informative import informative_note, task_verdict
from sfsd.report.tables import methods_table, methods_table_rows, paper_table, paper_table_rows
from sfsd.tasks.baselines import chance_rate, floor_rates, majority_rate


def interval(score: float, se: float) -> str:
    """'[low, high]' of score ± 1.96 se, in points with one decimal, computed here by hand."""
    return f"[{100 * (score - 1.959964 * se):.1f}, {100 * (score + 1.959964 * se):.1f}]"


# ------------------------------------------------------------------------- the task-level facts


def test_majority_rate_is_the_best_constant_answer():
    assert majority_rate([1, 1, 0, 1]) == 0.75  # always "yes"
    assert majority_rate([0, 1, 2, 3, 3]) == 0.4
    # a document with several right answers counts for each; lm-eval's invalid gold (-100) for none
    assert majority_rate([(0, 1), 1, 2]) == pytest.approx(2 / 3)
    assert majority_rate([-100, 0, 0, 1]) == 0.5
    with pytest.raises(DataError, match="no documents"):
        majority_rate([])
    with pytest.raises(DataError, match="no gold label"):
        majority_rate([0, None])


def test_chance_is_the_mean_of_one_over_the_choices():
    assert chance_rate([2, 2]) == 0.5
    assert chance_rate([2, 4, 4]) == pytest.approx((0.5 + 0.25 + 0.25) / 3)  # ARC: 3 to 5 choices
    with pytest.raises(DataError, match="no choices"):
        chance_rate([4, 0])
    rates = floor_rates([{"task": "boolq", "gold": g, "choices": 2} for g in (1, 1, 1, 0, 1)]
                        + [{"task": "arc_easy", "gold": g, "choices": c} for g, c in ((0, 4), (1, 4), (0, 5))])
    assert rates == {"boolq": {"majority": 0.8, "chance": 0.5},
                     "arc_easy": {"majority": pytest.approx(2 / 3), "chance": pytest.approx((0.25 + 0.25 + 0.2) / 3)}}


def test_the_evaluate_stage_records_gold_choices_and_each_tasks_rates(tiny_llama, tmp_path):
    """`python -m sfsd evaluate` writes, per task row, the majority-class rate and chance of the documents
    it scored, and, per document of the per-item file, its gold index and choice count: those of lm-eval's
    own requests, counted here by hand."""
    import pyarrow.parquet as pq

    from sfsd.cli.main import main
    from sfsd.evaluate.scoring import build_requests
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.tasks.splits import split_doc_ids

    tasks = ["boolq", "arc_easy"]
    export_local_tasks(tmp_path / "tasks", tasks)
    ids = {t: split_doc_ids(t, None, 1234, 0.1, 0.2, limit=8) for t in tasks}
    (tmp_path / "splits.json").write_text(json.dumps({"tasks": ids}))
    assert main(["evaluate", "--model-dir", str(tiny_llama), "--model-name", "tiny", "--variant", "base",
                 "--tasks-dir", str(tmp_path / "tasks"), "--tasks", ",".join(tasks), "--splits",
                 str(tmp_path / "splits.json"), "--limit", "8", "--device", "cpu", "--ppl-source", "none",
                 "--out", str(tmp_path / "base.parquet"), "--items-out", str(tmp_path / "base.docs.parquet")]) == 0
    requests = [r for r in build_requests(tmp_path / "tasks", tasks, ids) if r.split == "test"]
    rows = pq.read_table(tmp_path / "base.parquet").to_pylist()
    docs = pq.read_table(tmp_path / "base.docs.parquet").to_pylist()
    for task in tasks:
        golds = [r.gold for r in requests if r.task == task]
        choices = [len(r.pairs) for r in requests if r.task == task]
        assert len(golds) == 8
        majority = Counter(golds).most_common(1)[0][1] / len(golds)
        chance = sum(1 / c for c in choices) / len(choices)
        for row in (r for r in rows if r["task"] == task):
            assert row["majority"] == pytest.approx(majority) and row["chance"] == pytest.approx(chance)
        by_item = {d["item"]: (d["gold"], d["choices"]) for d in docs if d["task"] == task}
        assert by_item == {r.doc_id: (r.gold, len(r.pairs)) for r in requests if r.task == task}


# ------------------------------------------------------------------------- the verdicts and the tables

# the dense model, as on the embedded model: BoolQ below "always yes", WinoGrande's interval straddling its
# majority rate (the point estimate above it), PIQA and ARC-Easy clearly above
DENSE = {"boolq": (0.375, 0.0342, 0.62, 0.5), "piqa": (0.62, 0.034, 0.51, 0.5),
         "winogrande": (0.515, 0.0354, 0.505, 0.5), "arc_easy": (0.45, 0.035, 0.27, 0.25)}
# a badly compressed model: better than the dense model on BoolQ only
BROKEN = {"boolq": (0.65, 0.0338), "piqa": (0.52, 0.0353), "winogrande": (0.5, 0.0354), "arc_easy": (0.3, 0.0324)}


def result_rows(with_broken: bool = True, dense: dict = DENSE) -> list[dict]:
    """Combined results rows (metric acc everywhere) of the dense model and the broken one."""
    def rows(method, plan, fraction, scores):
        return [{"method": method, "plan": plan, "task": task, "split": "test", "metric": "acc", "value": v[0],
                 "stderr": v[1], "n": 200, "majority": dense[task][2], "chance": dense[task][3],
                 "params_model": int(100 * fraction), "params_model_fraction": fraction,
                 "params_decoder_linear_fraction": fraction, "macs_per_token": 10} for task, v in scores.items()]
    out = rows("baseline", "base", 1.0, dense)
    return out + (rows("weight", "weight-b80", 0.8, BROKEN) if with_broken else [])


def test_a_task_enters_only_when_the_dense_interval_is_above_majority_and_chance():
    boolq = task_verdict("boolq", 0.375, 0.0342, 0.62, 0.5)
    assert not boolq.informative and boolq.reason == "boolq: dense 37.5 [30.8, 44.2] <= majority 62.0"
    wino = task_verdict("winogrande", 0.515, 0.0354, 0.505, 0.5)  # 51.5 > 50.5, but the interval straddles it
    assert not wino.informative and wino.reason == f"winogrande: dense 51.5 {interval(0.515, 0.0354)} <= majority 50.5"
    arc = task_verdict("arc_easy", 0.45, 0.035, 0.24, 0.25)  # chance is the higher floor here
    assert arc.informative and arc.reason == f"arc_easy: dense 45.0 {interval(0.45, 0.035)} > chance 25.0"
    assert not task_verdict("piqa", 0.9, None, 0.5, 0.5).informative  # no interval, no verdict
    assert "majority-class rate unknown" in task_verdict("piqa", 0.9, 0.01, None, 0.5).reason


def test_paper_table_informative_average_by_hand(tmp_path):
    table, notes = paper_table_rows(result_rows(), "acc")
    base, broken = table
    # the paper's average rewards the broken model's BoolQ; over the informative tasks (piqa, arc_easy) it loses
    assert broken["average"] == pytest.approx(100 * (0.65 + 0.52 + 0.5 + 0.3) / 4)
    assert base["informative_average"] == pytest.approx(100 * (0.62 + 0.45) / 2)
    assert broken["informative_average"] == pytest.approx(100 * (0.52 + 0.3) / 2)
    assert broken["informative_average_ci95"] == pytest.approx(Z95 * 100 * math.hypot(0.0353, 0.0324) / 2, abs=0.005)
    assert notes["informative"] == (
        "Informative average over piqa, arc_easy (the tasks where the dense model's 95% interval lies above the "
        "higher of the task's majority-class rate and chance, on the documents scored); excluded: boolq: dense "
        f"37.5 [30.8, 44.2] <= majority 62.0; winogrande: dense 51.5 {interval(0.515, 0.0354)} <= majority 50.5.")
    # decided from the dense model alone: the same tasks whatever the other models score
    _, alone = paper_table_rows(result_rows(with_broken=False), "acc")
    assert alone["informative"] == notes["informative"]
    from sfsd.evaluate.rows import write_rows

    write_rows(tmp_path / "r.parquet", result_rows())
    paper_table(tmp_path / "r.parquet", "acc", tmp_path / "t.md", tmp_path / "t.csv")
    md = (tmp_path / "t.md").read_text()
    assert "| average | informative_average |" in md and "boolq: dense 37.5 [30.8, 44.2] <= majority 62.0" in md
    assert f"| {round(100 * (0.52 + 0.3) / 2, 2)} ± " in md


def test_methods_table_informative_average_and_its_change(tmp_path):
    rows = methods_table_rows(result_rows(), "acc")
    base, broken = rows
    assert broken["informative_avg_acc"] == pytest.approx(41.0)
    assert broken["informative_delta_vs_baseline"] == pytest.approx(41.0 - 53.5)
    assert broken["delta_vs_baseline"] == pytest.approx(100 * ((0.65 + 0.52 + 0.5 + 0.3) - (0.375 + 0.62 + 0.515 + 0.45)) / 4)
    assert broken["informative_avg_acc_ci95"] == pytest.approx(Z95 * 100 * math.hypot(0.0353, 0.0324) / 2, abs=0.005)
    from sfsd.evaluate.rows import write_rows

    write_rows(tmp_path / "r.parquet", result_rows())
    methods_table(tmp_path / "r.parquet", "acc", tmp_path / "m.md", tmp_path / "m.csv")
    assert "Informative average over piqa, arc_easy" in (tmp_path / "m.md").read_text()


def test_no_informative_task_is_said_not_averaged():
    low = {t: (v[2] - 0.01, v[1], v[2], v[3]) for t, v in DENSE.items()}  # every task just below its majority
    table, notes = paper_table_rows(result_rows(dense=low), "acc")
    assert all(r["informative_average"] is None and r["informative_average_ci95"] is None for r in table)
    assert notes["informative"].startswith("Informative average: none, the dense model is informative on no task")
    assert all(r["informative_avg_acc"] is None for r in methods_table_rows(result_rows(dense=low), "acc"))
    no_dense = [r for r in result_rows() if r["method"] != "baseline"]
    assert paper_table_rows(no_dense, "acc")[1]["informative"] == (
        "Informative average: none (no dense model among the variants to decide its tasks from).")
    assert informative_note({}, ["piqa"]).endswith("piqa: the dense model has no score.")


# ------------------------------------------------------------------------- the paired comparisons


def test_paired_bootstrap_of_a_subset_by_hand():
    rng = np.random.default_rng(7)
    a = {t: rng.integers(0, 2, n).astype(float) for t, n in (("boolq", 30), ("piqa", 25), ("arc_easy", 20))}
    b = {t: rng.integers(0, 2, x.size).astype(float) for t, x in a.items()}
    out = C.paired_bootstrap(a, b, n_boot=300, seed=3, subset=["piqa", "arc_easy"])
    # by hand: the same draws, task after task, each resample the mean of n indices drawn with replacement
    draws = np.random.default_rng(3)
    means = {t: (a[t] - b[t])[draws.integers(0, a[t].size, size=(300, a[t].size))].mean(axis=1) for t in a}
    subset = (means["piqa"] + means["arc_easy"]) / 2
    value = ((a["piqa"] - b["piqa"]).mean() + (a["arc_easy"] - b["arc_easy"]).mean()) / 2
    assert out["subset"].value == pytest.approx(value)
    assert (out["subset"].low, out["subset"].high) == pytest.approx(tuple(np.percentile(subset, [2.5, 97.5])))
    # the whole average from the same resamples is unchanged by asking for a subset
    assert out["average"] == C.paired_bootstrap(a, b, n_boot=300, seed=3)["average"]
    # constant differences: a degenerate interval at the mean of the subset's differences
    const = C.paired_bootstrap({"piqa": np.full(9, 10.0), "arc_easy": np.full(5, 20.0), "boolq": np.zeros(4)},
                               {"piqa": np.zeros(9), "arc_easy": np.zeros(5), "boolq": np.zeros(4)},
                               n_boot=50, subset=["piqa", "arc_easy"])
    assert const["subset"] == C.Interval(15.0, 15.0, 15.0) and const["average"].value == pytest.approx(10.0)
    assert C.paired_bootstrap(a, b, n_boot=10)["subset"] is None
    with pytest.raises(DataError, match="hellaswag of the subset"):
        C.paired_bootstrap(a, b, n_boot=10, subset=["hellaswag"])


N = 40
GOLDS = {"boolq": [1] * 30 + [0] * 10, "piqa": [i % 2 for i in range(N)], "arc_easy": [i % 4 for i in range(N)]}
RIGHT = {"base": {"boolq": 15, "piqa": 34, "arc_easy": 12}, "weight-b80": {"boolq": 30, "piqa": 24, "arc_easy": 10}}


def docs_file(tmp_path, plan):
    """A per-item file whose documents carry gold labels (majority: boolq 0.75, piqa 0.5, arc_easy 0.25)."""
    common = {"model": "tiny", "method": "baseline" if plan == "base" else "weight", "plan": plan,
              "params_model_fraction": 1.0 if plan == "base" else 0.8}
    rows = [{**common, "task": task, "split": "test", "unit": "doc", "item": i, "acc": float(i < RIGHT[plan][task]),
             "acc_norm": float(i < RIGHT[plan][task]), "gold": GOLDS[task][i], "choices": 2 if task != "arc_easy" else 4}
            for task in GOLDS for i in range(N)]
    return write_items(tmp_path / f"{plan}.docs.parquet", rows, common)


def test_comparisons_show_the_informative_difference_with_its_paired_interval(tmp_path):
    paths = [docs_file(tmp_path, "base"), docs_file(tmp_path, "weight-b80")]
    rows = C.comparisons_table(paths, "acc", tmp_path / "c.md", tmp_path / "c.csv", seed=0, n_boot=400)
    (row,) = rows
    # base: boolq 37.5 < its 75% "yes"; arc_easy 30.0 with an interval reaching below chance 25; piqa 85.0 above
    assert row["average_diff"] == pytest.approx(100 * ((30 - 15) + (24 - 34) + (10 - 12)) / N / 3)  # +2.5
    assert row["informative_diff"] == pytest.approx(100 * (24 - 34) / N)  # -25.0: piqa alone
    assert (row["informative_low"], row["informative_high"]) == (row["piqa_low"], row["piqa_high"])
    assert row["informative_high"] < 0 < row["average_diff"]
    se = {t: np.std([float(i < RIGHT["base"][t]) for i in range(N)], ddof=1) / math.sqrt(N) for t in GOLDS}
    text = (tmp_path / "c.md").read_text()
    assert "| average | informative | boolq |" in text
    assert (f"Informative average over piqa (the tasks where the dense model's 95% interval lies above the higher of "
            f"the task's majority-class rate and chance, on the documents scored); excluded: boolq: dense 37.5 "
            f"{interval(0.375, se['boolq'])} <= majority 75.0; arc_easy: dense 30.0 {interval(0.3, se['arc_easy'])} "
            "<= majority 25.0.") in text
    # the same comparison without the base model's golds: no task is known to be informative
    verdicts = C.dense_verdicts(C.read_docs(paths), "acc")
    assert [t for t, v in verdicts.items() if v.informative] == ["piqa"]
    assert C.dense_verdicts({k: v for k, v in C.read_docs(paths).items() if k != "base"}, "acc") is None
