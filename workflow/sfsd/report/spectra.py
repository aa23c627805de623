"""The eigenvalue spectra: energy kept against rank per Linear layer, in feature space (the cached
eigenvalues of the output covariance) and weight space (singular values of W), and their figure.

`spectra_rows` reads the weights of a few Linear layers from the checkpoint on the CPU (no model is
loaded, no GPU); its output, spectra.parquet, is what `plot_spectra` reads.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sfsd.errors import DataError
from sfsd.io import atomic_path
from sfsd.model.registry import LINEAR_ORDER
from sfsd.report.plotting import _grid, _pyplot, save_figure

SPECTRA_COLUMNS = ("block", "linear", "space", "rank", "rank_fraction", "energy", "full_rank", "kappa")


def energy_curve(values, full_rank: int, points: int = 200) -> list[tuple[int, float]]:
    """(rank, fraction of the total energy in the top `rank` values) at up to `points` ranks from 1 to
    `full_rank`; `values` are eigenvalues or squared singular values (any order, clamped at 0)."""
    import torch

    v = torch.as_tensor(values, dtype=torch.float64).clamp_min(0).sort(descending=True).values
    if v.numel() == 0 or full_rank < 1:
        raise DataError("an empty spectrum has no energy curve")
    total = float(v.sum())
    cum = (v.cumsum(0) / total).tolist() if total > 0 else [1.0] * v.numel()
    ranks = sorted({max(1, min(full_rank, round(1 + (full_rank - 1) * i / max(1, points - 1)))) for i in range(points)})
    return [(r, min(1.0, cum[min(r, len(cum)) - 1])) for r in ranks]


def spectra_rows(eigen_paths: Sequence[str | os.PathLike], model_dir: str | os.PathLike,
                 points: int = 200) -> list[dict]:
    """Energy kept against rank for each Linear of the given eigen blocks, in feature space (eigenvalues of
    the output covariance, from stage 2) and weight space (squared singular values of W, read from the
    checkpoint on the CPU). Both are indexed by rank up to min(in, out), the largest rank either
    factorization can use; kappa (where the two factors cost as much as W) comes along for the figure."""
    import torch

    from sfsd.model.registry import get_arch
    from sfsd.io import checkpoint_index, load_tensors, read_parameters
    from sfsd.decompose.methods import max_rank

    rows: list[dict] = []
    index = checkpoint_index(model_dir)
    for path in eigen_paths:
        tensors, meta = load_tensors(path)
        block, spec = int(meta["block"]), get_arch(meta["architecture"])
        names = {lin: spec.param_name(block, lin, "weight") for lin in meta["linears"]}
        weights = read_parameters(model_dir, list(names.values()), index=index)
        for linear in meta["linears"]:
            w = weights[names[linear]]
            out_f, in_f = w.shape
            full = min(out_f, in_f)
            key = f"{linear}.eigenvalues"
            if key not in tensors:
                raise DataError(f"{path} lacks {key}; rerun the eigendecomposition of block {block}")
            sigma = torch.linalg.svdvals(w.float())  # float32 is ample for energy fractions
            for space, values in (("feature", tensors[key]), ("weight", sigma.double().square())):
                for rank, energy in energy_curve(values, full, points):
                    rows.append({"model": meta.get("model"), "block": block, "linear": linear, "space": space,
                                 "rank": rank, "rank_fraction": rank / full, "energy": energy,
                                 "full_rank": full, "kappa": max_rank(in_f, out_f),
                                 "in_features": in_f, "out_features": out_f})
    if not rows:
        raise DataError("no eigen blocks given for the spectra")
    return rows


def write_spectra(rows: Sequence[Mapping], out: str | os.PathLike) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)


def plot_spectra(rows: Sequence[Mapping], out_png: str | os.PathLike, out_svg: str | os.PathLike, *,
                 title: str = "", dpi: int = 150) -> None:
    """Energy kept against rank (% of full rank) per layer type, one colour per block; solid lines are the
    feature space (output covariance eigenvalues), dashed the weight space (singular values of W)."""
    missing = [c for c in SPECTRA_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"spectra rows lack column(s) {missing or list(SPECTRA_COLUMNS)}; rerun the spectra rule")
    curves: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    kappa_frac: dict[str, float] = {}
    for r in rows:
        curves[(r["linear"], int(r["block"]), r["space"])].append((100.0 * r["rank_fraction"], 100.0 * r["energy"]))
        kappa_frac[r["linear"]] = 100.0 * r["kappa"] / r["full_rank"]
    linears = [lin for lin in LINEAR_ORDER if lin in kappa_frac] + sorted(set(kappa_frac) - set(LINEAR_ORDER))
    blocks = sorted({b for _, b, _ in curves})
    plt = _pyplot()
    cmap = plt.get_cmap("plasma")
    colors = {b: cmap(0.85 * i / max(1, len(blocks) - 1)) for i, b in enumerate(blocks)}
    n_panels = len(linears) + 1  # the last cell holds the legend
    rows_, cols = _grid(n_panels)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.3 * cols, 2.9 * rows_), squeeze=False)
    for ax, linear in zip(axes.flat, linears):
        for b in blocks:
            for space, ls in (("feature", "-"), ("weight", "--")):
                pts = sorted(curves.get((linear, b, space), []))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[b], ls=ls, lw=1.4)
        ax.axvline(kappa_frac[linear], color="0.5", lw=0.8, ls=":")
        ax.set_title(linear)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 101)
        ax.set_xlabel("rank (% of min(in, out))")
        ax.set_ylabel("energy kept (%)")
        ax.grid(alpha=0.3)
    legend_ax = list(axes.flat)[len(linears)]
    legend_ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[b], lw=2, label=f"block {b}") for b in blocks]
    handles += [Line2D([], [], color="k", ls="-", label="feature space (eigenvalues of Cov[y])"),
                Line2D([], [], color="k", ls="--", label="weight space (singular values² of W)"),
                Line2D([], [], color="0.5", ls=":", label="break-even rank κ (factors cost as much as W)")]
    legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=8)
    for ax in list(axes.flat)[len(linears) + 1:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_png, out_svg, dpi)
