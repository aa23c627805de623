"""What a multiple-choice task's score is worth without reading the question: the majority-class rate and
chance, computed from the documents actually scored.

- `majority_rate(golds)`: the accuracy of always giving the same answer (the choice index most often
  gold): max over index k of the fraction of documents whose gold is k (holds k, for a multi-gold
  document; lm-eval's invalid gold -100 is never right). BoolQ's "yes" is gold on 62% of its validation
  documents, so a model that always says "yes" scores 62 there.
- `chance_rate(choices)`: the expected accuracy of a uniform guess, the mean of 1/(number of choices)
  over the documents (ARC has 3 to 5 choices per question).
- `floor_rates(docs)`: both per task of per-document records {task, gold, choices} (the evaluate stage's
  scores carry them; `sfsd.evaluate.items`).

A score at or below max(majority, chance) says nothing about a model's knowledge of the task; the
informative average of the tables (`sfsd.report.informative`) keeps only the tasks where the dense
model's 95% interval lies above it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from sfsd.errors import DataError


def _answers(gold) -> set[int]:
    """The choice indices that count as right for one document's gold (an index or several)."""
    if isinstance(gold, (list, tuple, set, frozenset)):
        return {int(g) for g in gold if int(g) >= 0}
    return {int(gold)} if int(gold) >= 0 else set()


def majority_rate(golds: Sequence) -> float:
    """Fraction of the documents that always giving the most frequent gold index gets right (see the module
    docstring); DataError for no documents or an unknown (None) gold."""
    if not golds:
        raise DataError("no documents to compute a majority-class rate from")
    if any(g is None for g in golds):
        raise DataError("a document has no gold label; the majority-class rate is unknown")
    hits: Counter[int] = Counter()
    for gold in golds:
        hits.update(_answers(gold))
    return max(hits.values(), default=0) / len(golds)


def chance_rate(choices: Sequence[int]) -> float:
    """Expected accuracy of a uniform guess over each document's choices: mean of 1/choices."""
    if not choices:
        raise DataError("no documents to compute the chance rate from")
    if any(c is None or int(c) < 1 for c in choices):
        raise DataError(f"a document has no choices ({[c for c in choices if c is None or int(c) < 1][:1]})")
    return sum(1.0 / int(c) for c in choices) / len(choices)


def floor_rates(docs: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """{task: {"majority", "chance"}} (fractions) of per-document records {task, gold, choices}."""
    golds: dict[str, list] = defaultdict(list)
    choices: dict[str, list] = defaultdict(list)
    for d in docs:
        golds[d["task"]].append(d["gold"])
        choices[d["task"]].append(d["choices"])
    return {task: {"majority": majority_rate(golds[task]), "chance": chance_rate(choices[task])} for task in golds}


__all__ = ["chance_rate", "floor_rates", "majority_rate"]
