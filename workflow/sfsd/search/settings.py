"""The settings of the rank search (`sfsd.search.algorithm`): `SearchSettings`, the `search:` config section as one
frozen value that decides the plan (its digest keys the resumable state, `search_run.SearchState`), and
its choices (modes, strategies, candidate fractions); the default order inside a block is the
architecture registry's (`arch.SEARCH_ORDER`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sfsd.decompose.plan import FACTOR_METHODS
from sfsd.defaults import default
from sfsd.errors import ConfigError
from sfsd.model.registry import SEARCH_ORDER

FRACTIONS = tuple(default("search.fractions"))
MODES = ("accuracy", "loglik", "kl", "perplexity")
CHOICE_MODES = ("accuracy", "loglik", "kl")  # scored on the multiple-choice search split
STRATEGIES = ("bisect", "linear", "released")


@dataclass(frozen=True)
class SearchSettings:
    """What decides the plan (its digest keys the resumable state, `search_run.SearchState`); see the
    `search:` config section."""

    method: str  # one search of the config's methods x modes x targets
    mode: str
    target: str
    # the rest default to the config schema's defaults (sfsd.defaults; the schema's search.order is the
    # registry's order, a test keeps the two equal)
    metric: str = default("search.metric")  # METRIC_CHOICES: paper = each task's lm-eval/paper metric
    delta: float = default("search.delta")
    eps: float = default("search.eps")
    loglik_delta: float = default("search.loglik_delta")
    kl_max: float = default("search.kl_max")
    order: tuple[str, ...] = SEARCH_ORDER
    fractions: tuple[float, ...] = FRACTIONS
    first_block: int = default("search.first_block")
    last_block: int | None = default("search.last_block")
    strategy: str = default("search.strategy")
    stop_at: float | None = default("search.stop_at")
    convention: str = default("compression.convention")
    bias_compensation: str = default("compression.bias_compensation")
    checkpoints: tuple[float, ...] = tuple(default("search.checkpoints"))
    budgets: tuple[tuple[str, float], ...] = ()  # (label, fraction): plans landed exactly on each budget
    inputs: str = ""  # digest of the search data (docs, texts, model), set by the caller

    def check(self) -> None:
        if self.method not in FACTOR_METHODS:
            raise ConfigError(f"search.methods: {self.method!r} is not a factor method; use one of {', '.join(FACTOR_METHODS)}")
        if self.mode not in MODES:
            raise ConfigError(f"search.modes: {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        from sfsd.tasks.registry import METRIC_CHOICES

        if self.metric not in METRIC_CHOICES:
            raise ConfigError(f"search.metric {self.metric!r} is unknown; use one of {', '.join(METRIC_CHOICES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"search.strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if not 0 <= self.delta <= 1:
            raise ConfigError(f"search.delta {self.delta} must be in [0, 1] (an accuracy drop)")
        if not self.eps >= 0:
            raise ConfigError(f"search.eps {self.eps} must be >= 0")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"search.fractions {list(self.fractions)} must be in (0, 1]")
        if self.stop_at is not None and not 0 < self.stop_at < 1:
            raise ConfigError(f"search.stop_at {self.stop_at} must be in (0, 1) or null")
        if any(not 0 < c < 1 for c in self.checkpoints):
            raise ConfigError(f"search.checkpoints {list(self.checkpoints)} must be fractions in (0, 1)")
        if any(not 0 < f <= 1 for _, f in self.budgets):
            raise ConfigError(f"search budgets {list(self.budgets)} must be fractions in (0, 1]")
        if self.loglik_delta < 0 or self.kl_max < 0:
            raise ConfigError(f"search.loglik_delta {self.loglik_delta} and search.kl_max {self.kl_max} must be >= 0")

    def tolerance(self) -> float:
        """The tolerance of this mode's objective, in its own units."""
        return {"accuracy": self.delta, "loglik": self.loglik_delta, "kl": self.kl_max}.get(self.mode, self.eps)


__all__ = ["CHOICE_MODES", "FRACTIONS", "MODES", "STRATEGIES", "SearchSettings"]
