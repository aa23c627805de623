"""The informative average: the six-task average restricted to the tasks on which the dense model measurably
beats answering without reading.

On a small model a task can sit at or below what a constant answer gets: on the embedded 135M model the
dense model scores 37.5 on BoolQ, below the 62% of always answering "yes", while a badly compressed model
scores 65.0 there, so a more broken model raises the six-task average. A task enters the informative
average when the dense model's 95% interval (score ± 1.96 standard errors) lies above its floor, the
higher of its majority-class rate and chance (`sfsd.tasks.baselines`, of the documents scored). The
decision is made from the dense model's scores alone, before any comparison, and applies to every model
of the table. The tables (`sfsd.report.tables`) and the paired comparisons (`sfsd.report.compare`) show
the informative average beside the paper's average and name each excluded task with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sfsd.evaluate.items import Z95


@dataclass(frozen=True)
class Verdict:
    """Whether a task enters the informative average, and why, in points (x100): 'boolq: dense 37.5 [30.8,
    44.2] <= majority 62.0' (excluded) or 'piqa: dense 60.5 [53.7, 67.3] > chance 50.0' (kept)."""

    task: str
    informative: bool
    reason: str


def task_verdict(task: str, score: float | None, stderr: float | None, majority: float | None,
                 chance: float | None) -> Verdict:
    """The verdict on one task from the dense model's mean score and its standard error (fractions) and the
    task's majority-class rate and chance (fractions of the documents scored): informative when
    score - 1.96 x stderr > max(majority, chance). Anything unknown leaves the task out, saying what."""
    if score is None:
        return Verdict(task, False, f"{task}: the dense model has no score")
    if majority is None or chance is None:
        return Verdict(task, False, f"{task}: majority-class rate unknown (rerun its evaluation)")
    kind, floor = ("majority", majority) if majority >= chance else ("chance", chance)
    if stderr is None:
        return Verdict(task, False, f"{task}: dense {100 * score:.1f} has no interval (standard error unknown)")
    low, high = score - Z95 * stderr, score + Z95 * stderr
    above = low > floor
    return Verdict(task, above, f"{task}: dense {100 * score:.1f} [{100 * low:.1f}, {100 * high:.1f}] "
                                f"{'>' if above else '<='} {kind} {100 * floor:.1f}")


def informative_tasks(verdicts: Mapping[str, Verdict], tasks: Sequence[str]) -> list[str]:
    """The tasks of `tasks` (in their order) whose verdict is informative."""
    return [t for t in tasks if t in verdicts and verdicts[t].informative]


def informative_note(verdicts: Mapping[str, Verdict] | None, tasks: Sequence[str]) -> str:
    """A caption sentence: over which of `tasks` the informative average runs and each excluded task with its
    reason; or that the dense model is informative on no task (no average of nothing), or that there is no
    dense model to decide from."""
    if verdicts is None:
        return "Informative average: none (no dense model among the variants to decide its tasks from)."
    kept = informative_tasks(verdicts, tasks)
    excluded = "; ".join(verdicts[t].reason if t in verdicts else f"{t}: the dense model has no score"
                         for t in tasks if t not in kept)
    rule = ("the tasks where the dense model's 95% interval lies above the higher of the task's majority-class "
            "rate and chance, on the documents scored")
    if not kept:
        return f"Informative average: none, the dense model is informative on no task ({rule}): {excluded}."
    return f"Informative average over {', '.join(kept)} ({rule})" + (f"; excluded: {excluded}." if excluded else ".")


__all__ = ["Verdict", "informative_note", "informative_tasks", "task_verdict"]
