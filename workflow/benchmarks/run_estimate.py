"""A finished run's time on other core counts, from its own records: the jobs, their inputs and outputs,
threads and priorities from Snakemake's log of the run (`.snakemake/log/`), each job's wall time from its
benchmark file (`results/benchmarks/`) or, for the jobs without one, from the log's timestamps. The jobs are
replayed on each core count (`sfsd.resources.timing.simulate_schedule`); beside it the two bounds no
schedule beats, the longest chain of jobs and the summed job time over the cores.

    python workflow/benchmarks/run_estimate.py [--dir .] [--log .snakemake/log/<run>.snakemake.log] [--cores 2,8]

An estimate, labelled so wherever it is quoted: the jobs keep the times they took in the run, so a job
that would run faster with more threads, or slower beside more jobs sharing the memory bandwidth, is not
modelled. Replaying the run on its own core count checks the replay against the run's real wall time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
from pathlib import Path

from sfsd.resources.timing import TimedJob, critical_path, simulate_schedule

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
HEAD = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.strptime(" ".join(stamp.split()), "%a %b %d %H:%M:%S %Y")


def parse_log(text: str) -> tuple[list[dict], float]:
    """(the jobs the log started: rule, jobid, input, output, threads, priority, benchmark, start and end
    times; the run's wall seconds from its first to its last timestamp)."""
    jobs: dict[str, dict] = {}
    stamp = first = last = None
    current = None
    for line in text.splitlines():
        m = STAMP.match(line)
        if m:
            stamp = _time(m.group(1))
            first, last = first or stamp, stamp
            continue
        m = HEAD.match(line)
        if m:
            current = {"rule": m.group(1), "start": stamp, "input": [], "output": [], "threads": 1, "priority": 0,
                       "benchmark": None}
            continue
        m = FINISHED.match(line)
        if m and m.group(1) in jobs:
            jobs[m.group(1)]["end"] = stamp
            continue
        if current is None or not line.startswith("    "):
            if line.startswith("Shell command") or not line.strip():
                current = None
            continue
        key, _, value = line.strip().partition(": ")
        if key in ("input", "output"):
            current[key] = [v.strip() for v in value.split(",") if v.strip()]
        elif key in ("threads", "priority"):
            current[key] = int(value)
        elif key == "benchmark":
            current["benchmark"] = value.strip()
        elif key == "jobid":
            jobs[value.strip()] = current
    wall = (last - first).total_seconds() if first and last else 0.0
    return [{"jobid": k, **v} for k, v in jobs.items()], wall


def timed_jobs(jobs: list[dict], root: Path) -> list[TimedJob]:
    """The jobs with their seconds (benchmark file, else the log's start and end) and the jobs whose
    outputs (a file, or a folder above it) they read."""
    producer: dict[str, str] = {}
    for job in jobs:
        for out in job["output"]:
            producer[out.rstrip("/")] = job["jobid"]
    out = []
    for job in jobs:
        seconds = None
        if job["benchmark"] and (root / job["benchmark"]).exists():
            with (root / job["benchmark"]).open() as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            seconds = float(rows[-1]["s"]) if rows else None
        if seconds is None:
            if job.get("end") is None or job["start"] is None:
                continue  # never finished in this log (a failed or interrupted job)
            seconds = (job["end"] - job["start"]).total_seconds()
        after = set()
        for path in job["input"]:
            parts = Path(path).parts
            for k in range(len(parts), 0, -1):
                owner = producer.get(str(Path(*parts[:k])))
                if owner is not None and owner != job["jobid"]:
                    after.add(owner)
                    break
        out.append(TimedJob(job["jobid"], seconds, job["threads"], job["priority"], tuple(sorted(after))))
    known = {j.name for j in out}
    return [TimedJob(j.name, j.seconds, j.threads, j.priority, tuple(a for a in j.after if a in known)) for j in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("."), help="the run's working folder")
    ap.add_argument("--log", type=Path, help="Snakemake's log of the run (default: the newest in <dir>/.snakemake/log)")
    ap.add_argument("--cores", default="2,8", help="core counts to replay the run on")
    args = ap.parse_args(argv)
    log = args.log
    if log is None:
        logs = sorted((args.dir / ".snakemake" / "log").glob("*.snakemake.log"))
        if not logs:
            sys.exit(f"no Snakemake log under {args.dir / '.snakemake' / 'log'}; pass --log")
        log = logs[-1]
    jobs, wall = parse_log(log.read_text())
    timed = timed_jobs(jobs, args.dir)
    if not timed:
        sys.exit(f"{log} records no finished job")
    total = sum(j.seconds * j.threads for j in timed)
    chain = critical_path(timed)
    print(f"{log.name}: {len(timed)} jobs, {total / 60:.1f} core-min of job time, the longest chain "
          f"{chain / 60:.1f} min; the run took {wall / 60:.1f} min")
    for cores in (int(c) for c in args.cores.split(",")):
        est = simulate_schedule([TimedJob(j.name, j.seconds, min(j.threads, cores), j.priority, j.after)
                                 for j in timed], cores)
        print(f"--cores {cores}: {est / 60:.1f} min replayed (estimate; bounds: chain {chain / 60:.1f}, "
              f"job time / cores {total / cores / 60:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
