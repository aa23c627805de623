"""The LASER study (layer-selective rank reduction, with SVD or Vendi-score row selection): the sweep
grid, one point's evaluation and the choice on the search split (`study.py`), and its figure and table
(`report.py`).

Reads: the model, the tasks and splits. Writes: `results/<model>/laser/`, and its figure and table
under `results/figures/<model>/` and `results/tables/<model>/` (rules `laser_*`, rules/laser.smk).
"""
