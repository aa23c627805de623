"""The allocations figure: test average and perplexity against parameters kept, one line per method and
allocation (uniform, spectral, searched at the budgets), from the methods table's rows (cached results
only: no model, no GPU)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sfsd.errors import DataError

ALLOCATION_STYLE = {"uniform": ("-", "o"), "spectral": ("--", "s"), "loss": ("-.", "D"), "searched": (":", "^")}
SEARCH_MARKERS = ("^", "v", "<", ">", "P", "X")  # one per search of a method, in name order


def allocation_lines(table: Sequence[Mapping]) -> dict[tuple[str, str, str], list[Mapping]]:
    """{(method label, allocation, search): rows sorted by parameters} of the methods-table rows at a
    budget (`tables.methods_table_rows`); the tolerance searches (no budget) and the baseline are left
    out (the baseline is drawn as a reference line)."""
    from sfsd.decompose.variants import parse_variant

    lines: dict[tuple[str, str, str], list[Mapping]] = defaultdict(list)
    for row in table:
        v = parse_variant(row.get("variant", ""))
        if v.kind in ("uniform", "spectral", "loss", "searched"):
            lines[(row["method"], v.allocation, v.search or "")].append(row)
    return {k: sorted(rows, key=lambda r: r["params_%"]) for k, rows in sorted(lines.items())}


def plot_allocations(table: Sequence[Mapping], out_png: str | os.PathLike, out_svg: str | os.PathLike, *,
                     title: str = "", dpi: int = 150) -> None:
    """Two panels: the average test metric (± its 95% interval) and perplexity (log scale) against the
    parameters kept; colour = method, line style = allocation (a marker per search), each line shifted a
    little along x so that intervals at one budget stay apart; the uncompressed model as a grey line."""
    from sfsd.report.plotting import METHOD_COLOR, _pyplot, save_figure
    from sfsd.report.tables import METHOD_LABEL

    lines = allocation_lines(table)
    if not lines:
        raise DataError("the methods table holds no model at a parameter budget; evaluate some budget variants first")
    avg_col = next(k for k in table[0] if k.startswith("avg_") and not k.endswith("_ci95"))
    base = next((r for r in table if r["budget"] == "dense"), None)
    colour = {label: METHOD_COLOR.get(key, "0.5") for key, label in METHOD_LABEL.items()}
    plt = _pyplot()
    fig, (ax_avg, ax_ppl) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    searches = sorted({search for _, _, search in lines if search})
    for i, ((method, allocation, search), rows) in enumerate(lines.items()):
        style, marker = ALLOCATION_STYLE[allocation]
        if search:
            marker = SEARCH_MARKERS[searches.index(search) % len(SEARCH_MARKERS)]
        label = f"{method}, {allocation}" + (f" ({search})" if search else "")
        # lines at one budget share x: a small offset per line keeps their intervals apart
        x = [r["params_%"] + 0.25 * (i - (len(lines) - 1) / 2) for r in rows]
        ax_avg.errorbar(x, [r[avg_col] for r in rows], yerr=[r.get(f"{avg_col}_ci95") or 0 for r in rows],
                        color=colour.get(method, "0.5"), linestyle=style, marker=marker, capsize=2, label=label)
        if all(r.get("ppl") for r in rows):
            ax_ppl.plot(x, [r["ppl"] for r in rows], color=colour.get(method, "0.5"), linestyle=style, marker=marker)
    if base is not None:
        ax_avg.axhline(base[avg_col], color="0.35", linewidth=0.8, label="uncompressed")
        if base.get("ppl"):
            ax_ppl.axhline(base["ppl"], color="0.35", linewidth=0.8)
    ax_avg.set_xlabel("parameters kept (%)")
    ax_avg.set_ylabel(f"test average ({avg_col[4:]}, x100)")
    ax_ppl.set_xlabel("parameters kept (%)")
    ax_ppl.set_ylabel("perplexity (log scale)")
    ax_ppl.set_yscale("log")
    handles, labels = ax_avg.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_png, out_svg, dpi)


__all__ = ["ALLOCATION_STYLE", "allocation_lines", "plot_allocations"]
