"""Surgical rank search (SFSD's core): for each Linear, from the top of the model down, the smallest
candidate rank whose search-split score stays within a tolerance of the uncompressed model.

The algorithm as the paper defines it (`search_order`, `candidate_ranks`, the objectives):
- layers in reverse order, from the last block down to `first_block`, inside a block down, up, gate,
  o, v, k, q; candidate ranks [1] + floor(kappa * {0.1 .. 1.0}); a layer whose only acceptable rank is
  kappa stays dense (rank kappa costs as much as the dense layer, so it is never evaluated: no score
  can change that decision);
- accuracy: accept a rank when score >= baseline - delta (baseline = the uncompressed model, so delta
  bounds the cumulative drop); perplexity: accept when ppl <= baseline * (1 + eps) ** step, step = the
  layer's 1-based position in the search order.

Cheaper, with the same decisions:
- Block-input cache (`BlockCache`): going top-down, the blocks below the current layer are still the
  original ones, so the hidden states entering the current block are the same for every candidate.
  They are recorded once per block (one pass through the blocks below it) and every candidate then runs
  only the current block, the blocks above and the head. When the states would exceed the memory
  bound, the search falls back to full forwards (logged).
- Bisection over the sorted candidates (`choose_rank`), valid where acceptance is monotone in rank. By
  construction it evaluates the chosen rank and its neighbour below (the confirmation that the next
  smaller candidate fails). Where acceptance is NOT monotone (a noisy score on a small split), the
  published linear scan can accept a smaller rank that bisection never visits: `strategy: linear`
  reproduces the scan exactly, and workflow/benchmarks/search_cost.py reports every disagreement.
- Work is counted in block forwards (sequences x transformer blocks run), a deterministic counter.

Resumable: every finished layer is appended to a JSON-lines state file (fsync'd) with its decision and
the counters; a run started again on the same settings replays those decisions and continues after the
last finished layer, so a search killed at any moment ends with the plan an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import ArchSpec, blocks_of
from .errors import ConfigError, DataError
from .lowrank import cut_module, linear_path, replace_module
from .methods import max_rank
from .plan import FACTOR_METHODS, ModelShapes, count_params, largest_fitting, layer_key, new_plan

log = logging.getLogger(__name__)

ORDER = ("down_proj", "up_proj", "gate_proj", "o_proj", "v_proj", "k_proj", "q_proj")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MODES = ("accuracy", "loglik", "kl", "perplexity")
CHOICE_MODES = ("accuracy", "loglik", "kl")  # scored on the multiple-choice search split
STRATEGIES = ("bisect", "linear", "released")
RELEASED_CHUNKS = 3
_GUARD = 1e-9  # floor(kappa * 0.3) must not round 0.3 * 10 down to 2


# ---------------------------------------------------------------- the algorithm's pieces


def candidate_ranks(kappa: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """[1] + floor(kappa * f) for f in fractions: sorted, distinct, below kappa (kappa = dense)."""
    ranks = {1} | {math.floor(kappa * f + _GUARD) for f in fractions}
    return sorted(r for r in ranks if 1 <= r < kappa)


def search_order(spec: ArchSpec, n_blocks: int, linears: Iterable[str], first_block: int,
                 last_block: int | None = None, order: Sequence[str] = ORDER) -> list[tuple[int, str]]:
    """(block, linear) in search order: blocks from last_block (default: the top) down to first_block,
    inside a block the linears in `order` (those of `linears` only). A negative first_block counts from
    the end (-2 = the top two blocks), so one setting fits models of any depth."""
    linears = set(linears)
    if first_block < 0:
        first_block = max(0, n_blocks + first_block)
    unknown = [n for n in order if n not in spec.linears]
    if unknown:
        raise ConfigError(f"search.order names {unknown}, not Linear layers of this model; use {', '.join(spec.linears)}")
    missing = [n for n in linears if n not in order]
    if missing:
        raise ConfigError(f"search.order lacks {missing} of the compressed layers; list every one of them")
    last = n_blocks - 1 if last_block is None else last_block
    if not 0 <= first_block <= last < n_blocks:
        raise ConfigError(f"search blocks {first_block}..{last} are out of range: the model has blocks 0..{n_blocks - 1}; "
                          "set search.first_block (and last_block) inside it")
    return [(b, n) for b in range(last, first_block - 1, -1) for n in order if n in linears]


@dataclass(frozen=True)
class Trial:
    rank: int
    score: float
    accepted: bool
    split: str = "search"  # the released procedure: chunk0, chunk1, chunk2, then search (the re-check)


def choose_rank(candidates: Sequence[int], try_rank: Callable[[int], tuple[float, bool]],
                strategy: str = "bisect") -> tuple[int | None, list[Trial]]:
    """The smallest candidate that `try_rank` accepts (None: keep the layer dense) and the trials made.

    linear: the published scan, ascending, stopping at the first accepted rank.
    bisect: binary search for the first accepted index; it always ends having evaluated the chosen rank
    (accepted) and the next smaller candidate (rejected), so under monotone acceptance it returns
    exactly what the scan returns, in about log2(len) + 1 evaluations instead of up to len."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"search.strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    trials: list[Trial] = []
    seen: dict[int, bool] = {}

    def ok(i: int) -> bool:
        if i not in seen:
            score, accepted = try_rank(candidates[i])
            trials.append(Trial(candidates[i], float(score), bool(accepted)))
            seen[i] = bool(accepted)
        return seen[i]

    if strategy in ("linear", "released"):  # released: one chunk's scan (see surgical_search)
        for i in range(len(candidates)):
            if ok(i):
                return candidates[i], trials
        return None, trials
    lo, hi = 0, len(candidates)  # the answer lies in [lo, hi]; hi == len means "dense"
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return (candidates[lo] if lo < len(candidates) else None), trials


# ---------------------------------------------------------------- objectives


@dataclass
class AccuracyObjective:
    """Mean over tasks of a multiple-choice metric on the search split (native scorer, pre-tokenized).
    metric: a setting of `sfsd.tasks.METRIC_CHOICES` resolved per task (`rows.mean_metric`); "paper"
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
        from .scoring import score_multiple_choice

        # one forward per whole input (share_prefix off): the block-input cache records and replays the
        # hidden states of whole inputs, and a KV-cache pass over prefix and suffixes would bypass it
        return score_multiple_choice(model, self.tokenizer, self.requests, self.batch_size, share_prefix=False)

    def score(self, model: nn.Module) -> float:
        from .rows import mean_metric

        return mean_metric(self._scores(model), self.metric)

    def threshold(self, baseline: float, step: int) -> float:
        return baseline - self.delta

    def passes(self, score: float, threshold: float) -> bool:
        return score >= threshold - _GUARD

    def chunks(self, n: int = RELEASED_CHUNKS) -> list:
        """The same objective on n contiguous chunks of every task's documents (floor(n_task / n) each, the
        remainder left out, as the released code cuts its search split)."""
        from dataclasses import replace

        from .scoring import encode_requests

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
    """Perplexity of the search text over fixed windows (see sfsd.perplexity)."""

    tokenizer: object
    texts: list
    window: int = 128
    eps: float = 0.005
    batch_size: int = 8
    name: str = "ppl"

    def score(self, model: nn.Module) -> float:
        from .perplexity import perplexity

        return perplexity(model, self.tokenizer, self.texts, self.window, batch_size=self.batch_size)["ppl"]

    def threshold(self, baseline: float, step: int) -> float:
        return baseline * (1.0 + self.eps) ** step

    def passes(self, score: float, threshold: float) -> bool:
        return math.isfinite(score) and score <= threshold


# ---------------------------------------------------------------- block-input cache and counter


class _Skip(nn.Module):
    """Stands in for a block a pass need not run: hands its input on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Capture(_Skip):
    """Stands in for the block whose input is being recorded: stores it under the current batch."""

    def __init__(self, owner: BlockCache) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.owner.states[self.owner.batch_key] = hidden_states.detach().clone()
        return hidden_states


def _batch_key(input_ids: torch.Tensor) -> tuple:
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    return tuple(ids.shape), hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).hexdigest()


class BlockCache:
    """Counts block forwards and, when asked, feeds recorded block inputs instead of running the blocks
    below. Batches are recognised by their token ids (the embedding's input), so any scorer that runs
    the same batches again (the native scorer and perplexity do: fixed order and batch size) is fed the
    states recorded for exactly those batches."""

    def __init__(self, model: nn.Module, spec: ArchSpec, max_bytes: float = float("inf")) -> None:
        self.blocks = blocks_of(model, spec)
        self.originals = list(self.blocks)
        self.max_bytes = max_bytes
        self.forwards: Counter = Counter()
        self.phase = "search"
        self.batch_key: tuple | None = None
        self.block: int | None = None  # block whose inputs are recorded, None = full forwards
        self.states: dict[tuple, torch.Tensor] = {}
        self.peak_bytes = 0
        self._hooks = [b.register_forward_pre_hook(self._count, with_kwargs=True) for b in self.originals]
        self._hooks.append(model.get_input_embeddings().register_forward_pre_hook(self._remember))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.states = {}

    def _count(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.forwards[self.phase] += int(hidden.shape[0])

    def _remember(self, module, args) -> None:
        self.batch_key = _batch_key(args[0])

    @contextlib.contextmanager
    def counting(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @contextlib.contextmanager
    def _replaced(self, replacements: Mapping[int, nn.Module]) -> Iterator[None]:
        for i, module in replacements.items():
            self.blocks[i] = module
        try:
            yield
        finally:
            for i in replacements:
                self.blocks[i] = self.originals[i]

    def record(self, block: int, run: Callable[[], object], *, complete: bool = False, phase: str = "inputs"):
        """Record the inputs of `block` for every batch `run()` makes, running only the blocks below it;
        complete=True runs the whole model and returns run()'s result (the baseline pass records the top
        block's inputs for free). Past max_bytes nothing is kept and later forwards are full (logged)."""
        self.states, self.block = {}, None
        if complete:
            def capture(module, args, kwargs) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.states[self.batch_key] = hidden.detach().clone()

            handle = self.originals[block].register_forward_pre_hook(capture, with_kwargs=True)
            try:
                with self.counting(phase), torch.no_grad():
                    result = run()
            finally:
                handle.remove()
        else:
            skip = {i: _Skip() for i in range(block + 1, len(self.blocks))}
            with self.counting(phase), self._replaced({block: _Capture(self), **skip}), torch.no_grad():
                result = run()
        size = sum(t.numel() * t.element_size() for t in self.states.values())
        if size > self.max_bytes:
            log.warning("block %d inputs need %.1f MB > cache bound %.1f MB: full forwards from here",
                        block, size / 2**20, self.max_bytes / 2**20)
            self.states = {}
        else:
            self.peak_bytes = max(self.peak_bytes, size)
            self.block = block
        return result

    def _feed(self, module, args, kwargs):
        try:
            hidden = self.states[self.batch_key]
        except KeyError:
            raise RuntimeError("a batch that was not recorded reached the cached block: the scorer must run the "
                               "same batches on every call") from None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Inside: forwards start at the recorded block from its recorded inputs (no-op without one)."""
        if self.block is None:
            yield
            return
        handle = self.originals[self.block].register_forward_pre_hook(self._feed, with_kwargs=True)
        try:
            with self._replaced({i: _Skip() for i in range(self.block)}):
                yield
        finally:
            handle.remove()


# ---------------------------------------------------------------- settings and resumable state


@dataclass(frozen=True)
class SearchSettings:
    """What decides the plan (its digest keys the resumable state); see the `search:` config section."""

    method: str = "feature"
    mode: str = "accuracy"
    target: str = "average"
    metric: str = "paper"  # METRIC_CHOICES: paper = each task's lm-eval/paper metric (see sfsd.tasks)
    delta: float = 0.0
    eps: float = 0.005
    loglik_delta: float = 0.05
    kl_max: float = 0.02
    order: tuple[str, ...] = ORDER
    fractions: tuple[float, ...] = FRACTIONS
    first_block: int = 0
    last_block: int | None = None
    strategy: str = "bisect"
    stop_at: float | None = None
    convention: str = "model"
    bias_compensation: str = "intended"
    checkpoints: tuple[float, ...] = (0.9, 0.8)
    budgets: tuple[tuple[str, float], ...] = ()  # (label, fraction): plans landed exactly on each budget
    inputs: str = ""  # digest of the search data (docs, texts, model), set by the caller

    def check(self) -> None:
        if self.method not in FACTOR_METHODS:
            raise ConfigError(f"search.methods: {self.method!r} is not a factor method; use one of {', '.join(FACTOR_METHODS)}")
        if self.mode not in MODES:
            raise ConfigError(f"search.modes: {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        from .tasks import METRIC_CHOICES

        if self.metric not in METRIC_CHOICES:
            raise ConfigError(f"search.metric {self.metric!r} is unknown; use one of {', '.join(METRIC_CHOICES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"search.strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if not 0 <= self.delta <= 1:
            raise ConfigError(f"search.delta {self.delta} must be in [0, 1] (an accuracy drop)")
        if not self.eps >= 0:
            raise ConfigError(f"search.eps {self.eps} must be >= 0")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"search.fractions {list(self.fractions)} must be in (0, 1]")
        if self.stop_at is not None and not 0 < self.stop_at < 1:
            raise ConfigError(f"search.stop_at {self.stop_at} must be in (0, 1) or null")
        if any(not 0 < c < 1 for c in self.checkpoints):
            raise ConfigError(f"search.checkpoints {list(self.checkpoints)} must be fractions in (0, 1)")
        if any(not 0 < f <= 1 for _, f in self.budgets):
            raise ConfigError(f"search budgets {list(self.budgets)} must be fractions in (0, 1]")
        if self.loglik_delta < 0 or self.kl_max < 0:
            raise ConfigError(f"search.loglik_delta {self.loglik_delta} and search.kl_max {self.kl_max} must be >= 0")

    def tolerance(self) -> float:
        """The tolerance of this mode's objective, in its own units."""
        return {"accuracy": self.delta, "loglik": self.loglik_delta, "kl": self.kl_max}.get(self.mode, self.eps)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class SearchState:
    """The append-only JSON-lines file a search resumes from: a header (settings digest), the baseline,
    then one record per finished layer and per curve point, each flushed and fsync'd."""

    def __init__(self, path: str | os.PathLike, settings: SearchSettings) -> None:
        self.path = Path(path)
        self.digest = settings.digest()
        self.baseline: float | None = None
        self.layers: list[dict] = []
        self.curve: list[dict] = []
        records = self._read()
        if records and records[0].get("type") == "header" and records[0].get("digest") == self.digest:
            for r in records[1:]:
                if r["type"] == "baseline":
                    self.baseline = r["score"]
                elif r["type"] == "layer":
                    self.layers.append(r["record"])
                elif r["type"] == "curve":
                    self.curve.extend(r["rows"])
            self._rewrite(records)  # drops a torn last line
            if self.layers or self.baseline is not None:
                log.info("resuming the search from %s: %d layers done", self.path, len(self.layers))
        else:
            if records:
                log.info("%s holds another search's state (settings changed): starting over", self.path)
            self._rewrite([{"type": "header", "digest": self.digest, "settings": asdict(settings)}])

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is lost, and redone
        return out

    def _rewrite(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_baseline(self, score: float) -> None:
        self.baseline = score
        self.append({"type": "baseline", "score": score})

    def add_layer(self, record: dict) -> None:
        self.layers.append(record)
        self.append({"type": "layer", "record": record})

    def add_curve(self, rows: list[dict]) -> None:
        self.curve.extend(rows)
        self.append({"type": "curve", "rows": rows})


# ---------------------------------------------------------------- the search


@dataclass
class SearchResult:
    plan: dict
    layers: list[dict]
    curve: list[dict]
    checkpoints: dict[str, dict]
    summary: dict


FactorSource = Callable[[int, str], Mapping[str, torch.Tensor]]  # (block, linear) -> factor-cache entry
CurveFn = Callable[[nn.Module], list[dict]]  # test-split rows {task, split, metric, value, n}


def surgical_search(
    model: nn.Module,
    spec: ArchSpec,
    shapes: ModelShapes,
    linears: Sequence[str],
    factors: FactorSource,
    objective: AccuracyObjective | PerplexityObjective,
    settings: SearchSettings,
    state_path: str | os.PathLike,
    *,
    curve: CurveFn | None = None,
    curve_every: int = 1,
    cache: bool = True,
    cache_max_bytes: float = 4 * 2**30,
    header: Mapping | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) the surgical search on `model` IN PLACE; the model ends compressed as the plan says.

    `factors(block, linear)` gives the layer's full-rank factor cache entry (`factor_cache.full_rank_factors`);
    `curve(model)` evaluates the test split (called at the start, every `curve_every` finished blocks and
    at the end); `header` goes into the plan (model, model_digest, architecture)."""
    settings.check()
    order = search_order(spec, shapes.n_blocks, linears, settings.first_block, settings.last_block, settings.order)
    state = SearchState(state_path, settings)
    runner = BlockCache(model, spec, cache_max_bytes if cache else -1.0)
    header = dict(header or {})
    decisions: dict[str, dict] = {}
    t0 = time.perf_counter()
    # the parameter fraction budgets (stop_at, checkpoints) are judged by, in the configured convention
    fraction_key = "params_model_fraction" if settings.convention == "model" else "params_decoder_linear_fraction"
    try:
        recorded = None  # block whose inputs the cache holds
        resuming = state.baseline is not None
        if state.baseline is None:
            if cache and not state.layers:  # the baseline pass also records the top block's inputs
                state.add_baseline(runner.record(order[0][0], lambda: objective.score(model), complete=True,
                                                 phase="baseline"))
                recorded = order[0][0] if runner.block is not None else None
            else:
                with runner.counting("baseline"), torch.no_grad():
                    state.add_baseline(objective.score(model))
        baseline = state.baseline
        log.info("baseline %s on the search split: %.6g", objective.name, baseline)
        # scored on the still uncompressed model, before a resumed run replays its decisions: the reference
        # answer distributions of a kl search, and the released procedure's per-chunk baselines
        released = settings.strategy == "released" and settings.mode in CHOICE_MODES
        chunks = objective.chunks() if released else []
        with runner.counting("baseline"), torch.no_grad():
            if resuming and isinstance(objective, KLObjective):
                objective.score(model)
            chunk_baselines = [c.score(model) for c in chunks]
        if chunks:
            recorded = None  # the baseline pass recorded the whole split's batches only

        def plan_now() -> dict:
            return new_plan(decisions, bias_compensation=settings.bias_compensation, **header)

        def params() -> dict:
            counts = count_params(shapes, plan_now())
            return {"params_model": counts["model"]["compressed"], "params_model_fraction": counts["model"]["fraction"],
                    "params_decoder_linear": counts["decoder_linear"]["compressed"],
                    "params_decoder_linear_fraction": counts["decoder_linear"]["fraction"]}

        def entry_of(rank: int | None) -> dict:  # the plan entry of a decision
            return {"method": "dense"} if rank is None else {"method": settings.method, "rank": rank}

        def apply_decision(block: int, linear: str, rank: int | None) -> None:
            decisions[layer_key(block, linear)] = entry_of(rank)
            if rank is not None:
                dense = runner.originals[block].get_submodule(spec.linears[linear])
                replace_module(model, linear_path(spec, block, linear), cut_module(
                    factors(block, linear), settings.method, rank, settings.bias_compensation, dense))

        def curve_point(layers_done: int, block: int) -> None:
            if curve is None:
                return
            with runner.counting("curve"), torch.no_grad():
                rows = curve(model)
            p = params()
            state.add_curve([{**r, "layers_done": layers_done, "block": block, **p} for r in rows])

        # replay what a previous run finished
        for record in state.layers:
            apply_decision(record["block"], record["linear"], record["rank"])
        if state.layers:  # the counters continue from the last finished layer
            runner.forwards.update(state.layers[-1]["forwards"])
        top = order[0][0]

        def curve_due(step: int) -> bool:  # after every `curve_every`-th finished block
            block = order[step - 1][0]
            ends_block = step == len(order) or order[step][0] != block
            return ends_block and (top - block + 1) % max(1, curve_every) == 0

        if not state.curve:
            curve_point(0, -1)
        elif state.layers and curve_due(len(state.layers)) and state.curve[-1]["layers_done"] != len(state.layers):
            curve_point(len(state.layers), state.layers[-1]["block"])  # killed between a layer and its curve point
        resumed = len(state.layers)

        checkpoints: dict[str, dict] = {}
        todo = order[len(state.layers):]
        if state.layers and [(r["block"], r["linear"]) for r in state.layers] != order[:len(state.layers)]:
            raise DataError(f"{state.path} records layers in another order than this search; delete it to start over")
        stopped = bool(state.layers) and settings.stop_at is not None and \
            state.layers[-1][fraction_key] <= settings.stop_at
        bar = _progress(len(order), len(state.layers), progress)
        current_block = None
        for step, (block, linear) in enumerate(todo, start=len(state.layers) + 1):
            if stopped:
                break
            if block != current_block:
                current_block = block
                if cache and recorded != block:  # every batch any scorer of this search will run
                    runner.record(block, lambda: [o.score(model) for o in (objective, *chunks)])
                    recorded = block
            out_f, in_f = shapes.linears[linear]
            kappa = max_rank(in_f, out_f)
            threshold = objective.threshold(baseline, step)
            dense = runner.originals[block].get_submodule(spec.linears[linear])
            entry = factors(block, linear)
            path = linear_path(spec, block, linear)

            def trier(obj, limit: float) -> Callable[[int], tuple[float, bool]]:
                def try_rank(rank: int) -> tuple[float, bool]:
                    replace_module(model, path, cut_module(entry, settings.method, rank, settings.bias_compensation,
                                                           dense))
                    try:
                        with runner.cached(), runner.counting("search"), torch.no_grad():
                            score = obj.score(model)
                    finally:
                        replace_module(model, path, dense)
                    return score, obj.passes(score, limit)
                return try_rank

            candidates = candidate_ranks(kappa, settings.fractions)
            if released:
                rank, trials = released_rank(candidates, [trier(c, c.threshold(b, step))
                                                          for c, b in zip(chunks, chunk_baselines)],
                                             trier(objective, threshold))
            else:
                rank, trials = choose_rank(candidates, trier(objective, threshold), settings.strategy)
            apply_decision(block, linear, rank)
            p = params()
            record = {
                "step": step, "layer": layer_key(block, linear), "block": block, "linear": linear,
                "in_features": in_f, "out_features": out_f, "kappa": kappa, "threshold": threshold,
                "tried": [asdict(t) for t in trials], "rank": rank,
                "score": next((t.score for t in reversed(trials) if t.rank == rank), None),
                "layer_params_fraction": 1.0 if rank is None else rank * (in_f + out_f) / (in_f * out_f),
                **p, "forwards": dict(runner.forwards), "seconds": time.perf_counter() - t0,
            }
            state.add_layer(record)
            bar.update(1)
            bar.set_postfix_str(f"{record['layer']} r={rank if rank is not None else 'dense'} "
                                f"params={p['params_model_fraction']:.3f}")
            if step != len(order) and curve_due(step):
                curve_point(step, block)
            if settings.stop_at is not None and p[fraction_key] <= settings.stop_at:
                log.info("parameter budget %.3f reached after %s: stopping", settings.stop_at, record["layer"])
                stopped = True
        bar.close()
        final = state.layers[-1] if state.layers else {"step": 0, "block": -1}
        if not state.curve or state.curve[-1]["layers_done"] != final["step"]:
            curve_point(final["step"], final["block"])
        def first_under(fraction: float) -> int | None:  # the layer whose decision took the model under it
            return next((i for i, r in enumerate(state.layers) if r[fraction_key] <= fraction), None)

        # checkpoint plans: the plan when the model first fell under each budget
        for c in settings.checkpoints:
            hit = first_under(c)
            if hit is not None:
                layers = {r["layer"]: entry_of(r["rank"]) for r in state.layers[:hit + 1]}
                checkpoints[f"p{round(c * 100):02d}"] = new_plan(
                    layers, bias_compensation=settings.bias_compensation,
                    notes={"builder": "search-checkpoint", "params_fraction_at_most": c}, **header)
        landed_labels = set()
        for label, fraction in settings.budgets:  # plans landed exactly on each budget
            hit = first_under(fraction)
            if hit is not None:
                layers = {r["layer"]: entry_of(r["rank"]) for r in state.layers[:hit]}
                crossing = state.layers[hit]
                landed = _land(shapes, layers, crossing, settings, fraction, entry_of, header)
                layers[crossing["layer"]] = entry_of(landed)
                landed_plan = new_plan(layers, bias_compensation=settings.bias_compensation, **header)
                landed_plan["notes"] = {"builder": "search-budget", "target_params_fraction": fraction,
                                        "params_fraction": count_params(shapes, landed_plan)[settings.convention][
                                            "fraction"], "crossing_layer": crossing["layer"],
                                        "accepted_rank": crossing["rank"], "landed_rank": landed}
                checkpoints[label] = landed_plan
                landed_labels.add(label)
        plan = plan_now()
        plan["notes"] = {"builder": "surgical-search", "settings": asdict(settings), "baseline": baseline}
        search_forwards = sum(runner.forwards[k] for k in ("baseline", "inputs", "search"))
        summary = {
            "baseline": baseline, "objective": objective.name, "layers_searched": len(state.layers),
            "layers_in_order": len(order), "stopped_at_budget": stopped,
            "budgets_reached": {label: label in landed_labels for label, _ in settings.budgets},
            "forwards": dict(runner.forwards), "search_block_forwards": search_forwards,
            "evaluations": sum(len(r["tried"]) for r in state.layers),
            "cache_peak_mb": runner.peak_bytes / 2**20, "cache": cache,
            "seconds_this_run": time.perf_counter() - t0, "resumed_after_layers": resumed,
            **{k: v for k, v in (state.layers[-1] if state.layers else params()).items()
               if k.startswith("params_")},
        }
        return SearchResult(plan, list(state.layers), list(state.curve), checkpoints, summary)
    finally:
        runner.close()


def released_rank(candidates: Sequence[int], chunk_tries: Sequence[Callable[[int], tuple[float, bool]]],
                  whole_try: Callable[[int], tuple[float, bool]]) -> tuple[int | None, list[Trial]]:
    """The released code's decision for one layer: on each chunk in turn the smallest accepted candidate
    (a linear scan; none = dense), stopping early once a chunk needs the dense layer; the largest of those
    ranks; then one re-check on the whole split, which keeps the layer dense when it fails (no larger
    rank is tried). Returns (rank or None, trials tagged chunk0.. and search)."""
    trials: list[Trial] = []
    picks: list[int | None] = []
    for i, try_chunk in enumerate(chunk_tries):
        if picks and None in picks:
            break
        pick, tried = choose_rank(candidates, try_chunk, "linear")
        trials += [Trial(t.rank, t.score, t.accepted, f"chunk{i}") for t in tried]
        picks.append(pick)
    if not picks or None in picks:
        return None, trials
    rank = max(picks)
    score, accepted = whole_try(rank)
    trials.append(Trial(rank, float(score), bool(accepted), "search"))
    return (rank if accepted else None), trials


def _land(shapes: ModelShapes, layers: Mapping[str, dict], crossing: Mapping, settings: SearchSettings,
          fraction: float, entry_of: Callable, header: Mapping) -> int | None:
    """The rank (None = dense) of the layer whose decision took the model under `fraction`: the largest
    one, from the accepted rank up, that keeps the parameters at or under it."""
    def fits(rank: int | None) -> bool:
        plan = new_plan({**layers, crossing["layer"]: entry_of(rank)}, bias_compensation=settings.bias_compensation,
                        **header)
        return count_params(shapes, plan)[settings.convention]["fraction"] <= fraction

    if crossing["rank"] is None or fits(None):
        return None
    # fits(accepted rank) holds: that rank took the parameters under the budget
    return largest_fitting(fits, crossing["rank"], crossing["kappa"] - 1)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="surgical search", unit="layer", disable=not enabled,
                mininterval=1.0)


__all__ = [
    "AccuracyObjective",
    "BlockCache",
    "FRACTIONS",
    "MODES",
    "ORDER",
    "KLObjective",
    "LoglikObjective",
    "PerplexityObjective",
    "SearchResult",
    "SearchSettings",
    "SearchState",
    "Trial",
    "candidate_ranks",
    "choose_rank",
    "released_rank",
    "search_order",
    "surgical_search",
]
