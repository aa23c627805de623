"""Plotting set-up shared by the figures (sfsd.report.figures, sfsd.report.spectra, sfsd.report.allocations).

Every writer saves PNG and SVG atomically; SVGs carry no date and a fixed id salt, so remaking a
figure from the same data gives the same file.
"""

from __future__ import annotations

import math
import os

from sfsd.io import atomic_path

# One colour per method in every figure, so a reader learns it once.
METHOD_COLOR = {"baseline": "0.35", "feature": "#1f77b4", "weight": "#ff7f0e", "whitened": "#2ca02c",
                "asvd": "#8c564b", "laser": "#d62728", "vendi": "#9467bd"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GPU
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "sfsd", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
                         "legend.fontsize": 8, "figure.dpi": 100})
    return plt


def save_figure(fig, out_png: str | os.PathLike, out_svg: str | os.PathLike, dpi: int = 150) -> None:
    """Write a figure as PNG and SVG, each atomically; closes it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        with atomic_path(out_svg) as tmp:
            fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    finally:
        plt.close(fig)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols
