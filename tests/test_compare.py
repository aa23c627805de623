"""Paired comparisons (sfsd.report.compare): the bootstrap on hand-made cases whose answers are known, the pairs
compared, the refusal to pair different documents, the Markdown/CSV table from per-item docs files
(format sfsd-docs-1, built here with pyarrow), the CLI, and the comparisons_table rule of the real
Snakefile on synthetic docs files (--allowed-rules: no model is run)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sfsd.decompose.plan import FACTOR_METHODS
from sfsd.decompose.variants import ALLOCATIONS, METHOD_NAMES, Variant, parse_variant, variant_name
from sfsd.errors import DataError
from sfsd.evaluate.items import DOCS_FORMAT, write_items
from sfsd.report import compare as C
from sfsd.tasks.registry import task_metric

from helpers import new_run, planned_jobs, run_cli, snakemake

LOG2 = float(np.log(2.0))


def right_on(k: int, n: int, offset: int = 0) -> np.ndarray:
    """0/1 scores of n docs, right on k of them starting at `offset`."""
    x = np.zeros(n)
    x[offset:offset + k] = 1.0
    return x


# ------------------------------------------------------------------------------------ the bootstrap


def test_identical_models_differ_by_zero():
    scores = {"piqa": right_on(13, 40), "arc_easy": right_on(5, 30)}
    out = C.paired_bootstrap(scores, dict(scores), n_boot=500, seed=3)
    assert out["average"] == C.Interval(0.0, 0.0, 0.0)
    assert out["tasks"] == {"piqa": C.Interval(0.0, 0.0, 0.0), "arc_easy": C.Interval(0.0, 0.0, 0.0)}
    assert out["n"] == {"piqa": 40, "arc_easy": 30}


@pytest.mark.parametrize("k,n", [(1, 3), (3, 7), (7, 50), (12, 25)])
def test_right_on_k_more_docs_gives_k_over_n(k, n):
    b = right_on(n // 3, n, offset=0)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:k]] = 1.0  # a is also right on k docs that b gets wrong
    out = C.paired_bootstrap({"piqa": a}, {"piqa": b}, n_boot=200)
    assert out["tasks"]["piqa"].value == k / n  # exactly
    assert out["average"].value == k / n
    # two tasks: the average is the unweighted mean of the task differences, whatever their doc counts
    two = C.paired_bootstrap({"piqa": a, "boolq": right_on(1, 4)}, {"piqa": b, "boolq": np.zeros(4)}, n_boot=200)
    assert two["average"].value == pytest.approx((k / n + 1 / 4) / 2)
    assert two["tasks"]["boolq"].value == 0.25


def test_constant_difference_has_a_degenerate_interval():
    a = {"piqa": np.full(25, 0.75), "hellaswag": np.full(9, 1.0)}
    b = {"piqa": np.full(25, 0.25), "hellaswag": np.full(9, 0.0)}
    out = C.paired_bootstrap(a, b, n_boot=300, seed=11)
    assert out["tasks"]["piqa"] == C.Interval(0.5, 0.5, 0.5)
    assert out["tasks"]["hellaswag"] == C.Interval(1.0, 1.0, 1.0)
    assert out["average"] == C.Interval(0.75, 0.75, 0.75)


def test_seed_reproducibility():
    rng = np.random.default_rng(0)
    a = {t: rng.integers(0, 2, 60).astype(float) for t in ("piqa", "arc_easy")}
    b = {t: rng.integers(0, 2, 60).astype(float) for t in ("piqa", "arc_easy")}
    first, again = C.paired_bootstrap(a, b, n_boot=400, seed=5), C.paired_bootstrap(a, b, n_boot=400, seed=5)
    assert first == again
    other = C.paired_bootstrap(a, b, n_boot=400, seed=6)
    assert other["average"].value == first["average"].value  # the point estimate needs no resampling
    assert (other["average"].low, other["average"].high) != (first["average"].low, first["average"].high)
    assert other["tasks"]["piqa"] != first["tasks"]["piqa"]
    # the chunked draws do not depend on the number of docs in a way that breaks reproducibility
    big = {"piqa": np.tile(a["piqa"], 200)}
    assert C.paired_bootstrap(big, {"piqa": np.tile(b["piqa"], 200)}, n_boot=50, seed=1) == \
        C.paired_bootstrap(big, {"piqa": np.tile(b["piqa"], 200)}, n_boot=50, seed=1)


def test_interval_is_95_percent_and_covers_the_estimate():
    a, b = right_on(30, 100), right_on(20, 100, offset=50)
    iv = C.paired_bootstrap({"piqa": a}, {"piqa": b}, n_boot=2000, seed=0)["tasks"]["piqa"]
    assert iv.low < iv.value == 0.1 < iv.high
    # about 1.96 standard errors of the mean difference on each side
    d = a - b
    se = d.std() / np.sqrt(d.size)
    assert (iv.high - iv.low) / 2 == pytest.approx(1.96 * se, rel=0.1)


def test_interval_shrinks_as_docs_are_added():
    widths = []
    for n in (20, 80, 320, 1280):
        # the same disagreement rate: a right and b wrong on 1/4 of the docs, b right and a wrong on 1/10
        a, b = np.zeros(n), np.zeros(n)
        a[: n // 4] = 1
        b[n // 4: n // 4 + n // 10] = 1
        iv = C.paired_bootstrap({"piqa": a}, {"piqa": b}, n_boot=1000, seed=0)["tasks"]["piqa"]
        assert iv.value == pytest.approx(0.25 - (n // 10) / n)
        widths.append(iv.high - iv.low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_bad_inputs():
    with pytest.raises(DataError, match="different tasks"):
        C.paired_bootstrap({"piqa": np.zeros(3)}, {"boolq": np.zeros(3)})
    with pytest.raises(DataError, match="differ in shape"):
        C.paired_bootstrap({"piqa": np.zeros(3)}, {"piqa": np.zeros(4)})
    with pytest.raises(DataError, match="NaN"):
        C.paired_bootstrap({"piqa": np.array([0.0, np.nan])}, {"piqa": np.zeros(2)})
    from sfsd.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 1 resample"):
        C.paired_bootstrap({"piqa": np.zeros(3)}, {"piqa": np.zeros(3)}, n_boot=0)


# ------------------------------------------------------------------------------------ perplexity ratio


def test_ppl_ratio_of_identical_windows_is_one():
    rng = np.random.default_rng(1)
    nll, tokens = rng.uniform(100, 400, 30), np.full(30, 127)
    assert C.paired_ppl_ratio(nll, tokens, nll.copy(), tokens.copy(), n_boot=300) == C.Interval(1.0, 1.0, 1.0)


def test_ppl_ratio_known_value():
    rng = np.random.default_rng(2)
    tokens = rng.integers(50, 128, 40)
    nll_b = rng.uniform(2, 5, 40) * tokens
    # a spends log 2 more nats on every token: ppl_a = 2 ppl_b on every window, in every resample
    iv = C.paired_ppl_ratio(nll_b + LOG2 * tokens, tokens, nll_b, tokens, n_boot=300)
    assert (iv.value, iv.low, iv.high) == pytest.approx((2.0, 2.0, 2.0))
    # the point value is exp(sum nll / sum tokens) of a over b
    nll_a = rng.uniform(2, 6, 40) * tokens
    iv = C.paired_ppl_ratio(nll_a, tokens, nll_b, tokens, n_boot=500, seed=4)
    assert iv.value == pytest.approx(C.perplexity(nll_a, tokens) / C.perplexity(nll_b, tokens))
    assert iv.low < iv.value < iv.high
    assert iv == C.paired_ppl_ratio(nll_a, tokens, nll_b, tokens, n_boot=500, seed=4)


# ------------------------------------------------------------------------------------ pairs


def test_pairs_of_a_variant_list():
    variants = ["base", "feature-p54", "feature-p34", "weight-p54", "weight-p34", "whitened-p54",
                "search-feature-accuracy-average", "search-weight-perplexity-lambada"]
    assert C.comparison_pairs(variants) == [
        ("feature-p54", "weight-p54"), ("feature-p54", "whitened-p54"), ("weight-p54", "whitened-p54"),
        ("feature-p34", "weight-p34"),
        ("search-feature-accuracy-average", "feature-p54"), ("search-feature-accuracy-average", "feature-p34"),
        ("search-weight-perplexity-lambada", "weight-p54"), ("search-weight-perplexity-lambada", "weight-p34"),
        ("feature-p54", "base"), ("feature-p34", "base"), ("weight-p54", "base"), ("weight-p34", "base"),
        ("whitened-p54", "base"), ("search-feature-accuracy-average", "base"),
        ("search-weight-perplexity-lambada", "base")]
    # the method order fixes a and b, whatever the order of the list
    assert C.comparison_pairs(["whitened-b80", "weight-b80", "feature-b80"])[:3] == [
        ("feature-b80", "weight-b80"), ("feature-b80", "whitened-b80"), ("weight-b80", "whitened-b80")]
    assert C.comparison_pairs(["base"]) == []
    assert C.comparison_pairs(["base", "base", "weight-b80"]) == [("weight-b80", "base")]
    assert parse_variant("search-whitened-accuracy-arc_easy") == Variant("search", "whitened", None, "accuracy-arc_easy")
    assert parse_variant("laser-x") == Variant("other")


def test_allocations_at_equal_size_are_paired_with_uniform_and_each_other():
    variants = ["base", "feature-p54", "asvd-p54", "feature-spectral-p54", "search-feature-kl-average-p54",
                "search-feature-kl-average", "asvd-spectral-p54"]
    pairs = C.comparison_pairs(variants)
    assert pairs[:5] == [
        ("feature-p54", "asvd-p54"),
        ("feature-spectral-p54", "feature-p54"), ("search-feature-kl-average-p54", "feature-p54"),
        ("search-feature-kl-average-p54", "feature-spectral-p54"),
        ("asvd-spectral-p54", "asvd-p54")]
    assert ("search-feature-kl-average", "feature-p54") in pairs
    assert pairs[-6:] == [(v, "base") for v in variants[1:]]
    assert parse_variant("feature-spectral-p54") == Variant("spectral", "feature", "p54")
    assert parse_variant("search-asvd-perplexity-text_file-p34") == Variant("searched", "asvd", "p34",
                                                                            "perplexity-text_file")
    assert parse_variant("feature-spectral-") == Variant("other")
    assert {variant_name("asvd", "p54", a, "kl-average") for a in ALLOCATIONS} == {
        "asvd-p54", "asvd-spectral-p54", "asvd-loss-p54", "search-asvd-kl-average-p54"}
    assert parse_variant("asvd-loss-p54") == Variant("loss", "asvd", "p54")
    assert C.comparison_pairs(["feature-p54", "feature-loss-p54", "search-feature-kl-average-p54"]) == [
        ("feature-loss-p54", "feature-p54"), ("search-feature-kl-average-p54", "feature-p54"),
        ("search-feature-kl-average-p54", "feature-loss-p54")]
    assert C.comparison_pairs(["feature-p54", "feature-spectral-p54", "feature-loss-p54"]) == [
        ("feature-spectral-p54", "feature-p54"), ("feature-loss-p54", "feature-p54"),
        ("feature-loss-p54", "feature-spectral-p54")]
    assert METHOD_NAMES == FACTOR_METHODS


def test_check_paired_refuses_different_docs():
    ids = {"piqa": np.arange(10), "boolq": np.arange(5)}
    C.check_paired("a", ids, "b", {k: v.copy() for k, v in ids.items()})
    with pytest.raises(DataError, match=r"their piqa docs differ \(10 vs 10; 1 only in a, 1 only in b\)"):
        C.check_paired("a", ids, "b", {"piqa": np.r_[np.arange(9), 42], "boolq": np.arange(5)})
    with pytest.raises(DataError, match="b has no boolq docs"):
        C.check_paired("a", ids, "b", {"piqa": np.arange(10)})
    with pytest.raises(DataError, match="a has no hellaswag docs"):
        C.check_paired("a", ids, "b", {**ids, "hellaswag": np.arange(3)})


# ------------------------------------------------------------------------------------ docs files


TASKS = ("boolq", "piqa", "arc_easy")


def variant_docs(plan: str, fraction: float, right: dict[str, np.ndarray], nll=None, tokens=None,
                 model: str = "tiny", items: dict | None = None) -> list[dict]:
    """Rows of a docs file (format sfsd-docs-1): one per doc (acc and acc_norm both `right`, acc_norm null
    where lm-eval defines none) and one per perplexity window."""
    method = "baseline" if plan == "base" else parse_variant(plan).method
    common = {"model": model, "method": method, "plan": plan, "params_model_fraction": fraction, "split": "test"}
    rows = []
    for task, scores in right.items():
        ids = items[task] if items and task in items else range(len(scores))
        for item, s in zip(ids, scores):
            norm = None if task_metric(task) == "acc" else float(s)
            rows.append({**common, "task": task, "unit": "doc", "item": int(item), "acc": float(s),
                         "acc_norm": norm, "nll": None, "tokens": None})
    if nll is not None:
        for i, (x, t) in enumerate(zip(nll, tokens)):
            rows.append({**common, "task": "lambada", "unit": "window", "item": i, "acc": None, "acc_norm": None,
                         "nll": float(x), "tokens": int(t)})
    return rows


def write_docs(path: Path, rows: list[dict], fmt: str = DOCS_FORMAT, ppl_doc_ids=("lambada/1",)) -> Path:
    """The evaluate stage's own writer (`sfsd.evaluate.items.write_items`); another `fmt` rewrites the metadata."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    write_items(path, rows, rows[0], ppl_doc_ids)
    if fmt != DOCS_FORMAT:
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"format": fmt.encode()}), path)
    return path


N_DOCS, N_WIN = 40, 12


def synthetic_variants() -> dict[str, dict]:
    """{variant: (params fraction, {task: 0/1 scores}, nll per window)}: base right on 20 of 40 docs of
    each task; feature-p54 loses 2 of them per task, weight-p54 loses 6, the searched model loses 1;
    perplexity on every window a constant multiple of base's (feature 2x, weight 8x)."""
    tokens = np.full(N_WIN, 100)
    base_nll = np.linspace(200.0, 300.0, N_WIN)
    out = {}
    for plan, frac, lost, ppl_factor in (("base", 1.0, 0, 1.0), ("feature-p54", 0.54, 2, 2.0),
                                         ("weight-p54", 0.54, 6, 8.0), ("search-feature-accuracy-average", 0.6, 1, 1.0)):
        right = {t: right_on(20 - lost, N_DOCS) for t in TASKS}
        out[plan] = (frac, right, base_nll + np.log(ppl_factor) * tokens, tokens)
    return out


@pytest.fixture
def docs_files(tmp_path):
    paths = []
    for plan, (frac, right, nll, tokens) in synthetic_variants().items():
        paths.append(write_docs(tmp_path / "eval" / f"{plan}.docs.parquet",
                                variant_docs(plan, frac, right, nll, tokens)))
    return paths


def test_read_docs(docs_files):
    data = C.read_docs(docs_files)
    assert list(data) == ["base", "feature-p54", "weight-p54", "search-feature-accuracy-average"]
    base = data["base"]
    assert (base["model"], base["method"], base["split"], base["params_model_fraction"]) == \
        ("tiny", "baseline", "test", 1.0)
    assert sorted(base["docs"]) == sorted(TASKS) and list(base["windows"]) == ["lambada"]
    assert np.isnan(base["docs"]["boolq"]["acc_norm"]).all() and base["docs"]["piqa"]["acc"].sum() == 20
    assert base["windows"]["lambada"]["tokens"].tolist() == [100] * N_WIN
    assert C.variant_scores(base, "paper")["boolq"].sum() == 20


def test_comparisons_table(docs_files, tmp_path):
    md, out_csv = tmp_path / "t" / "comparisons.md", tmp_path / "t" / "comparisons.csv"
    rows = C.comparisons_table(docs_files, "paper", md, out_csv, seed=0, n_boot=300)
    pairs = [(r["a"], r["b"]) for r in rows]
    assert pairs == [("feature-p54", "weight-p54"), ("search-feature-accuracy-average", "feature-p54"),
                     ("feature-p54", "base"), ("weight-p54", "base"), ("search-feature-accuracy-average", "base")]
    fw = rows[0]
    # feature keeps 4 more right docs of 40 per task than weight: +10 points, the same in every task
    assert fw["average_diff"] == pytest.approx(10.0) and fw["piqa_diff"] == pytest.approx(10.0)
    assert fw["a_params_%"] == 54.0 and fw["b_params_%"] == 54.0 and fw["n_docs"] == 3 * N_DOCS
    assert fw["ppl_ratio_lambada"] == pytest.approx(0.25)  # ppl 2x base over 8x base
    assert fw["ppl_ratio_lambada_low"] == pytest.approx(0.25) and fw["ppl_ratio_lambada_high"] == pytest.approx(0.25)
    assert fw["boolq_low"] < 10.0 < fw["boolq_high"]
    assert rows[2]["average_diff"] == pytest.approx(-5.0)
    with open(out_csv, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 5 and float(read[0]["average_diff"]) == pytest.approx(10.0)
    assert list(read[0])[:7] == ["a", "b", "a_params_%", "b_params_%", "average_diff", "average_low", "average_high"]
    assert {"boolq_diff", "piqa_high", "arc_easy_low", "ppl_ratio_lambada", "n_docs"} <= set(read[0])
    text = md.read_text()
    assert "paired bootstrap" in text and "B=300" in text and "seed 0" in text and "x100 points" in text
    assert "boolq acc, piqa acc_norm, arc_easy acc_norm" in text
    assert "Docs per task: boolq 40, piqa 40, arc_easy 40." in text and "lambada 12" in text
    header = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert header == ("| a | b | a_params_% | b_params_% | average | informative | boolq | piqa | arc_easy "
                      "| ppl_ratio_lambada | n_docs |")
    fw_line = next(line for line in text.splitlines() if line.startswith("| feature-p54 | weight-p54 |"))
    cells = [c.strip() for c in fw_line.strip("|").split("|")]
    assert cells[4].startswith("+10.0 [") and cells[10] == "120"
    assert cells[9] == "0.250 [0.250, 0.250]"
    # these files record no gold labels: no majority-class rate, so no task is known to be informative
    assert cells[5] == "" and fw["informative_diff"] is None
    assert "Informative average: none, the dense model is informative on no task" in text
    assert "boolq: majority-class rate unknown (rerun its evaluation)" in text
    assert C.format_diff(C.Interval(2.1, -0.4, 4.6)) == "+2.1 [-0.4, 4.6]"
    assert C.format_diff(C.Interval(-0.04, -0.04, 0.0)) == "+0.0 [0.0, 0.0]"
    # the same seed, the same table; another seed, other intervals
    again = C.comparisons_table(docs_files, "paper", tmp_path / "a.md", tmp_path / "a.csv", seed=0, n_boot=300)
    assert again == rows and (tmp_path / "a.md").read_text() == text
    other = C.comparisons_table(docs_files, "paper", tmp_path / "b.md", tmp_path / "b.csv", seed=1, n_boot=300)
    assert [r["average_diff"] for r in other] == [r["average_diff"] for r in rows]
    assert [(r["piqa_low"], r["piqa_high"]) for r in other] != [(r["piqa_low"], r["piqa_high"]) for r in rows]


def test_no_windows_leaves_the_ratio_out(tmp_path):
    paths = [write_docs(tmp_path / f"{p}.docs.parquet", variant_docs(p, f, {"piqa": right_on(k, 10)}))
             for p, f, k in (("base", 1.0, 6), ("weight-b80", 0.8, 4))]
    rows = C.comparisons_table(paths, "acc", tmp_path / "c.md", tmp_path / "c.csv", n_boot=100)
    assert len(rows) == 1 and rows[0]["piqa_diff"] == pytest.approx(-20.0)
    assert not any(k.startswith("ppl_ratio") for k in rows[0])
    # a pair where only one variant has windows shows an empty ratio
    paths.append(write_docs(tmp_path / "feature-b80.docs.parquet", variant_docs(
        "feature-b80", 0.8, {"piqa": right_on(5, 10)}, nll=[10.0, 20.0], tokens=[5, 5])))
    rows = C.comparisons_table(paths, "acc", tmp_path / "c.md", tmp_path / "c.csv", n_boot=100)
    assert [r["ppl_ratio_lambada"] for r in rows] == [None, None, None]


def test_mismatched_docs_are_refused(tmp_path):
    right = {"piqa": right_on(5, 10), "arc_easy": right_on(5, 10)}
    base = write_docs(tmp_path / "base.docs.parquet", variant_docs("base", 1.0, right))
    shifted = write_docs(tmp_path / "feature-b80.docs.parquet", variant_docs(
        "feature-b80", 0.8, right, items={"arc_easy": range(1, 11)}))
    with pytest.raises(DataError, match="cannot pair feature-b80 with base: their arc_easy docs differ"):
        C.comparisons_table([base, shifted], "paper", tmp_path / "x.md", tmp_path / "x.csv", n_boot=10)
    fewer = write_docs(tmp_path / "weight-b80.docs.parquet",
                       variant_docs("weight-b80", 0.8, {"piqa": right_on(5, 10)}))
    with pytest.raises(DataError, match="weight-b80 has no arc_easy docs"):
        C.comparisons_table([base, fewer], "paper", tmp_path / "x.md", tmp_path / "x.csv", n_boot=10)
    windows = [write_docs(tmp_path / f"w{i}" / f"{p}.docs.parquet",
                          variant_docs(p, 1.0, right, nll=[1.0, 2.0], tokens=tok))
               for i, (p, tok) in enumerate((("base", [4, 4]), ("feature-b80", [4, 5])))]
    with pytest.raises(DataError, match="windows score different tokens"):
        C.comparisons_table(windows, "paper", tmp_path / "x.md", tmp_path / "x.csv", n_boot=10)
    # the same window count and tokens, but cut from other perplexity documents
    other_text = [write_docs(tmp_path / f"t{i}" / f"{p}.docs.parquet",
                             variant_docs(p, 1.0, right, nll=[1.0, 2.0], tokens=[4, 4]), ppl_doc_ids=ids)
                  for i, (p, ids) in enumerate((("base", ["lambada/1"]), ("feature-b80", ["lambada/2"])))]
    with pytest.raises(DataError, match="windows come from different documents"):
        C.comparisons_table(other_text, "paper", tmp_path / "x.md", tmp_path / "x.csv", n_boot=10)
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "x.csv").exists()


def test_malformed_docs_files(tmp_path, docs_files):
    wrong = write_docs(tmp_path / "old.docs.parquet", variant_docs("base", 1.0, {"piqa": right_on(1, 2)}),
                       fmt="sfsd-results-1")
    with pytest.raises(DataError, match="not a per-item docs file"):
        C.read_docs([wrong])
    with pytest.raises(DataError, match="missing docs file"):
        C.read_docs([tmp_path / "nope.docs.parquet"])
    (tmp_path / "bad.docs.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        C.read_docs([tmp_path / "bad.docs.parquet"])
    twice = variant_docs("base", 1.0, {"piqa": right_on(1, 3)}, items={"piqa": [0, 1, 1]})
    with pytest.raises(DataError, match="piqa lists item 1 twice"):
        C.read_docs([write_docs(tmp_path / "twice.docs.parquet", twice)])
    with pytest.raises(DataError, match="variant base is in two docs files"):
        C.read_docs([docs_files[0], docs_files[0]])
    other_model = write_docs(tmp_path / "m" / "weight-b80.docs.parquet", variant_docs(
        "weight-b80", 0.8, {"piqa": right_on(1, 2)}, model="other"))
    with pytest.raises(DataError, match="compare one model's variants on one split"):
        C.read_docs([docs_files[0], other_model])
    with pytest.raises(DataError, match="no pair to compare"):
        C.comparisons_table([docs_files[0]], "paper", tmp_path / "y.md", tmp_path / "y.csv", n_boot=10)
    from sfsd.errors import ConfigError

    with pytest.raises(ConfigError, match="no acc_norm for boolq"):
        C.comparisons_table(docs_files, "acc_norm", tmp_path / "y.md", tmp_path / "y.csv", n_boot=10)


def test_cli(docs_files, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("comparisons", "--seed", "3", "--n-boot", "200", "--out-md", str(out / "c.md"),
                   "--out-csv", str(out / "c.csv"), *map(str, docs_files))
    assert proc.returncode == 0, proc.stderr
    C.comparisons_table(docs_files, "paper", tmp_path / "d.md", tmp_path / "d.csv", seed=3, n_boot=200)
    assert (out / "c.md").read_text() == (tmp_path / "d.md").read_text()
    assert (out / "c.csv").read_text() == (tmp_path / "d.csv").read_text()
    right = {"piqa": right_on(5, 10)}
    bad = [write_docs(tmp_path / "bad" / "base.docs.parquet", variant_docs("base", 1.0, right)),
           write_docs(tmp_path / "bad" / "weight-b80.docs.parquet",
                      variant_docs("weight-b80", 0.8, right, items={"piqa": range(2, 12)}))]
    proc = run_cli("comparisons", "--out-md", str(out / "e.md"), "--out-csv", str(out / "e.csv"), *map(str, bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: cannot pair weight-b80 with base: their piqa docs differ (10 vs 10; 2 only in weight-b80, 2 only "
        "in base); score both on the same split, limit and perplexity windows"]


# ------------------------------------------------------------------------------------ the rule


@pytest.mark.slow  # runs the real Snakefile (a minute); test_cli runs the same command on the same kind of files
def test_comparisons_rule_in_the_workflow(tmp_path):
    """The comparisons_table rule of the real Snakefile from synthetic docs files alone: --allowed-rules keeps
    the evaluation rules out (as on a machine that holds only copied results); its outputs are default
    targets; a changed bootstrap seed reruns it."""
    snakefile, workdir = new_run(tmp_path)
    model = tmp_path / "model"  # a local model folder: the config check and the planner read its config.json only
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                   "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32,
                                                   "num_attention_heads": 2, "vocab_size": 64,
                                                   "max_position_embeddings": 512}))
    config = {
        "models": {"tiny": {"source": "local", "path": str(model)}},
        "calibration": {"source": "text_file", "path": str(model / "config.json")},
        "device": "cpu",
        "compression": {"methods": ["feature", "weight"], "budgets": {"p54": 0.54}, "first_block": 0,
                        "allocations": ["uniform"]},
        # synthetic docs files stand in for evaluations: no model to check the native scorer on
        "evaluation": {"tasks": list(TASKS), "metric": "acc", "bootstrap": {"seed": 0, "resamples": 200},
                       "check_docs": 0},
        "search": {"enabled": True, "methods": ["feature"], "modes": ["accuracy"],
                   "targets": {"accuracy": ["average"]}, "budgets": False},
        "laser": {"enabled": False},
    }
    for plan, (frac, right, nll, tokens) in synthetic_variants().items():
        write_docs(workdir / "results" / "tiny" / "eval" / f"{plan}.docs.parquet",
                   variant_docs(plan, frac, right, nll, tokens))
    targets = ["results/tables/tiny/comparisons.md", "results/tables/tiny/comparisons.csv"]
    only = ["--allowed-rules", "comparisons_table"]
    # the default targets list the table (a dry run of the whole workflow plans it)
    proc = snakemake(snakefile, workdir, config, "--dry-run")
    assert planned_jobs(proc).get("comparisons_table") == 1
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run", *targets, *only)) == {
        "comparisons_table": 1}
    snakemake(snakefile, workdir, config, *targets, *only)
    md = (workdir / targets[0]).read_text()
    assert "B=200" in md and "seed 0" in md and "| feature-p54 | weight-p54 | 54.0 | 54.0 | +10.0 [" in md
    with open(workdir / targets[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"]) for r in rows] == [
        ("feature-p54", "weight-p54"), ("search-feature-accuracy-average", "feature-p54"), ("feature-p54", "base"),
        ("weight-p54", "base"), ("search-feature-accuracy-average", "base")]
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run", *targets, *only)) == {}
    reseeded = {**config, "evaluation": {**config["evaluation"], "bootstrap": {"seed": 1, "resamples": 200}}}
    assert planned_jobs(snakemake(snakefile, workdir, reseeded, "--dry-run", *targets, *only)) == {
        "comparisons_table": 1}
