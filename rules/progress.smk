# The run's own account: at its start, one line per stage with its jobs and their expected time from the
# earlier benchmark files under results/benchmarks/; at its end, where the tables, figures and report are
# (sfsd.resources.timing). Nothing here changes what runs.
import collections


def _run_jobs():
    """{rule: jobs to run} of this run, in Snakemake's order (rules that hold no work left out)."""
    counts = collections.Counter(job.rule.name for job in workflow.dag.needrun_jobs())
    return {rule: n for rule, n in counts.items() if rule not in ("all", "quick")}


def _local_cores():
    """--cores of a local run; None for a cluster run, which has no total (asking for it is an error)."""
    try:
        return workflow.cores
    except Exception:  # snakemake's WorkflowError: "Workflow requires a total number of cores"
        return None


onstart:
    from sfsd.resources.timing import earlier_seconds, stage_lines

    jobs = _run_jobs()
    pending = any(True for _ in workflow.dag.checkpoint_jobs)
    lines = stage_lines(jobs, earlier_seconds("results/benchmarks"), _local_cores(), pending)
    print("\n".join(f"run plan: {line}" for line in lines), file=sys.stderr)


onsuccess:
    from sfsd.resources.timing import finish_line

    targets = [str(f) for job in workflow.dag.targetjobs for f in job.input] + [
        str(f) for job in workflow.dag.targetjobs for f in job.output]
    print(finish_line(targets), file=sys.stderr)
