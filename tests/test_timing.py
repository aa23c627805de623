"""What a run says at its start and end (sfsd.resources.timing), on hand-made benchmark records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sfsd.resources.timing import TimedJob, critical_path, earlier_seconds, finish_line, simulate_schedule, stage_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "benchmarks"))


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


def test_replayed_schedules_of_hand_made_jobs():
    """Two cores: a 2-thread job behind two 1-thread ones waits for both; priority lets a chain start first."""
    a, b = TimedJob("a", 10), TimedJob("b", 4)
    assert simulate_schedule([a, b], 2) == 10 and simulate_schedule([a, b], 1) == 14
    # c reads a: 10 then 5; b runs beside a
    c = TimedJob("c", 5, after=("a",))
    assert simulate_schedule([a, b, c], 2) == 15 and critical_path([a, b, c]) == 15
    # a 2-thread job holds both cores; the longest ready job first: a (10) with b (4), then d (3 s, 2 threads)
    d = TimedJob("d", 3, threads=2)
    assert simulate_schedule([a, b, d], 2) == 13
    # the chain head h runs first (priority) beside e0; its 2-thread reader t then needs both cores, which
    # e1 takes one of at once (no job waits for cores another could use): t runs 9-15, after e1 frees its core
    h, t = TimedJob("h", 1, priority=10), TimedJob("t", 6, threads=2, priority=10, after=("h",))
    assert simulate_schedule([h, t, TimedJob("e0", 8), TimedJob("e1", 8)], 2) == 15
    # on 1 thread t starts at 1 and the run ends when the last evaluation does: 1-7, then e1 7-15
    t1 = TimedJob("t", 6, priority=10, after=("h",))
    assert simulate_schedule([h, t1, TimedJob("e0", 8), TimedJob("e1", 8)], 2) == 15
    assert simulate_schedule([h, t1, TimedJob("e0", 8), TimedJob("e1", 8, after=("t",))], 2) == 15
    # without the priority the longest jobs go first and the chain waits: e0, e1 0-8, h 8-9, t 9-15, c 15-23
    c = TimedJob("c", 8, after=("t",))
    assert simulate_schedule([TimedJob("h", 1), TimedJob("t", 6, after=("h",)), TimedJob("e0", 8), TimedJob("e1", 8),
                              c], 2) == 23
    assert simulate_schedule([h, t1, TimedJob("e0", 8), TimedJob("e1", 8), c], 2) == 16  # h, t, c | e0, e1
    # threads above the cores are capped to them
    assert simulate_schedule([TimedJob("w", 5, threads=8)], 2) == 5
    with pytest.raises(ValueError, match="unknown jobs"):
        simulate_schedule([TimedJob("x", 1, after=("y",))], 2)
    with pytest.raises(ValueError, match="cycle"):
        simulate_schedule([TimedJob("x", 1, after=("y",)), TimedJob("y", 1, after=("x",))], 2)


LOG = """Building DAG of jobs...
[Sun Dec  6 20:20:10 2026]
localrule prepare_model:
    output: results/models/m
    jobid: 3
    resources: tmpdir=/tmp
Shell command: python -m sfsd prepare
[Sun Dec  6 20:20:30 2026]
Finished jobid: 3 (Rule: prepare_model)
[Sun Dec  6 20:20:30 2026]
localcheckpoint collect_features:
    input: results/models/m, results/m/calibration/tokens.safetensors
    output: results/m/features
    jobid: 5
    benchmark: results/benchmarks/collect_features/m.tsv
    priority: 10
    threads: 2
Shell command: python -m sfsd collect
[Sun Dec  6 20:20:31 2026]
localrule eigendecompose:
    input: results/m/features/block_000.safetensors
    output: results/m/eigen/block_000.safetensors
    jobid: 9
Shell command: python -m sfsd eigen
[Sun Dec  6 20:22:00 2026]
Finished jobid: 5 (Rule: collect_features)
[Sun Dec  6 20:22:10 2026]
Finished jobid: 9 (Rule: eigendecompose)
"""


def test_run_estimate_reads_the_jobs_of_a_snakemake_log(tmp_path):
    """Jobs, threads, priorities and the folder an input lies in from the log; seconds from the benchmark
    file where there is one, else from the log's timestamps."""
    from run_estimate import parse_log, timed_jobs

    jobs, wall = parse_log(LOG)
    assert wall == 120
    (tmp_path / "results/benchmarks/collect_features").mkdir(parents=True)
    (tmp_path / "results/benchmarks/collect_features/m.tsv").write_text("s\th:m:s\n42.5\t0:00:42\n")
    timed = {j.name: j for j in timed_jobs(jobs, tmp_path)}
    assert timed["3"] == TimedJob("3", 20.0)
    assert timed["5"] == TimedJob("5", 42.5, threads=2, priority=10, after=("3",))
    assert timed["9"] == TimedJob("9", 99.0, after=("5",))  # a file inside the checkpoint's folder
