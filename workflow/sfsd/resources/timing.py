"""What a run will take, told at its start: per stage the jobs to run and their expected time from the run's
own earlier benchmark files (results/benchmarks/<rule>/.../*.tsv, Snakemake's `benchmark:` records), and
the line a finished run ends with, naming its tables and report.

`earlier_seconds(benchmarks)` reads the records; `stage_lines(jobs, seconds, cores)` and `finish_line(...)`
are pure. rules/progress.smk prints them from Snakemake's onstart and onsuccess handlers.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path


def earlier_seconds(benchmarks: str | Path) -> dict[str, list[float]]:
    """{rule: wall seconds of each of its earlier jobs} from the benchmark files under `benchmarks`
    (results/benchmarks/<rule>/...); a file that does not parse is skipped."""
    out: dict[str, list[float]] = {}
    root = Path(benchmarks)
    if not root.is_dir():
        return out
    for rule_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(rule_dir.rglob("*.tsv")):
            try:
                with f.open() as fh:
                    out.setdefault(rule_dir.name, []).extend(float(r["s"]) for r in csv.DictReader(fh, delimiter="\t"))
            except (OSError, KeyError, ValueError):
                continue
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def stage_lines(jobs: Mapping[str, int], seconds: Mapping[str, Sequence[float]], cores: int | None,
                pending_checkpoint: bool = False) -> list[str]:
    """One line per rule with jobs to run: their count and, where earlier jobs of the rule were timed, the
    expected time (count x the median earlier job); then the total, as core-time spread over `cores`
    (an estimate: it ignores the order jobs must run in), or the summed job time where the run has no core
    count (a cluster run, whose jobs run side by side on their nodes). `pending_checkpoint`: the per-block jobs are not
    known until collect_features has run, so the counts are a lower bound."""
    lines, known, unknown = [], 0.0, []
    width = max((len(r) for r in jobs), default=0)
    for rule, n in jobs.items():
        if rule in seconds and seconds[rule]:
            expected = n * statistics.median(seconds[rule])
            known += expected
            lines.append(f"{rule:<{width}}  {n:>4} job{'s' if n > 1 else ' '}  ~{_minutes(expected)} "
                         f"(median of {len(seconds[rule])} earlier)")
        else:
            unknown.append(rule)
            lines.append(f"{rule:<{width}}  {n:>4} job{'s' if n > 1 else ' '}  (no earlier timing)")
    total = sum(jobs.values())
    summary = f"{total}{'+' if pending_checkpoint else ''} jobs"
    if known and cores:
        summary += f"; the timed ones ~{_minutes(known / cores)} on {cores} cores (estimate from earlier jobs)"
    elif known:
        summary += f"; the timed ones ~{_minutes(known)} of job time (estimate from earlier jobs)"
    if unknown:
        summary += f"; {len(unknown)} stage{'s' if len(unknown) > 1 else ''} never timed here"
    if pending_checkpoint:
        summary += "; per-block jobs are added once collect_features has run"
    return lines + [summary]


def finish_line(targets: Sequence[str]) -> str:
    """The last line of a successful run: where its tables and figures are, and how to make the report."""
    tables = sorted({str(Path(t).parent) for t in targets if "/tables/" in t})
    figures = sorted({str(Path(t).parent) for t in targets if "/figures/" in t})
    parts = [f"tables in {', '.join(tables)}"] if tables else []
    parts += [f"figures in {', '.join(figures)}"] if figures else []
    where = "; ".join(parts) or "outputs under results/"
    return f"finished: {where}; the HTML report: snakemake --report report.html"
