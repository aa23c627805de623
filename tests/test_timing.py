"""What a run says at its start and end (sfsd.resources.timing), on hand-made benchmark records."""

from __future__ import annotations

from sfsd.resources.timing import earlier_seconds, finish_line, stage_lines


def test_earlier_seconds_reads_each_rules_benchmark_records(tmp_path):
    rec = "s\th:m:s\tmax_rss\n{}\t0:00:10\t100\n"
    (tmp_path / "evaluate_model" / "m").mkdir(parents=True)
    (tmp_path / "evaluate_model" / "m" / "base.tsv").write_text(rec.format(10.0))
    (tmp_path / "evaluate_model" / "m" / "feature-p54.tsv").write_text(rec.format(30.0))
    (tmp_path / "eigendecompose" / "m").mkdir(parents=True)
    (tmp_path / "eigendecompose" / "m" / "block_000.tsv").write_text(rec.format(4.0))
    (tmp_path / "eigendecompose" / "m" / "broken.tsv").write_text("not a record")
    assert earlier_seconds(tmp_path) == {"eigendecompose": [4.0], "evaluate_model": [10.0, 30.0]}
    assert earlier_seconds(tmp_path / "absent") == {}


def test_stage_lines_count_jobs_and_expect_the_median_earlier_job():
    lines = stage_lines({"evaluate_model": 4, "search": 1}, {"evaluate_model": [10.0, 30.0, 200.0]}, cores=2)
    assert lines[0].split() == ["evaluate_model", "4", "jobs", "~2", "min", "(median", "of", "3", "earlier)"]
    assert lines[1].split() == ["search", "1", "job", "(no", "earlier", "timing)"]
    # 4 x 30 s of timed work over 2 cores
    assert lines[2] == "5 jobs; the timed ones ~60 s on 2 cores (estimate from earlier jobs); 1 stage never timed here"


def test_a_cluster_run_without_a_core_count_sums_the_job_time():
    line = stage_lines({"evaluate_model": 3}, {"evaluate_model": [40.0]}, cores=None)[-1]
    assert line == "3 jobs; the timed ones ~2 min of job time (estimate from earlier jobs)"


def test_a_pending_checkpoint_makes_the_count_a_lower_bound():
    line = stage_lines({"collect_features": 1}, {}, cores=8, pending_checkpoint=True)[-1]
    assert line.startswith("1+ jobs") and "once collect_features has run" in line


def test_finish_line_names_the_folders_of_the_tables_and_figures():
    line = finish_line(["results/tables/m/quick/table1.md", "results/tables/m/quick/comparisons.md",
                        "results/figures/m/spectra.png", "results/m/eigen/summary.json"])
    assert line == ("finished: tables in results/tables/m/quick; figures in results/figures/m; "
                    "the HTML report: snakemake --report report.html")
