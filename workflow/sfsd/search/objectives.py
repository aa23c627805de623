"""The objectives of the rank search (`sfsd.search.algorithm`): what a candidate model is scored by on the search
split and when that score is close enough to the uncompressed model's.

Each has `name`, `score(model)`, `threshold(baseline, step)` and `passes(score, threshold)`:
- `AccuracyObjective`: mean multiple-choice metric over tasks; accepts score >= baseline - delta;
- `LoglikObjective`: mean gold-answer log-likelihood; accepts score >= baseline - delta;
- `KLObjective`: mean KL of the answer distributions from the uncompressed model's; accepts score <= delta;
- `PerplexityObjective`: perplexity of the search text; accepts ppl <= baseline * (1 + eps) ** step.
The multiple-choice ones also cut themselves into the released procedure's chunks (`chunks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sfsd.errors import ConfigError, DataError

RELEASED_CHUNKS = 3
_GUARD = 1e-9  # a score within rounding of its threshold passes


@dataclass
class AccuracyObjective:
    """Mean over tasks of a multiple-choice metric on the search split (native scorer, pre-tokenized).
    metric: a setting of `sfsd.tasks.registry.METRIC_CHOICES` resolved per task (`rows.mean_metric`); "paper"
    = acc for boolq and winogrande, acc_norm for the others, as lm-eval defines and the paper reports."""

    tokenizer: object
    requests: object  # scoring.EncodedRequests
    metric: str = "paper"
    delta: float = 0.0
    batch_size: int = 8
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.name = self.metric

    def _scores(self, model: nn.Module) -> list[dict]:
        from sfsd.evaluate.scoring import score_multiple_choice

        # one forward per whole input (share_prefix off): the block-input cache records and replays the
        # hidden states of whole inputs, and a KV-cache pass over prefix and suffixes would bypass it
        return score_multiple_choice(model, self.tokenizer, self.requests, self.batch_size, share_prefix=False)

    def score(self, model: nn.Module) -> float:
        from sfsd.evaluate.rows import mean_metric

        return mean_metric(self._scores(model), self.metric)

    def threshold(self, baseline: float, step: int) -> float:
        return baseline - self.delta

    def passes(self, score: float, threshold: float) -> bool:
        return score >= threshold - _GUARD

    def chunks(self, n: int = RELEASED_CHUNKS) -> list:
        """The same objective on n contiguous chunks of every task's documents (floor(n_task / n) each, the
        remainder left out, as the released code cuts its search split)."""
        from dataclasses import replace

        from sfsd.evaluate.scoring import encode_requests

        by_task: dict[str, list] = {}
        for doc in self.requests.docs:
            by_task.setdefault(doc.task, []).append(doc)
        short = sorted(task for task, docs in by_task.items() if len(docs) < n)
        if short:
            raise ConfigError(f"the search split of {', '.join(short)} has fewer than {n} documents: the released "
                              f"procedure scores {n} chunks of every task (raise search.search_limit)")
        out = []
        for i in range(n):
            docs = [d for task_docs in by_task.values()
                    for d in task_docs[i * (len(task_docs) // n):(i + 1) * (len(task_docs) // n)]]
            # a chunk scores its own documents: nothing of the whole split's state (kl's reference) carries over
            fresh = {"reference": None} if hasattr(self, "reference") else {}
            out.append(replace(self, requests=encode_requests(self.tokenizer, docs, self.requests.max_length), **fresh))
        return out


def _by_task_mean(scores: Sequence[Mapping], values: Sequence[float]) -> float:
    """Unweighted mean over tasks of each task's mean value (the "average" of the paper's table)."""
    by_task: dict[str, list[float]] = {}
    for s, v in zip(scores, values, strict=True):
        by_task.setdefault(s["task"], []).append(float(v))
    if not by_task:
        raise DataError("no scores to average")
    return float(sum(sum(v) / len(v) for v in by_task.values()) / len(by_task))


def _gold_ll(lls: Sequence[float], gold) -> float:
    return max(lls[g] for g in gold) if isinstance(gold, (tuple, list)) else lls[gold]


@dataclass
class LoglikObjective(AccuracyObjective):
    """Mean log-likelihood (nats) of the gold answers on the search split, averaged per task then over
    tasks: a continuous score that moves with every document, where accuracy moves only when an answer
    flips. Accepts while score >= baseline - delta (`search.loglik_delta`)."""

    def __post_init__(self) -> None:
        self.name = "loglik"

    def score(self, model: nn.Module) -> float:
        scores = self._scores(model)
        return _by_task_mean(scores, [_gold_ll(s["lls"], d.gold) for s, d in zip(scores, self.requests.docs,
                                                                                     strict=True)])


@dataclass
class KLObjective(AccuracyObjective):
    """Mean KL(reference || model) (nats) of the answer distributions, softmax over each document's choice
    log-likelihoods, per task then over tasks. The reference is the first model scored (the uncompressed
    one: the baseline pass), so the baseline scores 0. Accepts while score <= delta (`search.kl_max`)."""

    reference: list | None = None

    def __post_init__(self) -> None:
        self.name = "kl"

    def score(self, model: nn.Module) -> float:
        scores = self._scores(model)
        logq = [torch.log_softmax(torch.tensor(s["lls"], dtype=torch.float64), 0) for s in scores]
        if self.reference is None:
            self.reference = logq
        kls = [float((p.exp() * (p - q)).sum()) for p, q in zip(self.reference, logq, strict=True)]
        return _by_task_mean(scores, kls)

    def threshold(self, baseline: float, step: int) -> float:
        return baseline + self.delta

    def passes(self, score: float, threshold: float) -> bool:
        return math.isfinite(score) and score <= threshold + _GUARD


@dataclass
class PerplexityObjective:
    """Perplexity of the search text over fixed windows (see sfsd.evaluate.perplexity), BOS placed as `bos`
    says (evaluation.perplexity.bos: the evaluation's protocol)."""

    tokenizer: object
    texts: list
    window: int = 128
    eps: float = 0.005
    batch_size: int = 8
    name: str = "ppl"
    bos: str = "auto"

    def score(self, model: nn.Module) -> float:
        from sfsd.evaluate.perplexity import perplexity

        return perplexity(model, self.tokenizer, self.texts, self.window, batch_size=self.batch_size,
                          bos=self.bos)["ppl"]

    def threshold(self, baseline: float, step: int) -> float:
        return baseline * (1.0 + self.eps) ** step

    def passes(self, score: float, threshold: float) -> bool:
        return math.isfinite(score) and score <= threshold


__all__ = ["AccuracyObjective", "KLObjective", "LoglikObjective", "PerplexityObjective", "RELEASED_CHUNKS"]
