"""Tables built from the combined results Parquet alone (no model, no GPU)."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from sfsd.errors import DataError
from sfsd.evaluate.items import Z95
from sfsd.io import atomic_path
from sfsd.report.informative import Verdict, informative_note, informative_tasks, task_verdict
from sfsd.tasks.registry import ACCURACY_METRICS, TASKS, task_metric

METHOD_ORDER = {"baseline": 0, "feature": 1, "weight": 2, "whitened": 3, "asvd": 4, "laser": 5, "vendi": 6}
METHOD_LABEL = {"baseline": "Baseline", "feature": "Feature space (SFSD)", "weight": "Weight space (SVD)",
                "whitened": "Whitened SVD (SVD-LLM)", "asvd": "ASVD", "laser": "LASER", "vendi": "Vendi"}


def complete_variants(by_variant: dict) -> dict:
    """The variants scored on every task the baseline (else the most complete variant) was scored on: a
    model scored on fewer tasks, e.g. a LASER point chosen for one task (results/<model>/laser/ rows share
    the results file), would show an average over other tasks; those belong to their own tables."""
    bases = [v for (method, _), v in by_variant.items() if method == "baseline"] or list(by_variant.values())
    wanted = max((set(v["scores"]) for v in bases), key=len)  # LASER's own baseline point is one task
    return {k: v for k, v in by_variant.items() if wanted <= set(v["scores"])}


def dense_verdicts(variants: Mapping) -> dict[str, Verdict] | None:
    """{task: Verdict} of the informative average (`sfsd.report.informative`), decided from the dense model
    alone: the variant of method "baseline" (plan "base" first), its scores {task: (x100 score, stderr)}
    and its rows' task rates {task: (majority, chance)}; None without a dense model."""
    dense = sorted((v for v in variants.values() if v["method"] == "baseline"), key=lambda v: v["plan"] != "base")
    if not dense:
        return None
    v = dense[0]
    return {t: task_verdict(t, score / 100.0, finite_number(se), *v["rates"].get(t, (None, None)))
            for t, (score, se) in v["scores"].items()}


def informative_mean(v: Mapping, kept: Sequence[str]) -> float | None:
    """One variant's mean score (x100) over the informative tasks `kept`; None when there is none (or the
    variant lacks one)."""
    if not kept or any(t not in v["scores"] for t in kept):
        return None
    return sum(v["scores"][t][0] for t in kept) / len(kept)


def informative_columns(v: Mapping, kept: Sequence[str], name: str) -> dict:
    """`name` (`informative_mean`, rounded) and `name`_ci95 (as `average_ci95`) of one variant."""
    mean = informative_mean(v, kept)
    if mean is None:
        return {name: None, f"{name}{CI95}": None}
    return {name: round(mean, 2), f"{name}{CI95}": average_ci95(v["scores"][t][1] for t in kept)}


CI95 = "_ci95"  # column suffix: half-width of the 95% interval of the column it follows (points x100)
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # column suffixes: a 95% interval's bounds (perplexity)


def finite_number(value) -> float | None:
    """A finite float, or None for missing / NaN (Parquet nulls may come back as either)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def ci95(stderr) -> float | None:
    """Half-width of the 95% normal interval of a rate with standard error `stderr`, in points (x100):
    1.96 x stderr x 100; None when the standard error is unknown."""
    se = finite_number(stderr)
    return None if se is None else round(Z95 * 100.0 * se, 2)


def average_ci95(stderrs: Iterable) -> float | None:
    """Half-width (points x100) of the 95% interval of an unweighted mean of n independent task rates:
    1.96 x sqrt(sum of stderr^2) / n x 100; None when any stderr is unknown (or there is none)."""
    ses = [finite_number(s) for s in stderrs]
    if not ses or any(s is None for s in ses):
        return None
    return round(Z95 * 100.0 * math.sqrt(sum(s * s for s in ses)) / len(ses), 2)


def ppl_protocols(rows: Iterable[Mapping]) -> dict[tuple[str, int | None], str]:
    """{(source, window): where BOS went in the windows (`ppl_bos`: every_window, first_window)} of the
    perplexity rows, for the caption. Perplexities of one source and window measured under two protocols
    are never put side by side: one DataError line naming a variant of each."""
    seen: dict[tuple[str, int | None], dict[str, str]] = defaultdict(dict)
    for r in rows:
        if r.get("metric") == "ppl":
            seen[(r["task"], r.get("window"))].setdefault(str(r.get("ppl_bos") or "unrecorded"), r.get("plan"))
    for (source, window), by_bos in seen.items():
        if len(by_bos) > 1:
            which = ", ".join(f"{plan} BOS {bos}" for bos, plan in sorted(by_bos.items()))
            raise DataError(f"{source} perplexities ({window}-token windows) were measured under different BOS "
                            f"protocols ({which}); evaluate every variant with the same evaluation.perplexity.bos")
    return {key: next(iter(by_bos)) for key, by_bos in seen.items()}


def ppl_caption(protocols: Mapping[tuple[str, int | None], str]) -> str:
    """How the perplexity windows were cut, for a caption ('; lambada 128-token windows: BOS + window-1 text
    tokens in every window'; empty without perplexity)."""
    what = {"every_window": "BOS + window-1 text tokens in every window",
            "first_window": "the text tokenized once, the tokenizer's BOS (if any) opening the first window only"}
    return "".join(f"; {source} {window}-token windows: {what.get(bos, 'BOS ' + bos)}"
                   for (source, window), bos in protocols.items())


def metric_column(metric: str, metrics: Mapping[str, str]) -> str:
    """The name a `metric` setting takes in a column: the one metric every task of `metrics` ({task:
    resolved metric}) resolves to (acc_norm for piqa and arc_easy under "paper"), else the setting itself
    (paper, for boolq beside piqa)."""
    common = set(metrics.values())
    return common.pop() if len(common) == 1 else metric


def metric_caption(metric: str, metrics: Mapping[str, str]) -> str:
    """What a `metric` setting means in a caption: "acc_norm", or for "paper" the per-task choice."""
    if metric != "paper":
        return metric
    listed = ", ".join(f"{t} {m}" for t, m in metrics.items())
    return f"accuracy, per task the metric lm-eval defines and the SFSD paper reports ({listed})"


def paper_table_rows(rows: list[dict], metric: str = "paper", split: str = "test") -> tuple[list[dict], dict]:
    """One row per evaluated model variant: parameters, MACs, the six task scores (x100), their average,
    and perplexity; plus notes (docs per task, limit, scorer, versions, the metric of each task) for the
    caption.

    metric: a setting of `sfsd.tasks.registry.METRIC_CHOICES`, resolved per task by `task_metric` ("paper": acc
    for boolq and winogrande, acc_norm for the others; ConfigError for e.g. acc_norm with boolq rows).
    Columns (the CSV's, machine-readable): `<task>_<metric>` (x100) and `<task>_<metric>_ci95` (1.96 x the
    row's stderr x 100; None when unknown), `average` and `average_ci95` (1.96 x sqrt(sum of the task
    stderr^2) / n_tasks x 100), `ppl_<source>_<window>` and, when the perplexity row carries them,
    `ppl_<source>_<window>_ci_low` / `_ci_high`. `write_table` merges each interval into its score's
    Markdown cell (`56.0 ± 6.9`, `40.1 [38.2, 42.3]`). Perplexities measured under different BOS protocols
    are refused (`ppl_protocols`); notes["ppl_bos"] names the one of each perplexity column.
    `informative_average` and its `_ci95`: the same over the tasks where the dense model's 95% interval lies
    above the task's majority-class rate and chance (`sfsd.report.informative`; None when it is above on no
    task, or there is no dense model); notes["informative"] names them and each excluded task's reason."""
    protocols = ppl_protocols(rows)
    by_variant: dict[tuple[str, str], dict] = {}
    notes: dict[str, set] = defaultdict(set)
    metrics: dict[str, str] = {}
    for r in rows:
        key = (r["method"], r["plan"])
        v = by_variant.setdefault(key, {"method": r["method"], "plan": r["plan"], "scores": {}, "ppl": None,
                                        "rates": {}, "notes": defaultdict(set)})
        v.update({k: r.get(k) for k in ("params_model", "params_model_fraction", "params_decoder_linear_fraction",
                                          "macs_per_token")})
        if r["metric"] == "ppl":
            v["ppl"] = (r["value"], r["task"], r.get("window"), finite_number(r.get("ci_low")),
                        finite_number(r.get("ci_high")))
            continue
        if r["split"] != split or r["task"] not in TASKS:
            continue
        if r["task"] not in metrics:
            metrics[r["task"]] = task_metric(r["task"], metric)
        if r["metric"] == metrics[r["task"]]:
            v["scores"][r["task"]] = (100.0 * r["value"], r.get("stderr"))
            v["rates"][r["task"]] = (finite_number(r.get("majority")), finite_number(r.get("chance")))
            v["notes"]["n"].add(f"{r['task']} {r['n']}")
            v["notes"]["scorer"].add(str(r.get("scorer")))
            v["notes"]["limit"].add(str(r.get("limit")))
            v["notes"]["lm_eval"].add(str(r.get("lm_eval_version")))
    if not by_variant:
        raise DataError("the results hold no rows; run the evaluation rules first")
    by_variant = complete_variants(by_variant)
    for v in by_variant.values():  # the caption speaks of the models in the table only
        for key, values in v["notes"].items():
            notes[key] |= values
    verdicts = dense_verdicts(by_variant)
    all_tasks = [t for t in TASKS if any(t in v["scores"] for v in by_variant.values())]
    kept = informative_tasks(verdicts or {}, all_tasks)
    table = []
    for (method, plan), v in sorted(by_variant.items(), key=lambda kv: (
            kv[0][0] != "baseline", -(kv[1]["params_model"] or 0), METHOD_ORDER.get(kv[0][0], 9), kv[0][1])):
        tasks = [t for t in TASKS if t in v["scores"]]
        cells: dict = {}
        for t in tasks:
            cells[f"{t}_{metrics[t]}"] = round(v["scores"][t][0], 2)
            cells[f"{t}_{metrics[t]}{CI95}"] = ci95(v["scores"][t][1])
        row = {
            "method": METHOD_LABEL.get(method, method), "plan": plan,
            "params_M": round((v["params_model"] or 0) / 1e6, 2),
            "params_%": round(100 * (v["params_model_fraction"] or 0), 1),
            "decoder_linear_%": round(100 * (v["params_decoder_linear_fraction"] or 0), 1),
            "MACs_per_token_M": round((v["macs_per_token"] or 0) / 1e6, 1),
            **cells,
            "average": round(sum(v["scores"][t][0] for t in tasks) / len(tasks), 2) if tasks else None,
            f"average{CI95}": average_ci95(v["scores"][t][1] for t in tasks) if tasks else None,
            **informative_columns(v, kept, "informative_average"),
        }
        if v["ppl"] is not None:
            value, source, window, low, high = v["ppl"]
            name = f"ppl_{source}_{window}"
            row[name] = round(value, 2)
            if low is not None and high is not None:
                row[f"{name}{CI_LOW}"], row[f"{name}{CI_HIGH}"] = round(low, 2), round(high, 2)
        table.append(row)
    out = {k: sorted(s) for k, s in notes.items()}
    out["metrics"] = {t: metrics[t] for t in TASKS if t in metrics}
    out["ppl_bos"] = protocols
    out["informative"] = informative_note(verdicts, all_tasks)
    return table, out


def paper_table(results: str | os.PathLike, metric: str, out_md: str | os.PathLike, out_csv: str | os.PathLike) -> None:
    """Write the SFSD paper's Table 1 analogue as Markdown (with its caption) and CSV; `metric` as in
    `paper_table_rows` ("paper": each task's lm-eval/paper metric, named in its column header)."""
    table, notes = paper_table_rows(pq.read_table(results).to_pylist(), metric)
    write_table(table, out_md, out_csv,
                caption=f"Zero-shot {metric_caption(metric, notes['metrics'])} (x100) on the test split, "
                "± the 95% interval (1.96 standard errors; the average's from the tasks' standard errors); "
                "average: the paper's, over every task; informative_average: over the tasks where the dense "
                "model scores above what a constant answer or chance gets (below); "
                f"perplexity with its 95% interval in brackets where known{ppl_caption(notes['ppl_bos'])}; "
                "params over the whole model "
                "(embeddings and lm_head included, as in the SFSD paper) and over decoder Linear layers (as in "
                "SVD-LLM); MACs per token of the Linear layers (lm_head included).",
                footer=f"Docs per task: {', '.join(notes.get('n', []))}. Limit per task: "
                f"{', '.join(notes.get('limit', []))}. Scorer: {', '.join(notes.get('scorer', []))} "
                f"(lm-eval {', '.join(notes.get('lm_eval', []))}). {notes['informative']}")


def _cell(value) -> str:
    return "" if value is None else str(value)


def markdown_header(column: str) -> str:
    """A CSV column's Markdown header: `<task>_<metric>` reads `<task> <metric>` (boolq acc, piqa
    acc_norm); anything else is kept."""
    for task in TASKS:
        if column.startswith(f"{task}_") and column[len(task) + 1:] in ACCURACY_METRICS:
            return f"{task} {column[len(task) + 1:]}"
    return column


def write_table(rows: list[dict], out_md: str | os.PathLike, out_csv: str | os.PathLike, caption: str,
                footer: str | None = None, cell=_cell, md_rows: list[dict] | None = None) -> None:
    """Write rows as CSV and as a Markdown table between a caption line and an optional footer, atomically.
    `md_rows` (default: rows) are the Markdown table's own rows where they differ from the CSV's (e.g. one
    `+2.1 [-0.4, 4.6]` cell for three numeric CSV columns; sfsd.report.compare).
    Columns: every key in first-seen order; `cell` formats a Markdown cell. The CSV keeps every column
    apart (numbers only); in the Markdown, a column `X_ci95` joins X's cell as `X ± ci95` (one decimal) and
    `X_ci_low` / `X_ci_high` as `X [low, high]` (a missing interval leaves X alone), and `<task>_<metric>`
    headers read `<task> <metric>` (`markdown_header`)."""
    if not rows:
        raise DataError(f"no rows for the table {out_md}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    if md_rows is not None:
        rows, columns = md_rows, list(dict.fromkeys(k for row in md_rows for k in row))
    merged = {c for c in columns for suffix in (CI95, CI_LOW, CI_HIGH)
              if c.endswith(suffix) and c[:-len(suffix)] in columns}
    shown = [c for c in columns if c not in merged]

    def md_cell(row: dict, c: str) -> str:
        text = cell(row.get(c))
        if row.get(c) is None:
            return text
        half = finite_number(row.get(c + CI95)) if c + CI95 in merged else None
        low = finite_number(row.get(c + CI_LOW)) if c + CI_LOW in merged else None
        high = finite_number(row.get(c + CI_HIGH)) if c + CI_HIGH in merged else None
        if half is not None:
            text += f" ± {half:.1f}"
        if low is not None and high is not None:
            text += f" [{cell(low)}, {cell(high)}]"
        return text

    lines = [caption, "", "| " + " | ".join(markdown_header(c) for c in shown) + " |",
             "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(md_cell(row, c) for c in shown) + " |" for row in rows]
    if footer:
        lines += ["", footer]
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------- methods at equal budgets

def methods_table_rows(rows: Sequence[Mapping], metric: str = "paper", split: str = "test",
                       notes: dict | None = None) -> list[dict]:
    """Methods x budgets from the combined results: one row per evaluated model (baseline first, then by
    budget from the largest and by method), with parameters, the average test metric over the tasks
    every model was scored on (`avg_<m>`, x100; m the one metric all those tasks resolve to, else the
    setting: `tables.metric_column`) and its 95% interval half-width (`avg_<m>_ci95`:
    1.96 x sqrt(sum of the task stderr^2) / n_tasks x 100; None when a stderr is unknown), its change from
    the baseline, and perplexity (with `ppl_ci_low` / `ppl_ci_high` where its row carries an interval).
    metric: a setting of `sfsd.tasks.registry.METRIC_CHOICES`, resolved per task by `task_metric` ("paper": acc for
    boolq and winogrande, acc_norm for the others). Perplexities measured under different BOS protocols are
    refused (`ppl_protocols`). `informative_avg_<m>` (with `_ci95`) and `informative_delta_vs_baseline`:
    the same over the tasks where the dense model's 95% interval lies above the task's majority-class rate
    and chance (`sfsd.report.informative`; None when there is none); `notes`, when given, receives
    "informative": the caption's sentence naming those tasks and each excluded one's reason."""
    ppl_protocols(rows)
    variants: dict[str, dict] = {}
    resolved: dict[str, str] = {}
    for r in rows:
        v = variants.setdefault(r["plan"], {"method": r["method"], "plan": r["plan"], "scores": {}, "ppl": None,
                                            "rates": {}, "params_model": r.get("params_model"),
                                            "fraction": r.get("params_model_fraction")})
        if r["metric"] == "ppl":
            v["ppl"] = (r["value"], finite_number(r.get("ci_low")), finite_number(r.get("ci_high")))
        elif r["split"] == split and r["task"] in TASKS:
            if r["task"] not in resolved:
                resolved[r["task"]] = task_metric(r["task"], metric)
            if r["metric"] == resolved[r["task"]]:
                v["scores"][r["task"]] = (100.0 * r["value"], r.get("stderr"))
                v["rates"][r["task"]] = (finite_number(r.get("majority")), finite_number(r.get("chance")))
    if not variants:
        raise DataError("the results hold no rows; run the evaluation rules first")
    variants = {plan: v for (_, plan), v in complete_variants(
        {(v["method"], plan): v for plan, v in variants.items()}).items()}
    common = set.intersection(*(set(v["scores"]) for v in variants.values()))
    if not common:
        raise DataError(f"no task was scored ({metric}, {split} split) for every model; rerun the evaluation")
    base = next((v for v in variants.values() if v["method"] == "baseline"), None)
    label = metric_column(metric, {t: resolved[t] for t in common})
    verdicts = dense_verdicts(variants)
    ordered = [t for t in TASKS if t in common]
    kept = informative_tasks(verdicts or {}, ordered)
    if notes is not None:
        notes["informative"] = informative_note(verdicts, ordered)

    def average(v):
        return sum(v["scores"][t][0] for t in common) / len(common)

    from sfsd.decompose.variants import parse_variant

    def budget(v):  # variants at a budget group by it (sfsd.decompose.variants); anything else is its own group
        return parse_variant(v["plan"]).budget or v["plan"]

    # budgets from the largest (by their models' largest fraction), methods in the usual order inside one
    group_size: dict[str, float] = defaultdict(float)
    for v in variants.values():
        group_size[budget(v)] = max(group_size[budget(v)], v["fraction"] or 0)
    out = []
    allocation_order = {"uniform": 0, "spectral": 1, "loss": 2, "searched": 3}
    for v in sorted(variants.values(), key=lambda v: (v["method"] != "baseline", -group_size[budget(v)], budget(v),
                                                       METHOD_ORDER.get(v["method"], 9),
                                                       allocation_order.get(parse_variant(v["plan"]).allocation, 4),
                                                       v["plan"])):
        avg = average(v)
        row = {
            "budget": "dense" if v["method"] == "baseline" else budget(v),
            "method": METHOD_LABEL.get(v["method"], v["method"]),
            "allocation": parse_variant(v["plan"]).allocation or "",
            "variant": v["plan"],
            "params_M": round((v["params_model"] or 0) / 1e6, 2),
            "params_%": round(100 * (v["fraction"] or 0), 1),
            f"avg_{label}": round(avg, 2),
            f"avg_{label}_ci95": average_ci95(v["scores"][t][1] for t in sorted(common)),
            "delta_vs_baseline": None if base is None else round(avg - average(base), 2),
            **informative_columns(v, kept, f"informative_avg_{label}"),
            "informative_delta_vs_baseline": None if base is None or not kept else round(
                informative_mean(v, kept) - informative_mean(base, kept), 2),
            "ppl": None if v["ppl"] is None else round(v["ppl"][0], 2),
        }
        if v["ppl"] is not None and v["ppl"][1] is not None and v["ppl"][2] is not None:
            row["ppl_ci_low"], row["ppl_ci_high"] = round(v["ppl"][1], 2), round(v["ppl"][2], 2)
        out.append(row)
    return out


def _methods_cell(value) -> str:
    """Markdown cell: blank for missing, 4 significant digits for huge values (a broken model's perplexity)."""
    if value is None:
        return ""
    if isinstance(value, float) and abs(value) >= 1e5:
        return f"{value:.4g}"
    return str(value)


def methods_table(results: str | os.PathLike, metric: str, out_md: str | os.PathLike,
                  out_csv: str | os.PathLike) -> list[dict]:
    """Write the methods-comparison table (Markdown with a caption line, and CSV); `metric` as in
    `methods_table_rows`. The Markdown shows the average as `50.0 ± 3.1` (95% interval) and perplexity
    with its interval in brackets where known; the CSV keeps them in separate columns."""
    rows = read_parquet_rows(results, "combined results")
    notes: dict = {}
    table = methods_table_rows(rows, metric, notes=notes)
    tasks = sorted({r["task"] for r in rows if r["task"] in TASKS and r["metric"] == task_metric(r["task"], metric)})
    ppl = sorted({f"{r['task']}, {r.get('window')}-token windows" for r in rows if r["metric"] == "ppl"})
    protocols = ppl_caption(ppl_protocols(rows)).removeprefix("; ")
    what = metric_caption(metric, {t: task_metric(t, metric) for t in tasks})
    write_table(table, out_md, out_csv, cell=_methods_cell,
                caption=f"Methods at equal parameter budgets: average zero-shot {what} (x100, test split) over "
                f"{', '.join(tasks)}, ± its 95% interval (1.96 x sqrt(sum of the task standard errors^2) / "
                f"n_tasks); change from the uncompressed model in points; the same over the informative tasks "
                f"(informative_avg); perplexity on {'; '.join(ppl) or 'none'}"
                f" (95% interval in brackets where known{'; ' + protocols if protocols else ''}). Parameters over "
                f"the whole model. {notes['informative']}")
    return table


def read_parquet_rows(path: str | os.PathLike, what: str) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}; run the stage that makes the {what} first")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:
        raise DataError(f"{path} is not a readable Parquet file ({err}); delete it and rerun its stage") from None
