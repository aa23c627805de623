# The run's own account: at its start, one line per stage with its jobs and their expected time from the
# earlier benchmark files under results/benchmarks/; at its end, where the tables, figures and report are
# (sfsd.resources.timing). Nothing here changes what runs.
import collections


def _run_jobs():
    """{rule: jobs to run} of this run, in the order they run (a rule's first job's level in the DAG's
    topological order; rules that hold no work left out)."""
    jobs = list(workflow.dag.needrun_jobs())
    counts = collections.Counter(job.rule.name for job in jobs)
    level = {}
    for depth, batch in enumerate(workflow.dag.toposorted(jobs)):
        for job in batch:
            level.setdefault(job.rule.name, depth)
    ordered = sorted(counts, key=lambda rule: (level.get(rule, 0), rule))
    return {rule: counts[rule] for rule in ordered if rule not in ("all", "quick")}


onstart:
    from sfsd.resources.timing import earlier_seconds, stage_lines

    jobs = _run_jobs()
    pending = any(True for _ in workflow.dag.checkpoint_jobs)
    lines = stage_lines(jobs, earlier_seconds("results/benchmarks"), local_cores(), pending)
    print("\n".join(f"run plan: {line}" for line in lines), file=sys.stderr)


onsuccess:
    from sfsd.resources.timing import finish_line

    targets = [str(f) for job in workflow.dag.targetjobs for f in job.input] + [
        str(f) for job in workflow.dag.targetjobs for f in job.output]
    print(finish_line(targets), file=sys.stderr)
