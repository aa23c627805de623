"""The LASER study's report, from its results Parquet alone (`sfsd.laser.study.combine_study`): the sweep
figure and the table of the best point per task and intervention."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sfsd.errors import DataError
from sfsd.io import atomic_path
from sfsd.laser.study import INTERVENTIONS, LNAME_ORDER, _task_metric, format_rate, lnum_label


def _read(results: str | os.PathLike) -> list[dict]:
    from sfsd.evaluate.rows import read_rows

    rows = [r for r in read_rows(results).to_pylist() if r.get("laser_lname") is not None]
    if not rows:
        raise DataError(f"{results} holds no LASER rows; run the laser_results rule first")
    return rows


def sweep_figure(results: str | os.PathLike, metric: str, out_png: str | os.PathLike,
                 out_svg: str | os.PathLike) -> None:
    """Change of `metric` (points x100, search split) against the rate: one row of panels per task, one
    panel per layer type, one line per (layer number, intervention); the baseline (dont) is the zero line,
    the chosen point a star. `metric` (SELECT_METRICS) is resolved per task ("paper": that task's
    lm-eval/paper metric, named on its row's axis). PNG and SVG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    every = [r for r in _read(results) if r["split"] == "search"]
    resolved = {t: _task_metric(t, metric) for t in sorted({r["task"] for r in every})}
    rows = [r for r in every if r["metric"] == resolved[r["task"]]]
    if not rows:
        raise DataError(f"{results} has no search-split {metric} rows")
    tasks = sorted({r["task"] for r in rows})
    lnames = sorted({r["laser_lname"] for r in rows if r["laser_lname"] != "dont"},
                    key=lambda n: (LNAME_ORDER.index(n) if n in LNAME_ORDER else len(LNAME_ORDER), n))
    if not lnames:
        raise DataError(f"{results} holds only the baseline; add layer types to laser.lnames")
    lnums = sorted({int(r["laser_lnum"]) for r in rows if r["laser_lname"] != "dont"})
    interventions = [n for n in INTERVENTIONS if any(r["laser_intervention"] == n for r in rows)]
    cmap = plt.get_cmap("viridis")
    blocks = [n for n in lnums if n >= 0]
    color = {n: ("black" if n == -1 else cmap(0.85 * blocks.index(n) / max(1, len(blocks) - 1))) for n in lnums}
    styles = dict(zip(INTERVENTIONS, ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]))
    markers = dict(zip(INTERVENTIONS, ["o", "s", "^", "v", "D"]))
    fig, axes = plt.subplots(len(tasks), len(lnames), figsize=(3.6 * len(lnames) + 1.8, 3.0 * len(tasks) + 0.6),
                             squeeze=False, sharex=True, sharey="row")  # one y scale per task: panels compare
    rates = sorted({float(r["laser_rate"]) for r in rows if r["laser_lname"] != "dont"})
    for i, task in enumerate(tasks):
        base = [r["value"] for r in rows if r["task"] == task and r["laser_lname"] == "dont"]
        if not base:
            raise DataError(f"{results} lacks the baseline (dont) of {task}")
        for j, lname in enumerate(lnames):
            ax = axes[i][j]
            ax.axhline(0.0, color="grey", lw=1.2, zorder=1)
            for name in interventions:
                for lnum in lnums:
                    pts = sorted((r["laser_rate"], 100.0 * (r["value"] - base[0]), bool(r.get("laser_chosen")))
                                 for r in rows if r["task"] == task and r["laser_lname"] == lname
                                 and r["laser_intervention"] == name and int(r["laser_lnum"]) == lnum)
                    if not pts:
                        continue
                    xs, ys, star = zip(*pts)
                    ax.plot(xs, ys, linestyle=styles[name], marker=markers[name], ms=4, color=color[lnum], lw=1.4)
                    for x, y, s in pts:
                        if s:
                            ax.plot([x], [y], marker="*", ms=16, color="crimson", zorder=5, ls="none")
            ax.set_title(f"{task}: {lname}", fontsize=10)
            ax.set_xticks(rates, [format_rate(r) for r in rates], rotation=60 if len(rates) > 5 else 0)
            ax.margins(x=0.1, y=0.12)  # the chosen point's star stays inside the frame
            ax.grid(alpha=0.3)
            if i == len(tasks) - 1:
                ax.set_xlabel("rate (fraction of rank kept = 1 - 0.1 rate)")
            if j == 0:
                ax.set_ylabel(f"{resolved[task]} change vs baseline\n(points x100, validation split)")
    handles = [Line2D([], [], color="grey", lw=1.2, label="baseline (dont)")]
    handles += [Line2D([], [], color="dimgrey", linestyle=styles[n], marker=markers[n], label=n) for n in interventions]
    handles += [Line2D([], [], color=color[n], lw=3, label=f"layer {lnum_label(n)}") for n in lnums]
    handles += [Line2D([], [], color="crimson", marker="*", ms=12, ls="none", label="chosen")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    shown = sorted({resolved[t] for t in tasks})
    fig.suptitle(f"LASER sweep: {' / '.join(shown)} change per intervention"
                 + (" (each task's lm-eval metric)" if metric == "paper" else ""), fontsize=11)
    fig.tight_layout()
    for out, fmt in ((out_png, "png"), (out_svg, "svg")):
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    plt.close(fig)


def best_table_rows(rows: Sequence[Mapping], metric: str) -> tuple[list[dict], dict]:
    """One row per (task, intervention): its best point on the search split, the baseline's and its
    `metric` (x100) on the search and the test split and the changes; `chosen` marks the task's overall
    choice (which is the baseline when no intervention beat it). Plus notes (docs per split, limit, the
    metric of each task). `metric` (SELECT_METRICS) is resolved per task ("paper": that task's
    lm-eval/paper metric); the `metric` column names it, the score columns are `val_<m>` and `test_<m>`,
    m the one metric of every task in the table, else the setting (`tables.metric_column`: val_acc_norm
    for arc_easy under "paper", val_paper for boolq beside arc_easy)."""
    from sfsd.report.tables import CI95, ci95, metric_column

    values: dict[tuple[str, str, str], float] = {}
    stderrs: dict[tuple[str, str, str], float | None] = {}
    n_docs: dict[tuple[str, str], set] = defaultdict(set)
    points: dict[tuple[str, str], dict] = {}
    chosen: dict[str, str] = {}
    limits = set()
    resolved: dict[str, str] = {}
    for r in rows:
        if r["task"] not in resolved:
            resolved[r["task"]] = _task_metric(r["task"], metric)
        if r["metric"] != resolved[r["task"]]:
            continue
        values[(r["task"], r["plan"], r["split"])] = 100.0 * r["value"]
        stderrs[(r["task"], r["plan"], r["split"])] = r.get("stderr")
        n_docs[(r["task"], r["split"])].add(int(r["n"]))
        limits.add(r.get("limit"))
        if r.get("laser_chosen"):
            chosen[r["task"]] = r["plan"]
        if r.get("laser_best_of_intervention") or r.get("laser_chosen"):
            points[(r["task"], r["plan"])] = r
    table = []
    shown = sorted({t for t, _ in points} | set(chosen))
    label = metric_column(metric, {t: resolved[t] for t in shown if t in resolved})
    for task in shown:
        base_val, base_test = values.get((task, "dont", "search")), values.get((task, "dont", "test"))
        entries = sorted((r for (t, _), r in points.items() if t == task),
                         key=lambda r: (r["plan"] != "dont", list(INTERVENTIONS).index(r["laser_intervention"])
                                        if r["laser_intervention"] in INTERVENTIONS else -1))
        for r in entries:
            val, test = values.get((task, r["plan"], "search")), values.get((task, r["plan"], "test"))

            def delta(a, b):
                return None if a is None or b is None else round(a - b, 2)

            table.append({
                "task": task, "intervention": "none (baseline)" if r["plan"] == "dont" else r["laser_intervention"],
                "point": r["plan"], "lname": r["laser_lname"], "lnum": lnum_label(int(r["laser_lnum"])),
                "rate": format_rate(r["laser_rate"]), "k": r.get("laser_k") or "",
                "chosen": "yes" if chosen.get(task) == r["plan"] else "", "metric": resolved[task],
                f"val_{label}": None if val is None else round(val, 2),
                f"val_{label}{CI95}": ci95(stderrs.get((task, r["plan"], "search"))),
                "val_baseline": None if base_val is None else round(base_val, 2), "val_change": delta(val, base_val),
                f"test_{label}": None if test is None else round(test, 2),
                f"test_{label}{CI95}": ci95(stderrs.get((task, r["plan"], "test"))),
                "test_baseline": None if base_test is None else round(base_test, 2),
                "test_change": delta(test, base_test),
            })
    if not table:
        raise DataError("no chosen LASER points in the results; run the laser_results rule first")
    notes = {"docs": sorted(f"{t} {s} {'/'.join(str(n) for n in sorted(v))}" for (t, s), v in n_docs.items()),
             "limit": sorted(str(x) for x in limits),
             "metrics": {t: resolved[t] for t in sorted({row["task"] for row in table})}}
    return table, notes


def best_table(results: str | os.PathLike, metric: str, out_md: str | os.PathLike, out_csv: str | os.PathLike) -> None:
    """The best intervention per task (and per intervention kind) with its validation (search split) and
    test accuracy, as Markdown (with a caption) and CSV, from the study's results Parquet alone."""
    from sfsd.report.tables import metric_caption, write_table

    table, notes = best_table_rows(_read(results), metric)
    write_table(table, out_md, out_csv,
                caption=f"LASER study: the best point of each intervention on the validation (search) split by "
                f"{metric_caption(metric, notes['metrics'])}, and its score on the disjoint test split (x100, ± the "
                "95% interval of each score, 1.96 standard errors; changes against the unchanged model, "
                "`dont`). `chosen` marks the task's pick over all points, the baseline included.",
                footer=f"Docs per task and split: {', '.join(notes['docs'])}. Limit per split: "
                f"{', '.join(notes['limit'])}.")
