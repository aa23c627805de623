"""What a run will take, told at its start: per stage the jobs to run and their expected time from the run's
own earlier benchmark files (results/benchmarks/<rule>/.../*.tsv, Snakemake's `benchmark:` records), and
the line a finished run ends with, naming its tables and report.

`earlier_seconds(benchmarks)` reads the records; `stage_lines(jobs, seconds, cores)` and `finish_line(...)`
are pure. rules/progress.smk prints them from Snakemake's onstart and onsuccess handlers.
`simulate_schedule(jobs, cores)` and `critical_path(jobs)` replay a finished run's jobs on another number of
cores (workflow/benchmarks/run_estimate.py reads them from the run's log).
"""

from __future__ import annotations

import csv
import heapq
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TimedJob:
    """One job of a finished run, for `simulate_schedule`: its wall seconds, the cores it holds, its
    Snakemake priority and the jobs whose outputs it reads."""

    name: str
    seconds: float
    threads: int = 1
    priority: int = 0
    after: tuple[str, ...] = ()


def simulate_schedule(jobs: Sequence[TimedJob], cores: int) -> float:
    """Wall seconds of running `jobs` on `cores` cores: each job starts when the jobs it reads have finished
    and its threads (at most `cores`) are free, the ready job of highest priority first and, among equal
    priorities, the longest first; no job waits for cores that another job could use now (Snakemake's
    scheduler reserves none either). The jobs keep their measured times, so on more cores it is an
    estimate: a job's own speed-up from more threads, and the jobs' contention for memory bandwidth, are
    left out."""
    by_name = {j.name: j for j in jobs}
    missing = {a for j in jobs for a in j.after} - set(by_name)
    if missing:
        raise ValueError(f"jobs wait for unknown jobs: {sorted(missing)[:3]}")
    waiting = {j.name: len(set(j.after)) for j in jobs}
    readers: dict[str, list[str]] = {}
    for j in jobs:
        for a in set(j.after):
            readers.setdefault(a, []).append(j.name)
    ready = [j.name for j in jobs if waiting[j.name] == 0]
    running: list[tuple[float, str]] = []
    free, now, done = cores, 0.0, 0
    while done < len(jobs):
        ready.sort(key=lambda n: (-by_name[n].priority, -by_name[n].seconds, n))
        for name in list(ready):
            need = min(max(1, by_name[name].threads), cores)
            if need <= free:
                free -= need
                ready.remove(name)
                heapq.heappush(running, (now + by_name[name].seconds, name))
        if not running:
            raise ValueError("the jobs wait for each other in a cycle")
        now, name = heapq.heappop(running)
        free += min(max(1, by_name[name].threads), cores)
        done += 1
        for reader in readers.get(name, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    return now


def critical_path(jobs: Sequence[TimedJob]) -> float:
    """Seconds of the longest chain of jobs each reading the one before: no number of cores runs faster."""
    by_name = {j.name: j for j in jobs}
    memo: dict[str, float] = {}

    def finish(name: str) -> float:
        if name not in memo:
            job = by_name[name]
            memo[name] = job.seconds + max((finish(a) for a in job.after), default=0.0)
        return memo[name]

    return max((finish(j.name) for j in jobs), default=0.0)
