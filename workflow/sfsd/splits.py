"""Seeded, disjoint partitions of a task's documents into calibration, search and test splits.

The same function serves calibration (which may only draw from the calibration part) and evaluation
(search and test parts), so calibration text can never leak into an evaluated split.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .errors import ConfigError

SPLITS = ("calibration", "search", "test")


def partition(
    n_docs: int, task: str, seed: int, calibration_fraction: float, search_fraction: float
) -> dict[str, list[int]]:
    """Split doc indices 0..n_docs-1 by a permutation seeded from (seed, task name).

    calibration: the first ceil(calibration_fraction * n) of the permutation; search: the first
    search_fraction of the remainder; test: the rest. Each list is sorted."""
    if not 0 <= calibration_fraction < 1:
        raise ConfigError(f"splits.calibration_fraction must be in [0, 1), got {calibration_fraction}")
    if not 0 < search_fraction < 1:
        raise ConfigError(f"splits.search_fraction must be in (0, 1), got {search_fraction}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    order = rng.permutation(n_docs)
    n_cal = math.ceil(calibration_fraction * n_docs)
    rest = order[n_cal:]
    n_search = round(search_fraction * len(rest))
    parts = {"calibration": order[:n_cal], "search": rest[:n_search], "test": rest[n_search:]}
    return {k: sorted(int(i) for i in v) for k, v in parts.items()}
