"""Paired comparisons of model variants scored on the same test documents (no model, no GPU).

Every variant of a model (base, <method>-<budget>, ...: `sfsd.decompose.variants`) is scored on the
same documents, so two variants are compared pairwise: the per-document differences are resampled (the
documents with replacement, within each task) and the 2.5/97.5 percentiles of the resampled differences
give a 95% interval. The same resamples give the difference of the informative average (the mean over
the tasks where the base model's 95% interval lies above the task's majority-class rate and chance:
`sfsd.report.informative`, decided from the base model's documents alone). Perplexity is compared as the
ratio ppl_a / ppl_b over the same windows.

The functions on numpy arrays are pure; `read_docs` and `comparisons_table` at the bottom are the only
ones that touch files (the per-item files results/{model}/eval/{variant}.docs.parquet, format
sfsd-docs-1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfsd.decompose.variants import METHOD_NAMES, parse_variant
from sfsd.errors import ConfigError, DataError
from sfsd.evaluate.items import DOCS_COLUMNS, DOCS_FORMAT, PPL_BOS, PPL_DOC_IDS, VARIANT_COLUMNS
from sfsd.report.informative import Verdict, informative_note, informative_tasks, task_verdict

LEVEL = 0.95
_CHUNK = 1 << 22  # resampled values held at once (per column), whatever the number of documents


@dataclass(frozen=True)
class Interval:
    """A point estimate with the 2.5/97.5 percentiles of its bootstrap distribution."""

    value: float
    low: float
    high: float


def _check_resamples(n_boot: int) -> None:
    if int(n_boot) < 1:
        raise ConfigError(f"the bootstrap needs at least 1 resample, got {n_boot} (evaluation.bootstrap.resamples)")


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def resampled_sums(columns: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of `n_boot` resamples (with replacement) of the n items of `columns` (k columns x n items):
    one index draw per resample serves every column, so paired columns stay paired. Shape (k, n_boot).
    Resamples are drawn in chunks of a size fixed by n alone, so the output depends on the seed only."""
    columns = np.atleast_2d(np.asarray(columns, dtype=np.float64))
    n = columns.shape[1]
    if n == 0:
        raise DataError("nothing to resample: no items")
    out = np.empty((columns.shape[0], n_boot))
    step = max(1, _CHUNK // n)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[:, start:stop] = columns[:, idx].sum(axis=-1)
    return out


def _paired(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(f"{name}: paired arrays differ in shape ({a.shape} vs {b.shape}); pair the same items")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError(f"{name}: scores hold NaN or infinite values")
    return a - b


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int = 2000,
                     seed: int = 0, subset: Sequence[str] | None = None) -> dict:
    """Difference a - b of the task-averaged score of two models scored on the same documents.

    a[task], b[task]: per-document scores of the same documents in the same order (tasks in the order
    given by `a`). The average is the unweighted mean over tasks (the paper's average column). The
    documents are resampled with replacement within each task (stratified), `n_boot` times, from
    numpy.random.default_rng(seed); every task's interval and the average's come from the same resamples.
    `subset`: tasks whose unweighted mean is also compared ("subset", from the same resamples; None when
    `subset` is None or empty: the informative average). Returns {"average": Interval, "subset": Interval |
    None, "tasks": {task: Interval}, "n": {task: documents}}."""
    _check_resamples(n_boot)
    if list(a) != list(b):
        raise DataError(f"paired scores cover different tasks ({', '.join(a)} vs {', '.join(b)})")
    if not a:
        raise DataError("paired scores cover no task")
    unknown = [t for t in subset or () if t not in a]
    if unknown:
        raise DataError(f"the tasks {', '.join(unknown)} of the subset are not among the paired tasks ({', '.join(a)})")
    rng = np.random.default_rng(seed)
    tasks, samples, n = {}, {}, {}
    for task in a:
        diff = _paired(task, a[task], b[task])
        if diff.size == 0:
            raise DataError(f"{task}: no documents to compare")
        n[task] = diff.size
        resampled = resampled_sums(diff, n_boot, rng)[0] / diff.size
        samples[task] = resampled
        tasks[task] = Interval(float(diff.sum() / diff.size), *_percentiles(resampled))

    def mean_of(names) -> Interval:
        value = float(np.mean([tasks[t].value for t in names]))
        return Interval(value, *_percentiles(np.mean([samples[t] for t in names], axis=0)))

    return {"average": mean_of(list(tasks)), "subset": mean_of(list(subset)) if subset else None, "tasks": tasks,
            "n": n}


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    """exp(summed negative log-likelihood / scored tokens) of some windows."""
    return float(np.exp(np.sum(nll) / np.sum(tokens)))


def paired_ppl_ratio(nll_a: np.ndarray, tokens_a: np.ndarray, nll_b: np.ndarray, tokens_b: np.ndarray,
                     n_boot: int = 2000, seed: int = 0) -> Interval:
    """ppl_a / ppl_b of two models over the same windows (ppl = exp(sum nll / sum tokens)), with the
    windows resampled with replacement `n_boot` times from numpy.random.default_rng(seed)."""
    _check_resamples(n_boot)
    cols = np.stack([np.asarray(c, dtype=np.float64) for c in (nll_a, tokens_a, nll_b, tokens_b)])
    _paired("perplexity", cols[0], cols[2])
    _paired("perplexity tokens", cols[1], cols[3])
    if (cols[[1, 3]] <= 0).any():
        raise DataError("perplexity: a window scored no tokens")
    sums = resampled_sums(cols, n_boot, np.random.default_rng(seed))
    ratios = np.exp(sums[0] / sums[1] - sums[2] / sums[3])
    value = float(np.exp(cols[0].sum() / cols[1].sum() - cols[2].sum() / cols[3].sum()))
    return Interval(value, *_percentiles(ratios))


def comparison_pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The (a, b) pairs compared, a - b, from the variants present (names: `sfsd.decompose.variants`): at each budget
    (in order of first appearance) every pair of uniform methods (in `METHOD_NAMES` order: feature vs
    weight, feature vs whitened, ...); per method at each budget, the spectral, loss and searched
    allocations vs uniform, loss vs spectral, searched vs spectral and searched vs loss (equal sizes); each tolerance search vs the uniform
    variant of its method at each budget; then every variant vs base."""
    present = list(dict.fromkeys(variants))
    by: dict[tuple[str, str, str], list[str]] = {}  # (kind, method, budget) -> names
    budgets: list[str] = []
    searches: list[tuple[str, str]] = []
    for name in present:
        v = parse_variant(name)
        if v.kind in ("uniform", "spectral", "loss", "searched"):
            by.setdefault((v.kind, v.method, v.budget), []).append(name)
            budgets += [v.budget] if v.budget not in budgets else []
        elif v.kind == "search":
            searches.append((name, v.method))
    uniform = {(m, b): names[0] for (kind, m, b), names in by.items() if kind == "uniform"}
    pairs: list[tuple[str, str]] = []
    for budget in budgets:
        methods = [m for m in METHOD_NAMES if (m, budget) in uniform]
        pairs += [(uniform[(m1, budget)], uniform[(m2, budget)]) for i, m1 in enumerate(methods)
                  for m2 in methods[i + 1:]]
        for m in METHOD_NAMES:
            spectral = by.get(("spectral", m, budget), [])
            loss = by.get(("loss", m, budget), [])
            searched = by.get(("searched", m, budget), [])
            if (m, budget) in uniform:
                pairs += [(name, uniform[(m, budget)]) for name in spectral + loss + searched]
            pairs += [(s, sp) for s in loss + searched for sp in spectral]
            pairs += [(s, lo) for s in searched for lo in loss]  # does a search beat the allocation it completes by?
    for name, method in searches:
        pairs += [(name, uniform[(method, b)]) for b in budgets if (method, b) in uniform]
    if "base" in present:
        pairs += [(v, "base") for v in present if v != "base"]
    return pairs


def check_paired(name_a: str, items_a: Mapping[str, np.ndarray], name_b: str, items_b: Mapping[str, np.ndarray],
                 what: str = "docs") -> None:
    """DataError (one line) unless both variants hold the same item ids (sorted) of the same tasks."""
    for task in dict.fromkeys([*items_a, *items_b]):
        if task not in items_a or task not in items_b:
            (lacks, has, items) = (name_a, name_b, items_b) if task not in items_a else (name_b, name_a, items_a)
            raise DataError(f"cannot pair {name_a} with {name_b}: {lacks} has no {task} {what} ({has} has "
                            f"{len(items[task])}); evaluate both on the same tasks")
        ia, ib = np.asarray(items_a[task]), np.asarray(items_b[task])
        if ia.shape != ib.shape or not np.array_equal(ia, ib):
            only_a, only_b = np.setdiff1d(ia, ib).size, np.setdiff1d(ib, ia).size
            raise DataError(f"cannot pair {name_a} with {name_b}: their {task} {what} differ ({len(ia)} vs "
                            f"{len(ib)}; {only_a} only in {name_a}, {only_b} only in {name_b}); score both on the "
                            "same split, limit and perplexity windows")


def task_order(tasks) -> list[str]:
    """The six benchmarks in the paper's column order, then any other names sorted."""
    from sfsd.tasks.registry import TASKS

    tasks = set(tasks)
    return [t for t in TASKS if t in tasks] + sorted(tasks - set(TASKS))


def variant_scores(variant: Mapping, metric: str) -> dict[str, np.ndarray]:
    """{task: per-doc scores} of one variant (read_docs), the metric of each task from task_metric."""
    from sfsd.tasks.registry import task_metric

    out = {}
    for task, docs in variant["docs"].items():
        name = task_metric(task, metric)
        values = docs[name]
        if np.isnan(values).any():
            raise DataError(f"{variant['plan']}: {int(np.isnan(values).sum())} {task} docs have no {name}; "
                            "re-run its evaluation")
        out[task] = values
    return out


def dense_verdicts(variants: Mapping[str, Mapping], metric: str) -> dict[str, Verdict] | None:
    """{task: Verdict} of the informative average, decided from the base variant's documents alone: its
    mean score and standard error (sample standard deviation / sqrt(n), lm-eval's) per task, against the
    majority-class rate and chance of its documents' gold labels and choice counts (unknown where the docs
    file does not record them); None without a base variant."""
    from sfsd.tasks.baselines import chance_rate, majority_rate

    base = variants.get("base")
    if base is None:
        return None
    out = {}
    for task, values in variant_scores(base, metric).items():
        docs = base["docs"][task]
        se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else None
        gold, choices = docs.get("gold"), docs.get("choices")
        known = gold is not None and choices is not None and not (np.isnan(gold).any() or np.isnan(choices).any())
        majority = majority_rate([int(g) for g in gold]) if known else None
        chance = chance_rate([int(c) for c in choices]) if known else None
        out[task] = task_verdict(task, float(values.mean()), se, majority, chance)
    return out


def compare_pair(a: Mapping, b: Mapping, metric: str, n_boot: int = 2000, seed: int = 0,
                 informative: Sequence[str] = ()) -> dict:
    """Paired differences (x100 points) and perplexity ratios of two variants as read by read_docs; the
    same seed for every pair, so the pairs share their resamples. `informative`: the tasks of the
    informative average ("subset"; `dense_verdicts`)."""
    check_paired(a["plan"], {t: d["item"] for t, d in a["docs"].items()},
                 b["plan"], {t: d["item"] for t, d in b["docs"].items()})
    tasks = task_order(a["docs"])
    sa, sb = variant_scores(a, metric), variant_scores(b, metric)
    acc = paired_bootstrap({t: 100 * sa[t] for t in tasks}, {t: 100 * sb[t] for t in tasks}, n_boot, seed,
                           subset=list(informative))
    ppl = {}
    shared = [s for s in task_order(a["windows"]) if s in b["windows"]]
    if shared:
        check_paired(a["plan"], {s: a["windows"][s]["item"] for s in shared},
                     b["plan"], {s: b["windows"][s]["item"] for s in shared}, what="windows")
    if shared and a.get("ppl_doc_ids") != b.get("ppl_doc_ids"):
        raise DataError(f"cannot pair {a['plan']} with {b['plan']}: their perplexity windows come from different "
                        "documents; evaluate both with the same evaluation.perplexity and splits settings")
    if shared and a.get("ppl_bos") != b.get("ppl_bos"):
        raise DataError(f"cannot pair {a['plan']} with {b['plan']}: their perplexity windows put BOS differently "
                        f"({a.get('ppl_bos') or 'unrecorded'} vs {b.get('ppl_bos') or 'unrecorded'}); evaluate both "
                        "with the same evaluation.perplexity.bos")
    for source in shared:
        wa, wb = a["windows"][source], b["windows"][source]
        if not np.array_equal(wa["tokens"], wb["tokens"]):
            raise DataError(f"cannot pair {a['plan']} with {b['plan']}: their {source} windows score different "
                            "tokens; evaluate both with the same tokenizer and window")
        ppl[source] = (paired_ppl_ratio(wa["nll"], wa["tokens"], wb["nll"], wb["tokens"], n_boot, seed),
                       len(wa["item"]))
    return {**acc, "ppl": ppl}


def _points(x: float) -> float:
    return round(x, 1) + 0.0  # + 0.0: no "-0.0"


def format_diff(iv: Interval) -> str:
    """A Markdown cell: '+2.1 [-0.4, 4.6]' (points)."""
    return f"{_points(iv.value):+.1f} [{_points(iv.low):.1f}, {_points(iv.high):.1f}]"


def format_ratio(iv: Interval) -> str:
    """A Markdown cell: '0.728 [0.711, 0.743]' (3 significant digits: ratios span 1e-4 to 1e8)."""
    return f"{iv.value:#.3g} [{iv.low:#.3g}, {iv.high:#.3g}]"


def comparison_rows(variants: Mapping[str, Mapping], metric: str, n_boot: int = 2000,
                    seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """(CSV rows, Markdown rows, notes) of every comparison_pairs pair of the variants (read_docs)."""
    from sfsd.tasks.registry import task_metric

    pairs = comparison_pairs(list(variants))
    if not pairs:
        raise DataError(f"no pair to compare among the variants {', '.join(variants) or '(none)'}; evaluate base "
                        "and at least one compressed model")
    tasks = task_order(t for v in variants.values() for t in v["docs"])
    sources = task_order(s for v in variants.values() for s in v["windows"])
    verdicts = dense_verdicts(variants, metric)
    informative = informative_tasks(verdicts or {}, tasks)
    csv_rows, md_rows = [], []
    n_docs: dict[str, int] = {}
    n_windows: dict[str, int] = {}
    for name_a, name_b in pairs:
        a, b = variants[name_a], variants[name_b]
        result = compare_pair(a, b, metric, n_boot, seed, informative)
        n_docs.update(result["n"])
        common = {"a": name_a, "b": name_b, "a_params_%": round(100 * a["params_model_fraction"], 1),
                  "b_params_%": round(100 * b["params_model_fraction"], 1)}
        csv_row, md_row = dict(common), dict(common)
        for key, iv in (("average", result["average"]), ("informative", result["subset"]),
                        *((t, result["tasks"].get(t)) for t in tasks)):
            for part, attr in (("diff", "value"), ("low", "low"), ("high", "high")):
                csv_row[f"{key}_{part}"] = None if iv is None else round(getattr(iv, attr), 4)
            md_row[key] = None if iv is None else format_diff(iv)
        for source in sources:
            iv, n = result["ppl"].get(source, (None, None))
            if n is not None:
                n_windows[source] = n
            for suffix, attr in (("", "value"), ("_low", "low"), ("_high", "high")):
                # 6 significant digits: ratios span 1e-8 to 1e10
                csv_row[f"ppl_ratio_{source}{suffix}"] = None if iv is None else float(f"{getattr(iv, attr):.6g}")
            md_row[f"ppl_ratio_{source}"] = None if iv is None else format_ratio(iv)
        total = sum(result["n"].values())
        csv_row["n_docs"] = md_row["n_docs"] = total
        csv_rows.append(csv_row)
        md_rows.append(md_row)
    notes = {"tasks": tasks, "metrics": {t: task_metric(t, metric) for t in tasks}, "n_docs": n_docs,
             "n_windows": n_windows, "pairs": len(pairs), "informative": informative_note(verdicts, tasks)}
    return csv_rows, md_rows, notes


# ------------------------------------------------------------------------------------ file access


def _column(table, name: str, dtype) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], dtype=dtype)


def read_docs(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """{variant: {"model", "method", "plan", "params_model_fraction", "split", "docs": {task: {"item",
    "acc", "acc_norm", "gold", "choices"}}, "windows": {source: {"item", "nll", "tokens"}}, "ppl_doc_ids", "ppl_bos"}} of one
    model's docs files
    (results/{model}/eval/{variant}.docs.parquet, format sfsd-docs-1), items sorted within each task."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    variants: dict[str, dict] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"missing docs file {path}; run the evaluation that makes it first")
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path} is not a readable Parquet file ({err}); delete it and rerun its stage") from None
        fmt = (table.schema.metadata or {}).get(b"format", b"").decode()
        if fmt != DOCS_FORMAT:
            raise DataError(f"{path} is not a per-item docs file (format {fmt or 'none'!r}, expected {DOCS_FORMAT!r}); "
                            "rerun its evaluation")
        missing = [c for c in DOCS_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{path} lacks the columns {', '.join(missing)}; rerun its evaluation")
        if table.num_rows == 0:
            raise DataError(f"{path} holds no rows; rerun its evaluation")
        head = {}
        for key in (*VARIANT_COLUMNS, "split"):
            values = table.column(key).unique().to_pylist()
            if len(values) != 1:
                raise DataError(f"{path} mixes several values of {key} ({values[:4]}); one file is one variant")
            head[key] = values[0]
        plan = head["plan"]
        if plan in variants:
            raise DataError(f"variant {plan} is in two docs files ({variants[plan]['path']} and {path})")
        other = next(iter(variants.values()), None)
        if other is not None and (other["model"], other["split"]) != (head["model"], head["split"]):
            raise DataError(f"{path} is {head['model']}/{head['split']} but {other['path']} is "
                            f"{other['model']}/{other['split']}; compare one model's variants on one split")
        units = set(table.column("unit").unique().to_pylist())
        if units - {"doc", "window"}:
            raise DataError(f"{path}: unknown unit(s) {sorted(map(str, units - {'doc', 'window'}))}; "
                            "expected doc or window")
        ppl_ids = (table.schema.metadata or {}).get(PPL_DOC_IDS.encode(), b"[]")
        ppl_bos = (table.schema.metadata or {}).get(PPL_BOS.encode(), b"null")
        entry = {**head, "path": str(path), "docs": {}, "windows": {}, "ppl_doc_ids": json.loads(ppl_ids),
                 "ppl_bos": json.loads(ppl_bos)}
        for unit, key, fields in (("doc", "docs", ("acc", "acc_norm", "gold", "choices")),
                                  ("window", "windows", ("nll", "tokens"))):
            part = table.filter(pc.equal(table.column("unit"), unit))
            for task in part.column("task").unique().to_pylist():
                rows = part.filter(pc.equal(part.column("task"), task))
                items = np.asarray(rows.column("item").to_pylist(), dtype=np.int64)
                order = np.argsort(items, kind="stable")
                items = items[order]
                if items.size > 1 and (np.diff(items) == 0).any():
                    raise DataError(f"{path}: {task} lists item {int(items[1:][np.diff(items) == 0][0])} twice; "
                                    "rerun its evaluation")
                entry[key][task] = {"item": items, **{f: _column(rows, f, np.float64)[order] for f in fields}}
        variants[plan] = entry
    if not variants:
        raise DataError("no docs files given")
    return variants


def comparisons_table(doc_paths: Sequence[str | os.PathLike], metric: str, out_md: str | os.PathLike,
                      out_csv: str | os.PathLike, seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """Write the paired comparisons of one model's variants as Markdown (caption, one interval per cell)
    and CSV (diff/low/high columns); returns the CSV rows."""
    from sfsd.report.tables import write_table

    _check_resamples(n_boot)
    variants = read_docs(doc_paths)
    csv_rows, md_rows, notes = comparison_rows(variants, metric, n_boot, seed)
    model = next(iter(variants.values()))["model"]
    metrics = ", ".join(f"{t} {m}" for t, m in notes["metrics"].items())
    caption = (
        f"Paired comparisons of the {model} variants scored on the same test documents: a - b of the zero-shot "
        f"score in x100 points (metric setting {metric}: {metrics}); average = difference of the unweighted mean "
        f"over the {len(notes['tasks'])} tasks; informative = the same over the tasks where the base model scores "
        "above what a constant answer or chance gets (in the footer). Intervals in brackets: 95% paired bootstrap "
        "(2.5/97.5 percentiles "
        f"of B={n_boot} resamples of the documents with replacement within each task, "
        f"numpy.random.default_rng seed {seed}, the same resamples for every pair). a_params_% / b_params_%: "
        "parameters kept over the whole model."
    )
    if notes["n_windows"]:
        caption += (" ppl_ratio: ppl_a / ppl_b over the same windows (ppl = exp(summed NLL / scored tokens)), "
                    "bootstrapped over windows; below 1 means a predicts the text better.")
    footer = "Docs per task: " + ", ".join(f"{t} {n}" for t, n in notes["n_docs"].items()) + "."
    if notes["n_windows"]:
        footer += " Perplexity windows: " + ", ".join(f"{s} {n}" for s, n in notes["n_windows"].items())
        bos = sorted({str(v.get("ppl_bos") or "unrecorded") for v in variants.values() if v["windows"]})
        footer += f" (BOS: {', '.join(b.replace('_', ' ') for b in bos)})."
    footer += " " + notes["informative"]
    write_table(csv_rows, out_md, out_csv, caption=caption, footer=footer, md_rows=md_rows)
    return csv_rows
