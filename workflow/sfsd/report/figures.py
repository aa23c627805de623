"""The search figures (metric against parameters kept, per-layer budgets), made from cached results alone
(Parquet/JSON/JSONL); nothing here loads a model or touches a GPU. The spectra figure is in
`sfsd.report.spectra`, the methods-comparison table in `sfsd.report.tables`, the shared plotting set-up in
`sfsd.report.plotting`.

Inputs, per model and search `{method}-{mode}-{target}` (the surgical search's outputs):

- `search/{search}/curve.parquet`: the test metric along the search (one row per evaluation point and
  task; layers_done 0 is the uncompressed model);
- `search/{search}/log.jsonl`: one object per finished layer with its final `layer_params_fraction`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sfsd.errors import DataError
from sfsd.model.registry import LINEAR_ORDER
from sfsd.report.plotting import METHOD_COLOR, _grid, _pyplot, save_figure
from sfsd.report.tables import METHOD_LABEL, METHOD_ORDER
from sfsd.tasks.registry import METRIC_CHOICES

MODES = ("accuracy", "loglik", "kl", "perplexity", "budget")  # sfsd.search.settings.MODES, and budget
MODE_TITLE = {"accuracy": "accuracy-driven", "loglik": "gold-log-likelihood-driven", "kl": "answer-KL-driven",
              "perplexity": "perplexity-driven", "budget": "budget-driven"}
CURVE_COLUMNS = ("method", "search", "mode", "target", "layers_done", "block", "params_model",
                 "params_model_fraction", "task", "split", "metric", "value", "n")
LOG_KEYS = ("step", "layer", "block", "linear", "in_features", "out_features", "rank", "layer_params_fraction",
            "params_model_fraction")
# in [0, 1], plotted as %; "paper" names an average of each task's own metric (sfsd.tasks.registry.task_metric)
RATE_METRICS = METRIC_CHOICES  # in [0, 1], plotted as %


# ----------------------------------------------------------------------------------------------- inputs

def parse_search_name(name: str) -> tuple[str, str, str]:
    """(method, mode, target) of a search name `{method}-{mode}-{target}`."""
    parts = str(name).split("-", 2)
    if len(parts) != 3 or parts[1] not in MODES or not parts[0] or not parts[2]:
        raise DataError(f"search name {name!r} is not <method>-<mode>-<target> with mode one of {', '.join(MODES)}")
    return parts[0], parts[1], parts[2]


def read_curve(path: str | os.PathLike) -> list[dict]:
    """Rows of one search's curve.parquet, checked for the columns the figures need."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}; run the search that makes it first")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a truncated or foreign file
        raise DataError(f"{path} is not a readable Parquet file ({err}); delete it and rerun its search") from None
    missing = [c for c in CURVE_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it is not a search curve (see sfsd/report/figures.py)")
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{path} holds no rows; rerun its search")
    return rows


def read_search_log(path: str | os.PathLike) -> list[dict]:
    """Entries of one search's log.jsonl (one JSON object per finished layer), checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path}; run the search that makes it first")
    entries = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {i} is not JSON ({err.msg}); delete the search's outputs and rerun it") from None
        missing = [k for k in LOG_KEYS if k not in entry] if isinstance(entry, dict) else list(LOG_KEYS)
        if missing:
            raise DataError(f"{path} line {i} lacks key(s) {missing}; it is not a search log (see sfsd/report/figures.py)")
        frac = entry["layer_params_fraction"]
        if not isinstance(frac, (int, float)) or not 0 <= frac <= 1.000001:
            raise DataError(f"{path} line {i}: layer_params_fraction {frac!r} is not in [0, 1]")
        entries.append(entry)
    if not entries:
        raise DataError(f"{path} holds no entries; rerun its search")
    return entries


# ------------------------------------------------------------------------------------------- plotting

def _is_rate(metric: str) -> bool:
    return metric in RATE_METRICS


# ------------------------------------------------------------------- Figures 1/2: metric vs parameters

def curve_panels(curves: Mapping[str, list[dict]], tasks: Sequence[str] = (), metric: str = "paper") -> list[dict]:
    """Panels of the search-curve figure, from curve rows per search name.

    A panel is one (task, metric): the configured `tasks` (in that order, those present), then `average`
    (the curve's own rows, or the mean of the tasks when every task was scored at that point), then any
    other task (perplexity sources). `metric` (`sfsd.tasks.registry.METRIC_CHOICES`) is resolved per task by
    `task_metric` ("paper": acc for boolq and winogrande, acc_norm for the others; ConfigError for a
    metric lm-eval does not define for a task); the average panel's metric is the tasks' common metric,
    or "paper" when they differ, and it carries `metrics` {task: metric averaged}. A panel shows the
    searches that targeted its task, or every search that scored it when none did. Each series has x = %
    of the model's parameters kept, y = the metric (x100 for accuracies), sorted along the search;
    `baseline` is the uncompressed model (layers_done 0)."""
    from sfsd.tasks.registry import TASKS, task_metric

    if not curves:
        raise DataError("no search curves given")
    by_search: dict[str, dict[tuple[str, str], dict[int, dict]]] = {}
    for name, rows in curves.items():
        parse_search_name(name)
        points: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
        for r in rows:
            if r.get("split", "test") != "test" or r["value"] is None or not math.isfinite(r["value"]):
                continue
            points[(r["task"], r["metric"])][int(r["layers_done"])] = r
        by_search[name] = points
    present = {key for pts in by_search.values() for key in pts}
    rate_tasks = [t for t in tasks if t != "average"]

    def pick_metric(task: str) -> str | None:
        metrics = {m for t, m in present if t == task}
        if task in TASKS:  # a benchmark: the metric the setting means for it, if it was scored
            wanted = task_metric(task, metric)
            return wanted if wanted in metrics else None
        for m in (metric, "acc_norm", "acc", "ppl"):
            if m in metrics:
                return m
        return sorted(metrics)[0] if metrics else None

    # the average panel: the curves' own "average" rows, else the mean over the configured tasks, each
    # task in its own metric
    task_metrics = {t: pick_metric(t) or (task_metric(t, metric) if t in TASKS else metric) for t in rate_tasks}
    common = set(task_metrics.values())
    avg_metric = pick_metric("average") or ((common.pop() if len(common) == 1 else metric) if rate_tasks else None)
    computed = False
    for name, pts in by_search.items():
        if ("average", avg_metric) in pts or not rate_tasks:
            continue
        per_task = [pts.get((t, task_metrics[t]), {}) for t in rate_tasks]
        steps = set.intersection(*(set(p) for p in per_task)) if all(per_task) else set()
        if steps:
            pts[("average", avg_metric)] = {
                s: {**per_task[0][s], "task": "average", "value": sum(p[s]["value"] for p in per_task) / len(per_task)}
                for s in steps}
            present.add(("average", avg_metric))
            computed = True

    order = [t for t in tasks if t != "average"] + ["average"]
    order += sorted({t for t, _ in present} - set(order))
    panels = []
    for task in order:
        m = avg_metric if task == "average" else pick_metric(task)
        if m is None or not any((task, m) in pts for pts in by_search.values()):
            continue
        scored = [n for n, pts in by_search.items() if (task, m) in pts]
        own = [n for n in scored if parse_search_name(n)[2] == task]
        series, baselines = [], []
        for name in sorted(own or scored, key=lambda n: (METHOD_ORDER.get(parse_search_name(n)[0], 9), n)):
            pts = by_search[name][(task, m)]
            steps = sorted(pts)
            method, mode, target = parse_search_name(name)
            scale = 100.0 if _is_rate(m) else 1.0
            series.append({"search": name, "method": method, "mode": mode, "target": target,
                           "x": [100.0 * pts[s]["params_model_fraction"] for s in steps],
                           "y": [scale * pts[s]["value"] for s in steps],
                           "n": pts[steps[0]].get("n")})
            if 0 in pts:
                baselines.append(scale * pts[0]["value"])
        panel = {"task": task, "metric": m, "series": series,
                 "baseline": sorted(baselines)[len(baselines) // 2] if baselines else None}
        if task == "average" and computed:
            panel["metrics"] = dict(task_metrics)
        panels.append(panel)
    if not panels:
        raise DataError("the search curves hold no test-split rows to plot")
    return panels


def uniform_points(results: Iterable[Mapping], panels: Sequence[dict]) -> dict[str, list[dict]]:
    """Uniform-budget models of the evaluation (Table 1) as points on the search-curve panels, only where
    they were scored on as many documents as the curve (else the two would not be comparable)."""
    from sfsd.decompose.variants import parse_variant

    rows = [r for r in results if r.get("split") == "test" and r.get("method") not in (None, "baseline")
            and parse_variant(str(r.get("plan"))).kind == "uniform"]
    out: dict[str, list[dict]] = {}
    for panel in panels:
        task, metric = panel["task"], panel["metric"]
        ns = {s["n"] for s in panel["series"]}
        by_plan: dict[str, dict] = {}
        per_task = panel.get("metrics", {})  # the average panel: each task in its own metric
        for r in rows:
            if r["metric"] != per_task.get(r["task"], metric) or r.get("value") is None:
                continue
            if task == "average" or r["task"] == task:
                by_plan.setdefault(r["plan"], {"method": r["method"], "plan": r["plan"],
                                               "x": 100.0 * r["params_model_fraction"], "values": {}, "ns": set()})
                by_plan[r["plan"]]["values"][r["task"]] = r["value"]
                by_plan[r["plan"]]["ns"].add(r.get("n"))
        points = []
        for p in by_plan.values():
            if task == "average":
                if p["ns"] != ns and len(ns) == 1:  # the average panel: every task at the curve's docs
                    continue
                value = sum(p["values"].values()) / len(p["values"])
            elif p["ns"] <= ns:
                value = p["values"][task]
            else:
                continue
            points.append({**p, "y": value * (100.0 if _is_rate(metric) else 1.0)})
        out[task] = sorted(points, key=lambda p: (METHOD_ORDER.get(p["method"], 9), p["plan"]))
    return out


def _metric_label(metric: str) -> str:
    return {"acc": "accuracy (%)", "acc_norm": "length-normalised accuracy (%)",
            "paper": "accuracy (%, acc or acc_norm per task as lm-eval defines)",
            "ppl": "perplexity (lower is better)"}.get(metric, metric)


def plot_search_curves(curves: Mapping[str, list[dict]], out_png: str | os.PathLike, out_svg: str | os.PathLike, *,
                       tasks: Sequence[str] = (), metric: str = "paper", results: Iterable[Mapping] | None = None,
                       title: str = "", dpi: int = 150) -> list[dict]:
    """Figures 1/2 of the SFSD paper: per task (and the average), the test metric against the parameters
    kept along each surgical search, one line per search, the uncompressed model as a horizontal line,
    and the uniform-budget models of Table 1 as points when scored on the same documents. `metric` is
    resolved per task as in `curve_panels` ("paper": each task's lm-eval/paper metric)."""
    panels = curve_panels(curves, tasks, metric)
    points = uniform_points(results, panels) if results is not None else {}
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    # colour = method, line style and marker = the search's target (so searches of one method on
    # different targets stay apart where they share a panel)
    targets = sorted({s["target"] for p in panels for s in p["series"]})
    styles = dict(zip(targets, [("-", "o"), ("--", "s"), ("-.", "^"), (":", "v"), ((0, (5, 1)), "D"),
                                ((0, (3, 1, 1, 1)), "P")] * (len(targets) // 6 + 1)))
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    handles: dict[str, object] = {}
    for ax, panel in zip(axes.flat, panels):
        for s in panel["series"]:
            label = f"{METHOD_LABEL.get(s['method'], s['method'])}, search on {s['target']}"
            ls, marker = styles[s["target"]]
            (line,) = ax.plot(s["x"], s["y"], color=METHOD_COLOR.get(s["method"], None), lw=1.5, ls=ls,
                              marker=marker, ms=2.5, label=label)
            handles.setdefault(label, line)
        for p in points.get(panel["task"], []):
            h = ax.scatter([p["x"]], [p["y"]], s=42, marker="D", facecolor="white", zorder=3, linewidths=1.5,
                           edgecolor=METHOD_COLOR.get(p["method"], "k"))
            handles.setdefault(f"{METHOD_LABEL.get(p['method'], p['method'])}, uniform ranks (Table 1)", h)
        if panel["baseline"] is not None:
            h = ax.axhline(panel["baseline"], color="0.35", ls=":", lw=1.2)
            handles.setdefault("uncompressed model", h)
        n = sorted({s["n"] for s in panel["series"] if s["n"]})
        count = "" if not n or panel["task"] == "average" else \
            f" ({'tokens' if panel['metric'] == 'ppl' else 'n'}={', '.join(map(str, n))})"
        if panel["metric"] == "ppl":
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 40, 60, 100 rather than 4x10^1
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(panel["task"] + count)
        ax.set_xlabel("parameters kept (% of the dense model)")
        ax.set_ylabel(_metric_label(panel["metric"]))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # below the panels; bbox_inches="tight" grows the canvas to hold it
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(3, len(handles)),
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    save_figure(fig, out_png, out_svg, dpi)
    return panels


# ---------------------------------------------------------------- Figure 3: per-layer parameter budgets

def layer_budget_matrix(entries: Sequence[Mapping], n_blocks: int | None = None,
                        linears: Sequence[str] | None = None) -> tuple[list[int], list[str], list[list[float]]]:
    """(blocks, linears, % of parameters kept per [block][linear]) after one search. Layers the search
    never reached are intact (100%); a layer logged twice keeps its last entry."""
    last = {}
    for e in entries:
        last[(int(e["block"]), e["linear"])] = 100.0 * float(e["layer_params_fraction"])
    n_blocks = n_blocks if n_blocks is not None else max(b for b, _ in last) + 1
    if linears is None:
        seen = {lin for _, lin in last}
        linears = [lin for lin in LINEAR_ORDER if lin in seen] + sorted(seen - set(LINEAR_ORDER))
    matrix = [[last.get((b, lin), 100.0) for lin in linears] for b in range(n_blocks)]
    return list(range(n_blocks)), list(linears), matrix


def plot_layer_budgets(logs: Mapping[str, Sequence[Mapping]], out_png: str | os.PathLike,
                       out_svg: str | os.PathLike, *, title: str = "", dpi: int = 150,
                       annotate: bool = True) -> dict[str, list[list[float]]]:
    """Figure 3 of the SFSD paper: the final parameter budget of every Linear layer (block x q,k,v,o,gate,up,
    down; 100% = intact) after each search, with their mean first when there are several."""
    if not logs:
        raise DataError("no search logs given")
    n_blocks = max(int(e["block"]) for entries in logs.values() for e in entries) + 1
    seen = {e["linear"] for entries in logs.values() for e in entries}
    linears = [lin for lin in LINEAR_ORDER if lin in seen] + sorted(seen - set(LINEAR_ORDER))
    matrices: dict[str, list[list[float]]] = {}
    finals: dict[str, float] = {}
    for name in sorted(logs):
        parse_search_name(name)
        _, _, matrices[name] = layer_budget_matrix(logs[name], n_blocks, linears)
        finals[name] = 100.0 * float(logs[name][-1]["params_model_fraction"])
    panels = []
    if len(matrices) > 1:
        mean = [[sum(m[b][j] for m in matrices.values()) / len(matrices) for j in range(len(linears))]
                for b in range(n_blocks)]
        panels.append((f"mean of {len(matrices)} searches", mean))
    panels += [(f"{parse_search_name(n)[2]}: model at {finals[n]:.1f}%", m) for n, m in matrices.items()]
    plt = _pyplot()
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    height = max(2.6, 0.2 * n_blocks + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(0.45 * len(linears) * cols + 1.8, height * rows), squeeze=False,
                             layout="constrained")
    short = [lin.removesuffix("_proj") for lin in linears]
    image = None
    for i, (ax, (label, matrix)) in enumerate(zip(axes.flat, panels)):
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(linears)), short, rotation=45, ha="right")
        step = max(1, math.ceil(n_blocks / 16))
        ax.set_yticks(range(0, n_blocks, step))
        if i % cols == 0:
            ax.set_ylabel("block")
        ax.set_xlabel("Linear layer")
        ax.set_title(label, fontsize=9)
        if annotate and n_blocks <= 40:
            for b in range(n_blocks):
                for j in range(len(linears)):
                    v = matrix[b][j]
                    ax.text(j, b, f"{v:.0f}", ha="center", va="center", fontsize=5.5,
                            color="black" if v > 60 else "white")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    cbar.set_label("parameters kept by the layer (% of dense)")
    if title:
        fig.suptitle(title)
    save_figure(fig, out_png, out_svg, dpi)
    return dict(panels)

