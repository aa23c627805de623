"""Surgical rank search (SFSD's core): for each Linear, from the top of the model down, the smallest
candidate rank whose search-split score stays within a tolerance of the uncompressed model.

The algorithm as the paper defines it (`search_order`, `candidate_ranks`, the objectives of
`sfsd.search.objectives`):
- layers in reverse order, from the last block down to `first_block`, inside a block down, up, gate,
  o, v, k, q (the architecture's forward order reversed, `arch.SEARCH_ORDER`); candidate ranks
  [1] + floor(kappa * {0.1 .. 1.0}); a layer whose only acceptable rank is kappa stays dense (rank
  kappa costs as much as the dense layer, so it is never evaluated: no score can change that decision);
- accuracy: accept a rank when score >= baseline - delta (baseline = the uncompressed model, so delta
  bounds the cumulative drop); perplexity: accept when ppl <= baseline * (1 + eps) ** step, step = the
  layer's 1-based position in the search order.

Cheaper, with the same decisions:
- Block-input cache (`sfsd.search.block_cache.BlockCache`): going top-down, the blocks below the current layer
  are still the original ones, so the hidden states entering the current block are the same for every
  candidate. They are recorded once per block (one pass through the blocks below it) and every candidate
  then runs only the current block, the blocks above and the head. When the states would exceed the
  memory bound, the search falls back to full forwards (logged).
- Bisection over the sorted candidates (`choose_rank`), valid where acceptance is monotone in rank. By
  construction it evaluates the chosen rank and its neighbour below (the confirmation that the next
  smaller candidate fails). Where acceptance is NOT monotone (a noisy score on a small split), the
  published linear scan can accept a smaller rank that bisection never visits: `strategy: linear`
  reproduces the scan exactly, and workflow/benchmarks/search_cost.py reports every disagreement.
- Work is counted in block forwards (sequences x transformer blocks run), a deterministic counter.

Resumable: every finished layer goes to the search's state (`SearchRecord`) with its decision and the
counters; the search stage keeps that state in a JSON-lines file on disk (`search_run.SearchState`), and
a run started again on the same settings replays those decisions and continues after the last finished
layer, so a search killed at any moment ends with the plan an uninterrupted run gives. This module
reads and writes no file: the factors, the objective, the curve and the state come in as objects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sfsd.decompose.lowrank import cut_module, linear_path, replace_module
from sfsd.decompose.methods import max_rank
from sfsd.decompose.plan import count_params, largest_fitting, layer_key, new_plan
from sfsd.defaults import block_range
from sfsd.errors import ConfigError, DataError
from sfsd.model.registry import SEARCH_ORDER, linear_order
from sfsd.model.shapes import ModelShapes
from sfsd.model.spec import ArchSpec
from sfsd.search.block_cache import BlockCache
from sfsd.search.objectives import AccuracyObjective, KLObjective, PerplexityObjective
from sfsd.search.settings import CHOICE_MODES, FRACTIONS, STRATEGIES, SearchSettings

log = logging.getLogger(__name__)

_GUARD = 1e-9  # floor(kappa * 0.3) must not round 0.3 * 10 down to 2


# ---------------------------------------------------------------- the algorithm's pieces


def candidate_ranks(kappa: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """[1] + floor(kappa * f) for f in fractions: sorted, distinct, below kappa (kappa = dense)."""
    ranks = {1} | {math.floor(kappa * f + _GUARD) for f in fractions}
    return sorted(r for r in ranks if 1 <= r < kappa)


def search_order(spec: ArchSpec, n_blocks: int, linears: Iterable[str], first_block: int,
                 last_block: int | None = None, order: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """(block, linear) in search order: blocks from last_block (default: the top) down to first_block,
    inside a block the linears in `order` (those of `linears` only; default: the spec's forward order
    reversed, `arch.linear_order`). A negative first_block counts from the end (-2 = the top two blocks),
    so one setting fits models of any depth."""
    if order is None or (tuple(order) == SEARCH_ORDER and not set(order) <= set(spec.linears)):
        order = linear_order(spec, reverse=True)  # the default, for a family with other Linear names
    linears = set(linears)
    unknown = [n for n in order if n not in spec.linears]
    if unknown:
        raise ConfigError(f"search.order names {unknown}, not Linear layers of this model; use {', '.join(spec.linears)}")
    missing = [n for n in linears if n not in order]
    if missing:
        raise ConfigError(f"search.order lacks {missing} of the compressed layers; list every one of them")
    blocks = block_range(first_block, last_block, n_blocks, "search.first_block")
    return [(b, n) for b in reversed(blocks) for n in order if n in linears]


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


# ---------------------------------------------------------------- the search's state


class SearchRecord:
    """What a search has done so far: the baseline score, one record per finished layer and the curve rows.
    Kept in memory here; the search stage keeps it in a resumable file (`search_run.SearchState`), and a
    search handed a record that already holds layers replays them and continues after the last one."""

    def __init__(self) -> None:
        self.baseline: float | None = None
        self.layers: list[dict] = []
        self.curve: list[dict] = []

    def add_baseline(self, score: float) -> None:
        self.baseline = score

    def add_layer(self, record: dict) -> None:
        self.layers.append(record)

    def add_curve(self, rows: list[dict]) -> None:
        self.curve.extend(rows)

    def __str__(self) -> str:
        return "the search state"


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
    state: SearchRecord,
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
    `state` holds what the search has done (a fresh `SearchRecord`, or the stage's resumable
    `search_run.SearchState`) and receives each step; `curve(model)` evaluates the test split (called at the
    start, every `curve_every` finished blocks and at the end); `header` goes into the plan (model,
    model_digest, architecture)."""
    settings.check()
    order = search_order(spec, shapes.n_blocks, linears, settings.first_block, settings.last_block, settings.order)
    search = SurgicalSearch(model, spec, shapes, order, factors, objective, settings, state, curve=curve,
                            curve_every=curve_every, cache=cache, cache_max_bytes=cache_max_bytes, header=header)
    try:
        search.start()
        search.replay()
        search.run(progress)
        return search.finish()
    finally:
        search.close()


class SurgicalSearch:
    """One run of the search over `order` (see `surgical_search`), in named steps: `start` (the baseline
    scores), `replay` (the decisions `state` already holds), `run` (`decide` each remaining layer, with a
    `curve_point` every `curve_every` blocks), `finish` (the plans and the summary)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, shapes: ModelShapes, order: Sequence[tuple[int, str]],
                 factors: FactorSource, objective: AccuracyObjective | PerplexityObjective,
                 settings: SearchSettings, state: SearchRecord, *, curve: CurveFn | None, curve_every: int,
                 cache: bool, cache_max_bytes: float, header: Mapping | None) -> None:
        self.model, self.spec, self.shapes, self.order = model, spec, shapes, list(order)
        self.factors, self.objective, self.settings, self.state = factors, objective, settings, state
        self.curve, self.curve_every, self.cache = curve, curve_every, cache
        self.header = dict(header or {})
        self.decisions: dict[str, dict] = {}
        # the parameter fraction budgets (stop_at, checkpoints) are judged by, in the configured convention
        self.fraction_key = "params_model_fraction" if settings.convention == "model" \
            else "params_decoder_linear_fraction"
        # the released procedure scores chunks of the search split besides the whole of it
        self.released = settings.strategy == "released" and settings.mode in CHOICE_MODES
        self.chunks: list = []
        self.chunk_baselines: list[float] = []
        self.baseline: float | None = None
        self.recorded: int | None = None  # block whose inputs the cache holds
        self.resumed = 0
        self.stopped = False
        self.runner = BlockCache(model, spec, cache_max_bytes if cache else -1.0)
        self.t0 = time.perf_counter()

    def close(self) -> None:
        self.runner.close()

    # ------------------------------------------------ the model and the plan as decided so far

    def entry_of(self, rank: int | None) -> dict:
        """The plan entry of a decision (None = dense)."""
        return {"method": "dense"} if rank is None else {"method": self.settings.method, "rank": rank}

    def plan_now(self) -> dict:
        return new_plan(self.decisions, bias_compensation=self.settings.bias_compensation, **self.header)

    def params(self) -> dict:
        counts = count_params(self.shapes, self.plan_now())
        return {"params_model": counts["model"]["compressed"], "params_model_fraction": counts["model"]["fraction"],
                "params_decoder_linear": counts["decoder_linear"]["compressed"],
                "params_decoder_linear_fraction": counts["decoder_linear"]["fraction"]}

    def dense(self, block: int, linear: str) -> nn.Module:
        """The original Linear of a layer (kept by the block cache while the model's is replaced)."""
        return self.runner.originals[block].get_submodule(self.spec.linears[linear])

    def apply_decision(self, block: int, linear: str, rank: int | None) -> None:
        self.decisions[layer_key(block, linear)] = self.entry_of(rank)
        if rank is not None:
            replace_module(self.model, linear_path(self.spec, block, linear), cut_module(
                self.factors(block, linear), self.settings.method, rank, self.settings.bias_compensation,
                self.dense(block, linear)))

    # ------------------------------------------------ the steps

    def start(self) -> None:
        """The uncompressed model's score on the search split (once: a resumed run has it in its state; the
        pass also records the top block's inputs), then what else is scored on the still uncompressed model
        before a resumed run replays its decisions: the reference answer distributions of a kl search and
        the released procedure's per-chunk baselines."""
        state, runner, objective, model = self.state, self.runner, self.objective, self.model
        resuming = state.baseline is not None
        if state.baseline is None:
            if self.cache and not state.layers:  # the baseline pass also records the top block's inputs
                state.add_baseline(runner.record(self.order[0][0], lambda: objective.score(model), complete=True,
                                                 phase="baseline"))
                self.recorded = self.order[0][0] if runner.block is not None else None
            else:
                with runner.counting("baseline"), torch.no_grad():
                    state.add_baseline(objective.score(model))
        self.baseline = state.baseline
        log.info("baseline %s on the search split: %.6g", objective.name, self.baseline)
        self.chunks = objective.chunks() if self.released else []
        with runner.counting("baseline"), torch.no_grad():
            if resuming and isinstance(objective, KLObjective):
                objective.score(model)
            self.chunk_baselines = [c.score(model) for c in self.chunks]
        if self.chunks:
            self.recorded = None  # the baseline pass recorded the whole split's batches only

    def curve_due(self, step: int) -> bool:
        """Whether a curve point follows the `step`-th layer: after every `curve_every`-th finished block."""
        block = self.order[step - 1][0]
        ends_block = step == len(self.order) or self.order[step][0] != block
        return ends_block and (self.order[0][0] - block + 1) % max(1, self.curve_every) == 0

    def curve_point(self, layers_done: int, block: int) -> None:
        """The test split's rows on the model as it stands, with its parameter counts, into the state."""
        if self.curve is None:
            return
        with self.runner.counting("curve"), torch.no_grad():
            rows = self.curve(self.model)
        p = self.params()
        self.state.add_curve([{**r, "layers_done": layers_done, "block": block, **p} for r in rows])

    def replay(self) -> None:
        """Apply the decisions a previous run finished, continue its counters, and make the curve point a
        kill between a layer and its curve point lost (or the first one)."""
        state, settings = self.state, self.settings
        for record in state.layers:
            self.apply_decision(record["block"], record["linear"], record["rank"])
        if state.layers:  # the counters continue from the last finished layer
            self.runner.forwards.update(state.layers[-1]["forwards"])
        if not state.curve:
            self.curve_point(0, -1)
        elif state.layers and self.curve_due(len(state.layers)) and state.curve[-1]["layers_done"] != len(state.layers):
            self.curve_point(len(state.layers), state.layers[-1]["block"])  # killed between a layer and its curve point
        self.resumed = len(state.layers)
        if state.layers and [(r["block"], r["linear"]) for r in state.layers] != self.order[:len(state.layers)]:
            raise DataError(f"{state} records layers in another order than this search; delete it to start over")
        self.stopped = bool(state.layers) and settings.stop_at is not None and \
            state.layers[-1][self.fraction_key] <= settings.stop_at

    def run(self, progress: bool) -> None:
        """Decide the layers after those already decided, in order, until the last or the parameter budget."""
        settings, done = self.settings, len(self.state.layers)
        bar = _progress(len(self.order), done, progress)
        current_block = None
        for step, (block, linear) in enumerate(self.order[done:], start=done + 1):
            if self.stopped:
                break
            if block != current_block:
                current_block = block
                # every batch any scorer of this search will run; once inputs did not fit, none will
                if self.cache and self.recorded != block and not self.runner.exceeded:
                    self.runner.record(block, lambda: [o.score(self.model) for o in (self.objective, *self.chunks)])
                    self.recorded = block
            record = self.decide(step, block, linear)
            bar.update(1)
            bar.set_postfix_str(f"{record['layer']} r={record['rank'] if record['rank'] is not None else 'dense'} "
                                f"params={record['params_model_fraction']:.3f}")
            if step != len(self.order) and self.curve_due(step):
                self.curve_point(step, block)
            if settings.stop_at is not None and record[self.fraction_key] <= settings.stop_at:
                log.info("parameter budget %.3f reached after %s: stopping", settings.stop_at, record["layer"])
                self.stopped = True
        bar.close()

    def trier(self, objective, limit: float, path: str, entry: Mapping[str, torch.Tensor],
              dense: nn.Module) -> Callable[[int], tuple[float, bool]]:
        """try_rank(rank) -> (score, accepted) of `objective` with the layer at `path` cut to that rank."""
        model, runner, settings = self.model, self.runner, self.settings

        def try_rank(rank: int) -> tuple[float, bool]:
            replace_module(model, path, cut_module(entry, settings.method, rank, settings.bias_compensation, dense))
            try:
                with runner.cached(), runner.counting("search"), torch.no_grad():
                    score = objective.score(model)
            finally:
                replace_module(model, path, dense)
            return score, objective.passes(score, limit)
        return try_rank

    def decide(self, step: int, block: int, linear: str) -> dict:
        """Choose the rank of one layer (the `step`-th of the order), apply it and record it in the state."""
        settings = self.settings
        out_f, in_f = self.shapes.linears[linear]
        kappa = max_rank(in_f, out_f)
        threshold = self.objective.threshold(self.baseline, step)
        dense = self.dense(block, linear)
        entry = self.factors(block, linear)
        path = linear_path(self.spec, block, linear)
        candidates = candidate_ranks(kappa, settings.fractions)
        if self.released:
            rank, trials = released_rank(candidates, [self.trier(c, c.threshold(b, step), path, entry, dense)
                                                      for c, b in zip(self.chunks, self.chunk_baselines)],
                                         self.trier(self.objective, threshold, path, entry, dense))
        else:
            rank, trials = choose_rank(candidates, self.trier(self.objective, threshold, path, entry, dense),
                                       settings.strategy)
        self.apply_decision(block, linear, rank)
        record = {
            "step": step, "layer": layer_key(block, linear), "block": block, "linear": linear,
            "in_features": in_f, "out_features": out_f, "kappa": kappa, "threshold": threshold,
            "tried": [asdict(t) for t in trials], "rank": rank,
            "score": next((t.score for t in reversed(trials) if t.rank == rank), None),
            "layer_params_fraction": 1.0 if rank is None else rank * (in_f + out_f) / (in_f * out_f),
            **self.params(), "forwards": dict(self.runner.forwards), "seconds": time.perf_counter() - self.t0,
        }
        self.state.add_layer(record)
        return record

    def first_under(self, fraction: float) -> int | None:
        """The index of the layer whose decision took the model under `fraction` of its parameters."""
        return next((i for i, r in enumerate(self.state.layers) if r[self.fraction_key] <= fraction), None)

    def checkpoint_plans(self) -> tuple[dict[str, dict], set[str]]:
        """({label: plan}, labels of the budgets reached): the plan when the model first fell under each
        checkpoint fraction (label pNN) and the plan landed exactly on each budget (its own label)."""
        settings, layers_done, header = self.settings, self.state.layers, self.header
        checkpoints: dict[str, dict] = {}
        for c in settings.checkpoints:
            hit = self.first_under(c)
            if hit is not None:
                layers = {r["layer"]: self.entry_of(r["rank"]) for r in layers_done[:hit + 1]}
                checkpoints[f"p{round(c * 100):02d}"] = new_plan(
                    layers, bias_compensation=settings.bias_compensation,
                    notes={"builder": "search-checkpoint", "params_fraction_at_most": c}, **header)
        landed_labels = set()
        for label, fraction in settings.budgets:  # plans landed exactly on each budget
            hit = self.first_under(fraction)
            if hit is not None:
                layers = {r["layer"]: self.entry_of(r["rank"]) for r in layers_done[:hit]}
                crossing = layers_done[hit]
                landed = _land(self.shapes, layers, crossing, settings, fraction, self.entry_of, header)
                layers[crossing["layer"]] = self.entry_of(landed)
                landed_plan = new_plan(layers, bias_compensation=settings.bias_compensation, **header)
                landed_plan["notes"] = {"builder": "search-budget", "target_params_fraction": fraction,
                                        "params_fraction": count_params(self.shapes, landed_plan)[settings.convention][
                                            "fraction"], "crossing_layer": crossing["layer"],
                                        "accepted_rank": crossing["rank"], "landed_rank": landed}
                checkpoints[label] = landed_plan
                landed_labels.add(label)
        return checkpoints, landed_labels

    def finish(self) -> SearchResult:
        """The last curve point (unless it was made), the plan, the checkpoint and budget plans, the summary."""
        state, settings, runner = self.state, self.settings, self.runner
        final = state.layers[-1] if state.layers else {"step": 0, "block": -1}
        if not state.curve or state.curve[-1]["layers_done"] != final["step"]:
            self.curve_point(final["step"], final["block"])
        checkpoints, landed_labels = self.checkpoint_plans()
        plan = self.plan_now()
        plan["notes"] = {"builder": "surgical-search", "settings": asdict(settings), "baseline": self.baseline}
        search_forwards = sum(runner.forwards[k] for k in ("baseline", "inputs", "search"))
        summary = {
            "baseline": self.baseline, "objective": self.objective.name, "layers_searched": len(state.layers),
            "layers_in_order": len(self.order), "stopped_at_budget": self.stopped,
            "budgets_reached": {label: label in landed_labels for label, _ in settings.budgets},
            "forwards": dict(runner.forwards), "search_block_forwards": search_forwards,
            "evaluations": sum(len(r["tried"]) for r in state.layers),
            "cache_peak_mb": runner.peak_bytes / 2**20, "cache": self.cache,
            "seconds_this_run": time.perf_counter() - self.t0, "resumed_after_layers": self.resumed,
            **{k: v for k, v in (state.layers[-1] if state.layers else self.params()).items()
               if k.startswith("params_")},
        }
        return SearchResult(plan, list(state.layers), list(state.curve), checkpoints, summary)

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
    "SearchRecord",
    "SearchResult",
    "SurgicalSearch",
    "Trial",
    "candidate_ranks",
    "choose_rank",
    "released_rank",
    "search_order",
    "surgical_search",
]
