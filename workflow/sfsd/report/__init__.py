"""Stage 6, the report: the paper's Table 1 and the methods table (`tables.py`), the paired
comparisons (`compare.py`), figures of the search curves and layer budgets (`figures.py`), eigenvalue
spectra (`spectra.py`), allocations (`allocations.py`) and the shared plotting style
(`plotting.py`). Reads cached results only.

Writes: `results/tables/<model>/` and `results/figures/<model>/` (rules `paper_table`,
`comparisons_table` in rules/evaluate.smk; `spectra`, `figure_*`, `methods_table` in
rules/figures.smk; `speed_table` in rules/speed.smk).
"""
