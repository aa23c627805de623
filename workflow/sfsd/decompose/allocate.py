"""Spectral rank allocation: every layer's rank chosen from cached spectra, no forward pass.

Each factor method writes a Linear's rank-r approximation as a sum of r rank-one components,
W_r = sum_{i<=r} s_i f_i^T (s_i = column i of `second`, f_i = row i of `first`), with the s_i
mutually orthogonal (feature space: eigenvectors V; weight space and ASVD: left singular vectors U;
whitened: U Sigma^1/2). For inputs with moment matrix M the expected squared output error is then

    E||(W - W_r) x||^2 = E||W x||^2 - sum_{i<=r} g_i,   g_i = ||s_i||^2 f_i^T M f_i,

(cross terms vanish because s_i^T s_j = 0), so `captured_energy` gives every rank's error at once.
Feature space uses the input COVARIANCE (its "intended" bias puts the output mean back, so its error
is exactly the sum of the dropped eigenvalues, and g_i = lambda_i); the other methods keep the
layer's bias and use the uncentred second moment E[x x^T].

The allocation minimises the total NORMALISED error sum_l err_l(r_l) / E||W_l x||^2 (each layer's
fraction of output energy lost, so wide and narrow layers weigh alike) subject to the parameter
budget, greedily (`greedy_ranks`): every targeted layer starts at rank 1 and the step with the largest
normalised error saved per parameter is taken while it fits, on each layer's convex hull of error
against parameters (the last step, rank kappa - 1 -> dense, saves all that is left).

The loss allocation (`compression.allocations: loss`) runs the same greedy on each layer's predicted
increase of the LM loss at every rank (`sfsd.decompose.criteria`, `LayerSpectrum.from_curve`), NOT
normalised by the layer's energy: the loss is already comparable across layers.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from sfsd.decompose.methods import max_rank
from sfsd.decompose.plan import FACTOR_METHODS, _targets, count_params, layer_key, new_plan
from sfsd.errors import ConfigError
from sfsd.model.shapes import ModelShapes
from sfsd.model.spec import ArchSpec

Tensor = torch.Tensor


def captured_energy(first: Tensor, second: Tensor, moment: Tensor) -> Tensor:
    """g_i = ||second[:, i]||^2 first[i] M first[i]^T (float64): the output energy component i adds."""
    f = first.double()
    return second.double().square().sum(0) * ((f @ moment.double().to(f.device)) * f).sum(1)


def output_energy(weight: Tensor, moment: Tensor) -> float:
    """E||W x||^2 = tr(W M W^T) for inputs with moment matrix M (covariance or second moment)."""
    w = weight.double()
    return float(((w @ moment.double().to(w.device)) * w).sum())


@dataclass(frozen=True)
class LayerSpectrum:
    """One Linear's gains: gains[i] = what rank i+1 saves (length kappa - 1) out of `total`, the error at
    rank 0; `rest` = what the dense layer saves beyond rank kappa - 1. Energy spectra (`from_energy`) are
    normalised (total 1: fractions of the output energy); loss curves (`from_curve`) are not."""

    in_features: int
    out_features: int
    gains: tuple[float, ...]
    rest: float
    total: float = 1.0

    @classmethod
    def from_energy(cls, in_features: int, out_features: int, gains: Tensor, energy: float) -> LayerSpectrum:
        kappa = max_rank(in_features, out_features)
        g = gains.double()[: max(0, kappa - 1)]
        if g.numel() < kappa - 1:
            raise ConfigError(f"a {out_features}x{in_features} layer needs {kappa - 1} gains, got {g.numel()}")
        scale = energy if energy > 0 else 1.0
        g = (g / scale).clamp_min(0.0)
        return cls(in_features, out_features, tuple(float(x) for x in g), max(0.0, 1.0 - float(g.sum())))

    @classmethod
    def from_curve(cls, in_features: int, out_features: int, curve: Tensor) -> LayerSpectrum:
        """From a layer's error at ranks 0..kappa-1 (e.g. `criteria.loss_curve`), as it is: no
        normalisation, and a rank may save a negative amount (a method's next component need not lower
        the loss); the greedy's convex hull steps over such ranks."""
        kappa = max_rank(in_features, out_features)
        c = curve.double().clamp_min(0.0)
        if c.numel() < kappa:
            raise ConfigError(f"a {out_features}x{in_features} layer needs its error at {kappa} ranks, got {c.numel()}")
        gains = c[:-1] - c[1:]
        return cls(in_features, out_features, tuple(float(x) for x in gains[: kappa - 1]), float(c[kappa - 1]),
                   float(c[0]))

    def error(self, rank: int | None) -> float:
        """Error at `rank` (None = dense: 0): normalised for energy spectra, the loss for loss curves."""
        return 0.0 if rank is None else max(0.0, self.total - sum(self.gains[:rank]))


def _layer_params(in_features: int, out_features: int, rank: int | None, bias: tuple[int, int]) -> int:
    """Parameters of one layer at `rank` (None = dense), bias = (its size when factored, when dense)."""
    factored, dense = bias
    return in_features * out_features + dense if rank is None else rank * (in_features + out_features) + factored


def _hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """The lower convex hull of (cost, error, rank) points sorted by cost, from the first point: the
    steps a greedy can take whole with non-increasing error saved per parameter."""
    hull: list[tuple[int, float, int | None]] = []
    for p in points:
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def greedy_ranks(
    spectra: Mapping[str, LayerSpectrum],
    slack: int,
    bias_cost: Mapping[str, tuple[int, int]] | None = None,
    start: Mapping[str, int | None] | None = None,
    fill: bool = True,
) -> dict[str, int | None]:
    """Ranks (None = dense) from `start` (default rank 1 everywhere), spending at most `slack` extra
    parameters by normalised error saved per parameter. Each layer's error-vs-parameters curve is
    replaced by its lower convex hull (the dense step usually saves more per parameter than the last
    ranks before it), and the hull's segments are taken whole, best ratio first: the result is optimal
    for the parameters it spends (a Lagrangian argument). With `fill`, what a segment too large to fit
    leaves is then spent one rank step at a time, best ratio first. `bias_cost[key]` = (bias params when
    factored, when dense), default (0, 0). Ties go to the layer named first (deterministic)."""
    if slack < 0:
        raise ConfigError(f"the budget is below rank 1 on every layer ({-slack} parameters short)")
    bias_cost = bias_cost or {}
    ranks: dict[str, int | None] = {key: (start or {}).get(key, 1) for key in spectra}
    order = {key: i for i, key in enumerate(spectra)}

    def cost(key: str, rank: int | None) -> int:
        s = spectra[key]
        return _layer_params(s.in_features, s.out_features, rank, bias_cost.get(key, (0, 0)))

    def segments(key: str) -> list[tuple[int, float, int | None]]:
        s, r = spectra[key], ranks[key]
        if r is None:
            return []
        kappa = max_rank(s.in_features, s.out_features)
        points = [(cost(key, q), s.error(q), q) for q in range(r, kappa)] + [(cost(key, None), 0.0, None)]
        return _hull(points)[1:]

    def push(heap, key, nxt) -> None:
        c0, e0 = cost(key, ranks[key]), spectra[key].error(ranks[key])
        c, e, q = nxt
        heapq.heappush(heap, (-(e0 - e) / max(c - c0, 1), order[key], key, c - c0, q))

    def spend(next_step) -> None:
        """Take each layer's next step (next_step(key): (cost, error, rank) or None), best ratio first,
        while it fits; a layer whose step does not fit stops (its later steps save less per parameter)."""
        nonlocal slack
        heap: list = []
        for key in spectra:
            if (nxt := next_step(key)) is not None:
                push(heap, key, nxt)
        while heap:
            _, _, key, extra, rank = heapq.heappop(heap)
            if extra > slack:
                continue
            slack -= extra
            ranks[key] = rank
            if (nxt := next_step(key)) is not None:
                push(heap, key, nxt)

    pending = {key: segments(key) for key in spectra}

    def next_segment(key: str):  # the hull's next segment; the front one once taken is done
        if pending[key] and pending[key][0][2] == ranks[key]:
            pending[key].pop(0)
        return pending[key][0] if pending[key] else None

    def next_rank(key: str):  # single rank steps, below kappa - 1 only
        s, r = spectra[key], ranks[key]
        if r is None or r >= max_rank(s.in_features, s.out_features) - 1:
            return None
        return cost(key, r + 1), s.error(r + 1), r + 1

    spend(next_segment)
    if fill and slack > 0:  # single rank steps with what is left
        spend(next_rank)
    return ranks


def spectral_plan(
    spec: ArchSpec,
    shapes: ModelShapes,
    linears: Iterable[str],
    target_params_fraction: float,
    method: str,
    spectra: Mapping[str, LayerSpectrum],
    blocks: Iterable[int] | None = None,
    convention: str = "model",
    fixed: Mapping[str, Mapping] | None = None,
    bias_compensation: str = "intended",
    groups: str = "type",
    uniform: Mapping | None = None,
    criterion: str = "energy",
    **header,
) -> dict:
    """A plan of `method` whose parameter count is at most that of the uniform plan at
    target_params_fraction of the dense model's (`plan.budget_plan`; `convention` 'model' or
    'decoder_linear'), ranks allocated by `greedy_ranks` over the targeted
    layers (`linears` x `blocks`) minus those in `fixed` (plan entries kept as they are, e.g. the
    layers a search decided). `spectra[key]` is each free layer's `LayerSpectrum`.
    groups: "global" = one greedy over all free layers; "type" = each Linear type (q_proj, ..., down_proj)
    keeps the parameters the uniform plan (`plan.budget_plan`) gives it, minus its fixed layers', and the
    greedy moves rank across depth only (as SVD-LLM V2 allocates within a layer type), then what is left
    of the budget goes to the best steps of any layer; when fixed layers take more than a type's share,
    the allocation is global. `uniform`: that uniform plan when the caller has it already. `criterion`:
    what the spectra measure, "energy" (normalised output energy, builder "spectral") or "loss" (the
    predicted loss increase, `LayerSpectrum.from_curve`, builder "loss"); the plan's notes carry the sum.
    ConfigError when even rank 1 on every free layer exceeds the target."""
    if method not in FACTOR_METHODS:
        raise ConfigError(f"spectral allocation needs a factor method ({', '.join(FACTOR_METHODS)}), not {method!r}")
    if convention not in ("model", "decoder_linear"):
        raise ConfigError(f"convention {convention!r} is unknown; use 'model' or 'decoder_linear'")
    if criterion not in ("energy", "loss"):
        raise ConfigError(f"allocation criterion {criterion!r} is unknown; use 'energy' or 'loss'")
    fixed = {k: dict(v) for k, v in (fixed or {}).items()}
    free = [layer_key(b, n) for b, n in _targets(spec, shapes.n_blocks, linears, blocks)
            if layer_key(b, n) not in fixed]
    missing = [k for k in free if k not in spectra]
    if missing:
        raise ConfigError(f"no spectrum for layer(s) {missing[:3]}; rebuild the factor cache of {method}")
    start = {**fixed, **{k: {"method": method, "rank": 1} for k in free}}
    plan = new_plan(start, bias_compensation=bias_compensation, **header)
    counts = count_params(shapes, plan)[convention]
    if counts["compressed"] > target_params_fraction * counts["dense"]:
        raise ConfigError(f"target {target_params_fraction:.4f} of the {convention} parameters is unreachable: rank 1 on "
                          f"every free layer already keeps {counts['compressed'] / counts['dense']:.4f}")
    # the uniform plan's own count (at most the target, below it by less than a rank step per layer): the
    # allocations of one method then compare at equal size
    if uniform is None:
        from sfsd.decompose.plan import budget_plan

        uniform = budget_plan(spec, shapes, linears, target_params_fraction, method, blocks=blocks,
                              convention=convention, bias_compensation=bias_compensation)
    target = min(count_params(shapes, uniform)[convention]["compressed"], int(target_params_fraction * counts["dense"]))
    if counts["compressed"] > target:
        target = int(target_params_fraction * counts["dense"])  # fixed layers take more than the uniform plan's
    bias_cost = {key: _bias_of(shapes, key, method, bias_compensation) for key in free}
    if groups not in ("type", "global"):
        raise ConfigError(f"spectral groups {groups!r} is unknown; use 'type' or 'global'")
    slack = target - counts["compressed"]
    ranks: dict[str, int | None] = {k: 1 for k in free}
    if groups == "type":
        shares = _type_slack(shapes, uniform["layers"], method, fixed, free, bias_cost, bias_compensation)
        if shares is not None:
            for linear, share in shares.items():
                group = [k for k in free if k.split(".", 1)[1] == linear]
                ranks.update(greedy_ranks({k: spectra[k] for k in group}, share, bias_cost))
            slack -= sum(_cost(shapes, k, r, bias_cost[k]) - _cost(shapes, k, 1, bias_cost[k])
                         for k, r in ranks.items())
    ranks = greedy_ranks({k: spectra[k] for k in free}, slack, bias_cost, start=ranks)
    layers = {**fixed, **{k: ({"method": "dense"} if r is None else {"method": method, "rank": r})
                          for k, r in ranks.items()}}
    plan = new_plan(layers, bias_compensation=bias_compensation, **header)
    reached = count_params(shapes, plan)[convention]
    error = sum(spectra[k].error(r) for k, r in ranks.items())
    builder, error_key = {"energy": ("spectral", "normalised_error"), "loss": ("loss", "predicted_loss")}[criterion]
    plan["notes"] = {"builder": builder, "groups": groups, "convention": convention, "target_params_fraction": target_params_fraction,
                     "params_fraction": reached["fraction"], "fixed_layers": len(fixed), "free_layers": len(free),
                     error_key: error, **header.get("notes", {})}
    return plan


def _cost(shapes: ModelShapes, key: str, rank: int | None, bias: tuple[int, int]) -> int:
    """Parameters of the layer `key` at `rank` (None = dense), bias = `_bias_of` it."""
    out_f, in_f = shapes.linears[key.split(".", 1)[1]]
    return _layer_params(in_f, out_f, rank, bias)


def _type_slack(shapes, uniform_layers, method, fixed, free, bias_cost, bias_compensation) -> dict[str, int] | None:
    """Per Linear type, the parameters the uniform plan (its `layers`) gives its layers beyond rank 1 on
    the free ones and what the fixed ones take; None when some type has nothing left (then allocate
    globally)."""
    shares: dict[str, int] = {}
    for key, entry in uniform_layers.items():
        linear = key.split(".", 1)[1]
        own = _cost(shapes, key, entry.get("rank"), bias_cost.get(key) or _bias_of(shapes, key, method,
                                                                                   bias_compensation))
        if key in free:
            taken = _cost(shapes, key, 1, bias_cost[key])
        else:
            e = fixed[key]
            taken = _cost(shapes, key, e.get("rank") if e["method"] != "dense" else None,
                          _bias_of(shapes, key, e["method"], bias_compensation))
        shares[linear] = shares.get(linear, 0) + own - taken
    return shares if all(v >= 0 for v in shares.values()) else None


def _bias_of(shapes, key, method, bias_compensation) -> tuple[int, int]:
    """(bias parameters of the layer `key` when factored by `method`, when dense)."""
    linear = key.split(".", 1)[1]
    out_f, had = shapes.linears[linear][0], shapes.biases[linear]
    factored = had or (method == "feature" and bias_compensation == "intended")
    return (out_f if factored else 0, out_f if had else 0)


def layer_spectra(
    spec: ArchSpec,
    shapes: ModelShapes,
    keys: Iterable[str],
    read,
) -> dict[str, LayerSpectrum]:
    """{plan key: LayerSpectrum} of `keys`, `read(block, linear)` giving (gain, energy) of one layer
    (e.g. `factor_cache.factor_spectrum` of a factor-cache block file)."""
    from sfsd.decompose.plan import parse_layer_key

    out = {}
    for key in keys:
        block, linear = parse_layer_key(key, spec, shapes.n_blocks)
        gain, energy = read(block, linear)
        out_f, in_f = shapes.linears[linear]
        out[key] = LayerSpectrum.from_energy(in_f, out_f, gain, energy)
    return out


def curve_spectra(
    spec: ArchSpec,
    shapes: ModelShapes,
    keys: Iterable[str],
    read,
) -> dict[str, LayerSpectrum]:
    """{plan key: LayerSpectrum.from_curve} of `keys`, `read(block, linear)` giving one layer's error at
    ranks 0..kappa-1 (e.g. `<linear>.loss` of a loss-criterion block file, `criteria.save_loss_spectra`)."""
    from sfsd.decompose.plan import parse_layer_key

    out = {}
    for key in keys:
        block, linear = parse_layer_key(key, spec, shapes.n_blocks)
        out_f, in_f = shapes.linears[linear]
        out[key] = LayerSpectrum.from_curve(in_f, out_f, read(block, linear))
    return out


def shot_fractions(fraction: float, shots: int) -> list[float]:
    """The fractions of the parameters kept after each of `shots` allocations that reach `fraction` from the
    dense model (1.0) in equal steps: 1 - (1 - fraction) j / shots for j = 1..shots (the last is `fraction`)."""
    if shots < 1:
        raise ConfigError(f"compression.loss_shots must be >= 1, got {shots}")
    return [fraction if j == shots else 1 - (1 - fraction) * j / shots for j in range(1, shots + 1)]


__all__ = ["LayerSpectrum", "captured_energy", "curve_spectra", "greedy_ranks", "layer_spectra", "output_energy",
           "shot_fractions", "spectral_plan"]
