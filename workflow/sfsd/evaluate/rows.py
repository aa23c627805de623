"""Results as Parquet rows: one row per model/method/plan/task/split/metric.

`summarize_scores` makes the rows of the native scorer's per-document scores (`sfsd.evaluate.scoring`),
`with_floor_rates` adds each task's majority-class rate and chance (`majority`, `chance`), and
`mean_metric` their average over tasks (the paper's "average" column, the rank search's criterion);
`write_rows(path, rows, common)` writes them (the ROW_SCHEMA columns always present, with fixed types),
`read_rows` / `combine(paths)` read them back; `common_columns` are the columns every row of one
evaluated model shares (names, parameter/MAC counts, device, dtype, library versions) and
`perplexity_row` is the row of a `sfsd.evaluate.perplexity.perplexity` result. The per-item scores behind the
rows: `sfsd.evaluate.items`.
"""

from __future__ import annotations

import math
import os
import platform
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from sfsd.errors import DataError
from sfsd.io import atomic_path
from sfsd.tasks.registry import lmeval_metrics, resolve_metric


def summarize_scores(scores: Sequence[Mapping], metrics: Sequence[str] | None = None) -> list[dict]:
    """Rows {task, split, metric, value, stderr, n, scorer: "native"} from per-doc scores; stderr is
    lm-eval's mean_stderr (sample standard deviation / sqrt(n)).

    metrics: None = the metrics lm-eval's config of each task defines (`TASKS[task].metrics`: acc for
    boolq and winogrande, acc and acc_norm for the others; both for a task name outside TASKS), so the
    native scorer gives the same (task, metric) rows as lm-eval; a sequence = those for every task."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for s in scores:
        groups[(s["task"], s["split"])].append(s)
    rows = []
    for (task, split), docs in groups.items():
        wanted = metrics if metrics is not None else lmeval_metrics(task)
        for metric in wanted:
            values = np.array([d[metric] for d in docs], dtype=float)
            n = len(values)
            stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
            rows.append({"task": task, "split": split, "metric": metric, "value": float(values.mean()),
                         "stderr": stderr, "n": n, "scorer": "native"})
    return rows


def with_floor_rates(rows: Sequence[Mapping], doc_scores: Sequence[Mapping]) -> list[dict]:
    """`rows` with, on each task's rows, the `majority` and `chance` rates (fractions) of the documents
    scored (`sfsd.tasks.baselines.floor_rates` of the scores, which carry gold and choices:
    `sfsd.evaluate.items.with_golds`): what the tables' informative average compares the dense model with."""
    from sfsd.tasks.baselines import floor_rates

    rates = floor_rates(doc_scores) if doc_scores else {}
    return [{**r, **rates[r["task"]]} if r.get("metric") != "ppl" and r["task"] in rates else dict(r) for r in rows]


def mean_metric(scores: Sequence[Mapping], metric: str = "paper", tasks: Iterable[str] | None = None) -> float:
    """The unweighted mean over tasks of each task's mean `metric` (the paper's "average" column): the
    number the rank search compares against baseline - delta. metric: a setting of
    `sfsd.tasks.registry.METRIC_CHOICES`, resolved per task by `task_metric` ("paper": acc for boolq and
    winogrande, acc_norm for the others; ConfigError for a metric lm-eval does not define for a task);
    a task outside TASKS takes the setting itself ("paper" there means acc_norm)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    wanted = None if tasks is None else set(tasks)
    resolved: dict[str, str] = {}
    for s in scores:
        task = s["task"]
        if wanted is None or task in wanted:
            if task not in resolved:
                resolved[task] = resolve_metric(task, metric)
            by_task[task].append(float(s[resolved[task]]))
    if not by_task:
        raise DataError("no scores to average")
    return float(np.mean([np.mean(v) for v in by_task.values()]))


def perplexity_row(result: Mapping, source: str, split: str = "test", docs: Sequence[Mapping] = ()) -> dict:
    """A results row of a `perplexity` result: task = the text source, metric "ppl", n = scored tokens,
    the window, stride and window count (SFSD uses 128-token windows, SVD-LLM 2048: keep both apart), where
    BOS went (`ppl_bos`: every_window or first_window; perplexities of different protocols are never
    compared), the 95% interval over windows (`ci_low`, `ci_high`; `log_ppl_interval`), and which
    documents were scored (`ppl_docs` and `ppl_docs_digest` of their ids)."""
    from sfsd.evaluate.perplexity import doc_ids_digest, log_ppl_interval

    low, high = log_ppl_interval(result["window_nll"], result["window_tokens"])
    return {"task": source, "split": split, "metric": "ppl", "value": float(result["ppl"]), "stderr": None,
            "ci_low": low, "ci_high": high, "n": int(result["tokens"]), "scorer": "native",
            "window": int(result["window"]), "stride": int(result["stride"]), "windows": int(result["windows"]),
            "ppl_bos": str(result["bos"]),
            "ppl_docs": len(docs), "ppl_docs_digest": doc_ids_digest(docs) if docs else None}


# columns with a fixed type (others are inferred); every results file has at least these
ROW_SCHEMA = {
    "model": "string", "method": "string", "plan": "string", "task": "string", "split": "string",
    "metric": "string", "value": "float64", "stderr": "float64", "n": "int64", "limit": "int64",
    "majority": "float64", "chance": "float64",
    "scorer": "string", "params_model": "int64", "params_model_dense": "int64",
    "params_model_fraction": "float64", "params_decoder_linear": "int64",
    "params_decoder_linear_dense": "int64", "params_decoder_linear_fraction": "float64",
    "macs_per_token": "int64", "macs_per_token_fraction": "float64", "decoder_linear_macs_per_token": "int64",
    "device": "string", "dtype": "string", "torch_version": "string", "transformers_version": "string",
    "lm_eval_version": "string", "datasets_version": "string", "seconds": "float64",
}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python_version": platform.python_version()}
    for pkg, key in (("torch", "torch_version"), ("transformers", "transformers_version"),
                     ("lm_eval", "lm_eval_version"), ("datasets", "datasets_version")):
        try:
            out[key] = version(pkg)
        except PackageNotFoundError:
            out[key] = None
    return out


def param_columns(counts: Mapping) -> dict:
    """Flatten `sfsd.decompose.plan.count_params` output into the row columns (both parameter conventions:
    whole model as SFSD, decoder Linear layers as SVD-LLM; MACs per token)."""
    return {
        "params_model": counts["model"]["compressed"], "params_model_dense": counts["model"]["dense"],
        "params_model_fraction": counts["model"]["fraction"],
        "params_decoder_linear": counts["decoder_linear"]["compressed"],
        "params_decoder_linear_dense": counts["decoder_linear"]["dense"],
        "params_decoder_linear_fraction": counts["decoder_linear"]["fraction"],
        "macs_per_token": counts["macs_per_token"]["compressed"],
        "macs_per_token_fraction": counts["macs_per_token"]["fraction"],
        "decoder_linear_macs_per_token": counts["decoder_linear_macs_per_token"]["compressed"],
    }


def common_columns(model: str, method: str, plan: str, counts: Mapping | None = None,
                   device: str | None = None, dtype: str | None = None, **extra) -> dict:
    """The columns every row of one evaluated model shares: names, parameter/MAC counts, device, dtype and
    library versions, plus any `extra` columns."""
    from sfsd.provenance import code_version

    out = {"model": model, "method": method, "plan": plan, "device": device, "dtype": dtype,
           "code_version": code_version(), **library_versions(),
           **(param_columns(counts) if counts is not None else {})}
    out.update(extra)
    return out


def _table(rows: Sequence[Mapping]):
    import pyarrow as pa

    columns: dict[str, list] = {}
    names: list[str] = list(ROW_SCHEMA)
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    for name in names:
        columns[name] = [r.get(name) for r in rows]
    arrays, fields = [], []
    for name in names:
        values = columns[name]
        if name in ROW_SCHEMA:
            typ = pa.type_for_alias(ROW_SCHEMA[name])
            if typ == pa.float64():
                values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
            arr = pa.array(values, type=typ)
        else:
            arr = pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"format": "sfsd-results-1"}))


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping], common: Mapping | None = None) -> Path:
    """Write rows (each merged over `common`; a row's own keys win) as a Parquet file, atomically.
    The ROW_SCHEMA columns are always present with fixed types (null where unknown)."""
    import pyarrow.parquet as pq

    if not rows:
        raise DataError(f"no result rows to write to {path}")
    merged = [{**(common or {}), **r} for r in rows]
    table = _table(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_rows(path: str | os.PathLike):
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise DataError(f"missing results file {path}; run the evaluation that makes it first")
    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path} is not a readable Parquet file ({err}); delete it and rerun its stage") from None


def combine(paths: Iterable[str | os.PathLike]):
    """One pyarrow Table of several results files; columns missing in a file are null there."""
    import pyarrow as pa

    tables = [read_rows(p) for p in paths]
    if not tables:
        raise DataError("combine needs at least one results file")
    return pa.concat_tables(tables, promote_options="default")
