"""The LASER study: layer-selective rank reduction sweeps (Sharma et al., ICLR 2024) and the Vendi-score
variant, chosen on the validation (search) split and reported on the test split.

LASER does not compress a model: it searches for the ONE intervention (layer number `lnum`, -1 = every
block; layer type `lname` in LASER's names; `rate`, rho = 1 - 0.1 rate) that improves a task's accuracy.
`laser` writes the rank-k SVD approximation of the chosen matrices back; `vendi` keeps k rows picked
greedily for a high (`vendi-min`: low) Vendi score, quality-weighted by row norms in the `-quality`
variants, and rebuilds the matrix from them by least squares (`sfsd.decompose.methods`). `dont` (no change) is the
baseline: it is a grid point like any other, so the baseline and the sweep share one code path.

Pieces, each usable on its own:

- `GridPoint`, `build_grid`: the points of a sweep (one cached job each in the workflow).
- `run_point`: apply one point's plan to a model, score one split with the native multiple-choice scorer
  and return the summary rows (acc, acc_norm, mean log-prob, top-2 accuracy) and per-item records.
- `choose`: the best point on the search split (overall, and per intervention).
- `combine_study`: every point's rows in one results Parquet (`sfsd.evaluate.rows` format) with the chosen
  points flagged, and the per-item records of the chosen points and the baseline.

The figure and the table, from that Parquet alone, are in `sfsd.laser.report`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sfsd.decompose.methods import laser_rank
from sfsd.errors import ConfigError, DataError
from sfsd.io import read_json, write_json
from sfsd.model.placement import placement
from sfsd.model.registry import architecture_of, get_arch
from sfsd.model.spec import ArchSpec
from sfsd.tasks.registry import METRIC_CHOICES

log = logging.getLogger(__name__)

# intervention name -> (plan method, Vendi options). The names are path components of the workflow.
INTERVENTIONS: dict[str, tuple[str, dict]] = {
    "laser": ("laser", {}),
    "vendi": ("vendi", {"use_quality": False, "min_diversity": False}),
    "vendi-quality": ("vendi", {"use_quality": True, "min_diversity": False}),
    "vendi-min": ("vendi", {"use_quality": False, "min_diversity": True}),
    "vendi-quality-min": ("vendi", {"use_quality": True, "min_diversity": True}),
}
BASELINE_INTERVENTION = "none"  # only with lname dont: the unchanged model
# LASER's released sweep scripts try these rates (rho = 0.9 .. 0.005)
LASER_RATES = (1.0, 2.0, 4.0, 6.0, 8.0, 9.0, 9.5, 9.9, 9.95)
# laser.metric: paper = the task's lm-eval/paper metric (acc for boolq and winogrande, acc_norm for the
# others; sfsd.tasks.registry.task_metric), or one of acc / acc_norm where lm-eval defines it for the task
SELECT_METRICS = METRIC_CHOICES
# panel order of the figure: single matrices as LASER lists them (MLP first), groups last
LNAME_ORDER = ("fc_in", "fc_up", "fc_out", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "attn", "all")


def format_rate(rate: float) -> str:
    """The rate as it appears in paths and plan names: shortest decimal, no trailing '.0' (9.0 -> '9')."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 10.0:
        raise ConfigError(f"laser.rates: {rate!r} is not a number in [0, 10]")
    text = repr(float(rate))
    if "e" in text:
        raise ConfigError(f"laser.rates: write {rate!r} with at most a few decimals (e.g. 9.95)")
    return text.removesuffix(".0")


@dataclass(frozen=True, order=True)
class GridPoint:
    """One intervention of a sweep. lnum -1 = every block; the baseline is ('none', 'dont', -1, 0.0)."""

    intervention: str
    lname: str
    lnum: int
    rate: float

    def __post_init__(self) -> None:
        if self.lname == "dont" or self.intervention == BASELINE_INTERVENTION:
            if (self.intervention, self.lname, self.lnum, float(self.rate)) != (BASELINE_INTERVENTION, "dont", -1, 0.0):
                raise ConfigError("the baseline point is intervention 'none', lname 'dont', lnum all, rate 0; "
                                  f"got {self.intervention}/{self.lname}/{self.lnum}/{self.rate}")
        elif self.intervention not in INTERVENTIONS:
            raise ConfigError(f"laser intervention {self.intervention!r} is unknown; use one of {', '.join(INTERVENTIONS)}")
        format_rate(self.rate)

    @property
    def is_baseline(self) -> bool:
        return self.lname == "dont"

    @property
    def method(self) -> str:
        """The `method` column of its result rows: baseline, laser or vendi."""
        return "baseline" if self.is_baseline else INTERVENTIONS[self.intervention][0]

    @property
    def name(self) -> str:
        """Plan name of its result rows, e.g. 'laser-fc_in-L28-r9', 'vendi-quality-mlp-Lall-r9.5', 'dont'."""
        if self.is_baseline:
            return "dont"
        return f"{self.intervention}-{self.lname}-L{lnum_label(self.lnum)}-r{format_rate(self.rate)}"

    def wildcards(self) -> dict[str, str]:
        """Its path components in the workflow (rules/laser.smk)."""
        return {"intervention": self.intervention, "lname": self.lname, "lnum": lnum_label(self.lnum),
                "rate": format_rate(self.rate)}

    def columns(self) -> dict:
        """Columns naming the point in result rows."""
        opts = INTERVENTIONS.get(self.intervention, ("", {}))[1]
        return {"laser_intervention": self.intervention, "laser_lname": self.lname, "laser_lnum": self.lnum,
                "laser_rate": float(self.rate), "laser_use_quality": opts.get("use_quality"),
                "laser_min_diversity": opts.get("min_diversity")}

    @classmethod
    def parse(cls, intervention: str, lname: str, lnum: str | int, rate: str | float) -> GridPoint:
        """From path components or CLI arguments (lnum 'all' or -1 = every block)."""
        if isinstance(lnum, str):
            if lnum == "all":
                lnum = -1
            elif lnum.lstrip("-").isdigit():
                lnum = int(lnum)
            else:
                raise ConfigError(f"laser lnum {lnum!r} must be 'all', -1 or a block number")
        try:
            rate = float(rate)
        except ValueError:
            raise ConfigError(f"laser rate {rate!r} is not a number") from None
        return cls(intervention, lname, int(lnum), rate)

    @classmethod
    def from_row(cls, row: Mapping) -> GridPoint:
        return cls(row["laser_intervention"], row["laser_lname"], int(row["laser_lnum"]), float(row["laser_rate"]))

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


BASELINE = GridPoint(BASELINE_INTERVENTION, "dont", -1, 0.0)


def lnum_label(lnum: int) -> str:
    return "all" if lnum == -1 else str(lnum)


# ---------------------------------------------------------------- the grid


def build_grid(
    spec: ArchSpec,
    shapes,
    *,
    lnums: Sequence[int],
    lnames: Sequence[str],
    rates: Sequence[float],
    interventions: Sequence[str],
    full_grid: bool = False,
) -> dict:
    """The points of a sweep: the baseline first, then every (intervention, lname, lnum, rate), sorted.

    full_grid: every block and -1, every layer type of the registry and LASER's own rates (the lists
    given are then ignored, the interventions are not). `dont` in lnames is the baseline, always present.
    A Vendi point that would keep no row of some matrix (k = 0, e.g. rate 9.95 on a 192-row k_proj) is
    left out and listed under "skipped". `shapes`: a `sfsd.model.shapes.ModelShapes` of the dense model."""
    n_blocks = shapes.n_blocks
    if full_grid:
        lnums = [*range(n_blocks), -1]
        lnames = [t for t in spec.laser_types if t != "dont"]
        rates = LASER_RATES
    for name in interventions:
        if name not in INTERVENTIONS:
            raise ConfigError(f"laser.interventions: {name!r} is unknown; use one of {', '.join(INTERVENTIONS)}")
    for lname in lnames:
        if lname not in spec.laser_types:
            raise ConfigError(f"laser.lnames: {lname!r} is not a LASER layer type of {shapes.architecture}; "
                              f"use one of {', '.join(spec.laser_types)}")
    for lnum in lnums:
        if isinstance(lnum, bool) or not isinstance(lnum, int) or not -1 <= lnum < n_blocks:
            raise ConfigError(f"laser.lnums: {lnum!r} is out of range for a model of {n_blocks} blocks; "
                              f"use -1 (every block) or 0..{n_blocks - 1}")
    for rate in rates:
        format_rate(rate)
    points, skipped = {BASELINE}, []
    for name in interventions:
        for lname in lnames:
            if lname == "dont":
                continue
            for lnum in lnums:
                for rate in rates:
                    point = GridPoint(name, lname, int(lnum), float(rate))
                    if INTERVENTIONS[name][0] == "vendi":
                        empty = [n for n in spec.laser_types[lname] if laser_rank(min(shapes.linears[n]), rate) < 1]
                        if empty:
                            skipped.append({**point.as_dict(), "reason": f"keeps no row of {', '.join(empty)} (k = 0)"})
                            continue
                    points.add(point)
    ordered = sorted(points, key=lambda p: (not p.is_baseline, p))
    return {"architecture": shapes.architecture, "n_blocks": n_blocks, "points": [p.as_dict() for p in ordered],
            "skipped": skipped}


def grid_points(grid: Mapping) -> list[GridPoint]:
    """The GridPoints of a `build_grid` result (as read back from JSON)."""
    return [GridPoint(p["intervention"], p["lname"], int(p["lnum"]), float(p["rate"])) for p in grid["points"]]


def point_plan(spec: ArchSpec, n_blocks: int, point: GridPoint, *, bandwidth: float | None = None,
               exact: bool = False, **header) -> dict:
    """The rank plan of one point (`sfsd.decompose.plan.laser_plan`); the baseline's plan is empty."""
    from sfsd.decompose.plan import laser_plan

    if point.is_baseline:
        plan = laser_plan(spec, n_blocks, -1, "dont", 0.0)
    else:
        method, opts = INTERVENTIONS[point.intervention]
        extra = {**opts, "bandwidth": bandwidth, "exact": exact} if method == "vendi" else {}
        plan = laser_plan(spec, n_blocks, point.lnum, point.lname, point.rate, intervention=method, **extra)
    plan["notes"]["point"] = point.name
    plan.update({k: v for k, v in header.items() if v is not None})
    return plan


# ---------------------------------------------------------------- scoring one point


def item_records(scores: Sequence[Mapping], enc) -> list[dict]:
    """Per-item records of `score_multiple_choice` output on `enc` (its `EncodedRequests`), what LASER
    keeps per item: the choices' log-likelihoods, acc / acc_norm, the gold answer's log-probability (in
    total and per token), the gold's rank among the choices (1 = best; top-k accuracy is rank <= k) and
    whether the gold continuation is the greedy one (LASER's top-1 token accuracy). Multi-gold docs use
    their most likely gold; an invalid gold (-100) gives null gold columns."""
    conts: list[list[int]] = [[] for _ in enc.docs]
    for j, d in enumerate(enc.doc_of):
        conts[d].append(len(enc.conts[j]))
    out = []
    for doc, score, lengths in zip(enc.docs, scores, conts, strict=True):
        if (doc.task, doc.doc_id) != (score["task"], score["doc_id"]):
            raise DataError(f"scores and requests are out of step at {doc.task} doc {doc.doc_id}")
        lls = np.asarray(score["lls"], dtype=float)
        golds = doc.gold if isinstance(doc.gold, tuple) else (doc.gold,)
        valid = [int(g) for g in golds if 0 <= int(g) < len(lls)]
        rec = {"task": doc.task, "split": doc.split, "doc_id": int(doc.doc_id), "n_choices": len(lls),
               "lls": lls.tolist(), "acc": float(score["acc"]), "acc_norm": float(score["acc_norm"]),
               "gold": None, "logprob": None, "tokens": None, "logprob_token": None, "gold_rank": None,
               "greedy": None}
        if valid:
            g = max(valid, key=lambda i: lls[i])
            rec.update(gold=g, logprob=float(lls[g]), tokens=int(lengths[g]),
                       logprob_token=float(lls[g]) / max(1, lengths[g]),
                       gold_rank=1 + int((lls > lls[g]).sum()), greedy=bool(score["greedy"][g]))
        out.append(rec)
    return out


def _mean_row(task: str, split: str, metric: str, values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=float)
    n = len(v)
    stderr = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"task": task, "split": split, "metric": metric, "value": float(v.mean()), "stderr": stderr, "n": n,
            "scorer": "native"}


def summary_rows(items: Sequence[Mapping]) -> list[dict]:
    """Rows {task, split, metric, value, stderr, n, scorer} per (task, split): acc, acc_norm, logprob (mean
    gold log-likelihood), logprob_token (its mean per gold token) and, for tasks with more than two choices,
    top2_acc (gold among the two most likely choices)."""
    groups: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for it in items:
        groups[(it["task"], it["split"])].append(it)
    rows = []
    for (task, split), its in groups.items():
        rows.append(_mean_row(task, split, "acc", [i["acc"] for i in its]))
        rows.append(_mean_row(task, split, "acc_norm", [i["acc_norm"] for i in its]))
        scored = [i for i in its if i["logprob"] is not None]
        if scored:
            rows.append(_mean_row(task, split, "logprob", [i["logprob"] for i in scored]))
            rows.append(_mean_row(task, split, "logprob_token", [i["logprob_token"] for i in scored]))
            if max(i["n_choices"] for i in scored) > 2:
                rows.append(_mean_row(task, split, "top2_acc", [float(i["gold_rank"] <= 2) for i in scored]))
    return rows


def run_point(
    model: torch.nn.Module,
    tokenizer,
    point: GridPoint,
    enc,
    *,
    model_name: str,
    batch_size: int = 16,
    bandwidth: float | None = None,
    exact: bool = False,
    limit: int | None = None,
    model_digest: str | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Apply `point` to `model` IN PLACE (pass a fresh copy), score the requests `enc`
    (`sfsd.evaluate.scoring.encode_requests` of `build_requests`) and return (summary rows, per-item records,
    common columns: names, parameter counts, versions, the point's columns, k per changed matrix)."""
    from sfsd.decompose.compress import apply_plan
    from sfsd.decompose.plan import count_params
    from sfsd.model.shapes import model_shapes
    from sfsd.evaluate.rows import common_columns
    from sfsd.evaluate.scoring import score_multiple_choice

    spec = get_arch(architecture_of(model.config))
    shapes = model_shapes(model)  # of the dense model, before the plan changes it
    plan = point_plan(spec, shapes.n_blocks, point, bandwidth=bandwidth, exact=exact, model=model_name,
                      model_digest=model_digest, architecture=shapes.architecture)
    start = time.perf_counter()
    applied = apply_plan(model, spec, plan)
    apply_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = score_multiple_choice(model, tokenizer, enc, batch_size=batch_size)
    seconds = time.perf_counter() - start
    items = item_records(scores, enc)
    ks = sorted({(key.split(".", 1)[1], r["k"]) for key, r in applied["layers"].items()})
    param = next(model.parameters())
    common = common_columns(
        model_name, point.method, point.name, count_params(shapes, applied["plan"]), device=placement(model),
        dtype=str(param.dtype).removeprefix("torch."), limit=limit, seconds=seconds,
        apply_seconds=apply_seconds, laser_k=",".join(f"{n}={k}" for n, k in ks) or None,
        laser_matrices=len(applied["layers"]), **point.columns())
    log.info("%s: %d matrices changed in %.1f s, %d docs scored in %.1f s", point.name, len(applied["layers"]),
             apply_seconds, len(items), seconds)
    return summary_rows(items), items, common


# ---------------------------------------------------------------- choosing on the search split


def _values_by_point(rows: Iterable[Mapping], task: str, split: str) -> dict[GridPoint, dict[str, float]]:
    out: dict[GridPoint, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["task"] == task and r["split"] == split and r.get("laser_lname") is not None:
            out[GridPoint.from_row(r)][r["metric"]] = float(r["value"])
    return out


def _task_metric(task: str, metric: str) -> str:
    """The metric `metric` (SELECT_METRICS) means for `task` (`sfsd.tasks.registry.task_metric`; a task name outside
    the six benchmarks takes the setting itself, "paper" there meaning acc_norm)."""
    from sfsd.tasks.registry import resolve_metric

    if metric not in SELECT_METRICS:
        raise ConfigError(f"laser.metric {metric!r} must be one of {', '.join(SELECT_METRICS)}")
    try:
        return resolve_metric(task, metric)
    except ConfigError as err:
        raise ConfigError(f"laser.metric: {err}") from None


def choose(rows: Iterable[Mapping], task: str, metric: str = "paper") -> dict:
    """The best point of `task` on the search split: the highest `metric` (a SELECT_METRICS setting,
    resolved for the task: "paper" = acc for boolq and winogrande, acc_norm for the others); ties go to
    the higher mean gold log-prob per token, then to the baseline (no intervention), then to the first in
    grid order. Also the best point of each intervention (baseline excluded), whether or not it beats the
    baseline. Returns {task, metric (the resolved one), metric_setting, chosen, by_intervention, baseline,
    values}."""
    setting, metric = metric, _task_metric(task, metric)
    values = _values_by_point(rows, task, "search")
    if BASELINE not in values:
        raise DataError(f"no search-split rows of the baseline (dont) for {task}; run its laser_point job")
    missing = [p.name for p, v in values.items() if metric not in v]
    if missing:
        raise DataError(f"search rows of {task} lack {metric} for {missing[:3]}")

    def key(p: GridPoint) -> tuple[float, float]:
        return values[p][metric], values[p].get("logprob_token", -math.inf)

    def best(points: list[GridPoint]) -> GridPoint:
        top = points[0]
        for p in points[1:]:
            if key(p) > key(top):  # strict: an exact tie keeps the earlier (baseline first)
                top = p
        return top

    ordered = sorted(values, key=lambda p: (not p.is_baseline, p))
    by_intervention = {}
    for name in sorted({p.intervention for p in ordered if not p.is_baseline}):
        by_intervention[name] = best([p for p in ordered if p.intervention == name]).as_dict()
    chosen = best(ordered)
    return {"task": task, "metric": metric, "metric_setting": setting, "split": "search", "chosen": chosen.as_dict(),
            "by_intervention": by_intervention, "baseline": values[BASELINE][metric],
            "values": {p.name: values[p][metric] for p in ordered}}


def reported_points(chosen: Mapping) -> list[GridPoint]:
    """The points a `choose` result sends to the test split: the baseline, the chosen point and the best
    point of each intervention (deduplicated, baseline first)."""
    points = {BASELINE, GridPoint(**{k: chosen["chosen"][k] for k in ("intervention", "lname", "lnum", "rate")})}
    for p in chosen["by_intervention"].values():
        points.add(GridPoint(p["intervention"], p["lname"], int(p["lnum"]), float(p["rate"])))
    return sorted(points, key=lambda p: (not p.is_baseline, p))


def choose_file(score_paths: Sequence[str | os.PathLike], task: str, metric: str, out: str | os.PathLike) -> dict:
    """`choose` over the search-split score files of one task, written as JSON."""
    from sfsd.evaluate.rows import combine

    result = choose(combine(score_paths).to_pylist(), task, metric)
    write_json(out, result)
    log.info("%s: chose %s (%s %.4f, baseline %.4f) among %d points", task, result["chosen"]["name"],
             result["metric"], result["values"][result["chosen"]["name"]], result["baseline"], len(result["values"]))
    return result


# ---------------------------------------------------------------- the study's results


def combine_study(score_paths: Sequence[str | os.PathLike], item_paths: Sequence[str | os.PathLike],
                  chosen_paths: Sequence[str | os.PathLike], out_results: str | os.PathLike,
                  out_items: str | os.PathLike) -> tuple[int, int]:
    """Every point's summary rows in one results Parquet (`sfsd.evaluate.rows.write_rows` format) with two
    flags per row, laser_chosen (the task's chosen point) and laser_best_of_intervention; and the per-item
    records of the baseline and of the reported points (`reported_points`) in a second Parquet.
    Returns (summary rows, item rows)."""
    from sfsd.evaluate.rows import combine, write_rows

    chosen, best, keep = {}, defaultdict(set), set()
    for path in chosen_paths:
        c = read_json(path)
        chosen[c["task"]] = c["chosen"]["name"]
        best[c["task"]].update(p["name"] for p in c["by_intervention"].values())
        keep.update((c["task"], p.name) for p in reported_points(c))
    rows = combine(score_paths).to_pylist()
    for r in rows:
        r["laser_chosen"] = chosen.get(r["task"]) == r["plan"]
        r["laser_best_of_intervention"] = r["plan"] in best.get(r["task"], ())
    write_rows(out_results, rows)
    items = [r for r in combine(item_paths).to_pylist() if (r["task"], r["plan"]) in keep]
    for r in items:
        r["laser_chosen"] = chosen.get(r["task"]) == r["plan"]
    write_rows(out_items, items)
    return len(rows), len(items)

