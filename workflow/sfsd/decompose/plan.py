"""Rank plans: the single, JSON-serialisable description of a compressed model, and its accountant.

A plan names, for each Linear to change, the method and its rank (or LASER/Vendi rate):

    {"version": 1, "model": "smollm2", "model_digest": "0123abcd...", "architecture": "LlamaForCausalLM",
     "layers": {"3.q_proj": {"method": "feature", "rank": 96},
                "3.down_proj": {"method": "laser", "rate": 9.0},
                "4.up_proj": {"method": "vendi", "rate": 5.0, "use_quality": true},
                "5.o_proj": {"method": "dense"}},
     "options": {"bias_compensation": "intended", "jitter": 1e-06},
     "notes": {...free-form provenance...}}

Layer keys are "<block>.<linear>" with the registry's short names (`ArchSpec.linears`); a Linear the
plan does not name stays dense. Methods:

- feature / weight / whitened / asvd: the Linear becomes two thin ones at `rank` (see `sfsd.decompose.methods`);
  valid ranks are 1 .. kappa-1, kappa = `max_rank(in, out)`. A rank >= kappa would cost at least
  as much as W, so `validate_plan` NORMALISES it to {"method": "dense"} (logged, and recorded in the
  entry's "note"), up to the method's full rank (out for feature, min(in, out) for the others);
  above that the rank is an error.
- laser / vendi: the weight is replaced by a dense matrix of rank k = floor(min(in, out) * (1 - rate/10))
  (LASER's convention, `methods.laser_rank`); no parameter is saved. Vendi's k must be >= 1; its
  options: use_quality, min_diversity (bool), bandwidth (positive number or null), exact (bool).
- dense: unchanged (explicit, e.g. "the search kept this layer").

Parameter counts follow two conventions (see `count_params`): the whole model with embeddings and
lm_head (tied embeddings once), as SFSD reports, and the decoder's Linear layers only, as SVD-LLM does.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Iterable, Mapping


from sfsd.decompose.methods import laser_rank, max_rank
from sfsd.errors import ConfigError, DataError
from sfsd.model.registry import get_arch
from sfsd.model.shapes import ModelShapes, Shapes, model_shapes
from sfsd.model.spec import ArchSpec

log = logging.getLogger(__name__)

PLAN_VERSION = 1
FACTOR_METHODS = ("feature", "weight", "whitened", "asvd")  # replace the Linear by two thin ones
DENSE_METHODS = ("laser", "vendi")  # write a dense matrix back into the Linear
METHODS = (*FACTOR_METHODS, *DENSE_METHODS, "dense")
VENDI_OPTIONS = {"use_quality": False, "min_diversity": False, "bandwidth": None, "exact": False}
DEFAULT_OPTIONS = {"bias_compensation": "intended", "jitter": 1e-6}
_TOP_KEYS = {"version", "model", "model_digest", "architecture", "layers", "options", "notes"}
_ROUND_GUARD = 1e-9  # floor(x + guard): keep r/kappa * kappa from rounding down to r - 1

def layer_key(block: int, linear: str) -> str:
    """Plan key of one Linear, e.g. '3.q_proj'."""
    return f"{block}.{linear}"


def parse_layer_key(key: str, spec: ArchSpec, n_blocks: int) -> tuple[int, str]:
    """(block, linear) of a plan key; a ConfigError names what is wrong with it."""
    head, _, linear = str(key).partition(".")
    hint = (f"plan layer {key!r} is unknown: names look like '<block>.<linear>' with block 0..{n_blocks - 1} "
            f"and linear one of {', '.join(spec.linears)}")
    if not head.isdigit() or linear not in spec.linears or not 0 <= int(head) < n_blocks:
        raise ConfigError(hint)
    return int(head), linear


def _linear_shapes(shapes: Shapes | ModelShapes) -> Shapes:
    return shapes.linears if isinstance(shapes, ModelShapes) else shapes


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def full_rank(method: str, out_features: int, in_features: int) -> int:
    """The largest rank a factor method can express: out for feature space, min(in, out) otherwise."""
    return out_features if method == "feature" else min(out_features, in_features)


def _validate_options(options) -> dict:
    if options is None:
        return dict(DEFAULT_OPTIONS)
    if not isinstance(options, Mapping):
        raise ConfigError(f"plan 'options' must be a mapping, got {type(options).__name__}")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ConfigError(f"plan option(s) {sorted(unknown)} unknown; known: {', '.join(DEFAULT_OPTIONS)}")
    out = {**DEFAULT_OPTIONS, **options}
    if out["bias_compensation"] not in ("intended", "none"):
        raise ConfigError(f"plan option bias_compensation {out['bias_compensation']!r} is unknown; use 'intended' or 'none'")
    if not _is_number(out["jitter"]) or out["jitter"] <= 0:
        raise ConfigError(f"plan option jitter {out['jitter']!r} must be a positive number")
    return out


def _validate_entry(key: str, entry, linear: str, shape: tuple[int, int]) -> dict:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"plan layer {key!r}: entry must be a mapping like {{'method': 'feature', 'rank': 8}}")
    method = entry.get("method")
    if method not in METHODS:
        raise ConfigError(f"plan layer {key!r}: unknown method {method!r}; methods: {', '.join(METHODS)}")
    out_f, in_f = shape
    allowed = {"method", "note"} | (
        {"rank"} if method in FACTOR_METHODS else {"rate"} if method == "laser"
        else {"rate", *VENDI_OPTIONS} if method == "vendi" else set()
    )
    extra = set(entry) - allowed
    if extra:
        raise ConfigError(f"plan layer {key!r}: key(s) {sorted(extra)} do not apply to method {method!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    if method == "dense":
        return dict(entry)
    if method in FACTOR_METHODS:
        rank = entry.get("rank")
        kappa = max_rank(in_f, out_f)
        top = full_rank(method, out_f, in_f)
        if not _is_int(rank) or not 1 <= rank <= top:
            raise ConfigError(f"plan layer {key!r}: rank {rank!r} is out of range for {method} on a {out_f}x{in_f} "
                              f"layer; use 1..{kappa - 1} (ranks {kappa}..{top} keep it dense)")
        if rank >= kappa:
            note = f"rank {rank} >= kappa {kappa}: kept dense"
            log.info("plan layer %s: %s", key, note)
            return {"method": "dense", "note": note}
        return {"method": method, "rank": int(rank), **({"note": entry["note"]} if "note" in entry else {})}
    rate = entry.get("rate")
    k = laser_rank(min(out_f, in_f), rate)  # ConfigError when the rate is not a number in [0, 10]
    out = {"method": method, "rate": float(rate)}
    if method == "vendi":
        if k < 1:
            raise ConfigError(f"plan layer {key!r}: vendi rate {rate} keeps no row of {linear} (k = 0); use a rate < 10")
        for name, default in VENDI_OPTIONS.items():
            value = entry.get(name, default)
            if name == "bandwidth":
                if value is not None and (not _is_number(value) or value <= 0):
                    raise ConfigError(f"plan layer {key!r}: bandwidth {value!r} must be a positive number or null")
            elif not isinstance(value, bool):
                raise ConfigError(f"plan layer {key!r}: {name} must be true or false, got {value!r}")
            out[name] = value
    if "note" in entry:
        out["note"] = entry["note"]
    return out


def validate_plan(
    plan: Mapping,
    spec: ArchSpec,
    n_blocks: int,
    shapes: Shapes | ModelShapes,
    *,
    model_digest: str | None = None,
    architecture: str | None = None,
) -> dict:
    """Check a plan against a model and return its normalised copy (layers in forward order,
    options filled with defaults, factor ranks >= kappa turned into dense entries).

    ConfigError: unknown layer, method or key, a rank or rate out of range. DataError: the plan was
    made for another model (its model_digest or architecture differs from the ones given)."""
    if not isinstance(plan, Mapping) or not isinstance(plan.get("layers"), Mapping):
        raise ConfigError("a plan must be a mapping with a 'layers' mapping of '<block>.<linear>' entries")
    unknown = set(plan) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"plan key(s) {sorted(unknown)} unknown; known: {', '.join(sorted(_TOP_KEYS))}")
    if plan.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise ConfigError(f"plan version {plan.get('version')!r} is not supported (this code reads {PLAN_VERSION})")
    if model_digest is not None and plan.get("model_digest") not in (None, model_digest):
        raise DataError(f"plan was made for another model (model_digest {plan.get('model_digest')} != {model_digest}); "
                        "rebuild the plan for this model")
    if architecture is not None and plan.get("architecture") not in (None, architecture):
        raise DataError(f"plan was made for a {plan.get('architecture')}, not a {architecture}")
    lin = _linear_shapes(shapes)
    missing = [n for n in spec.linears if n not in lin]
    if missing:
        raise ConfigError(f"shapes lack Linear layer(s) {missing}")
    order = {name: i for i, name in enumerate(spec.linears)}
    parsed = []
    for key, entry in plan["layers"].items():
        block, linear = parse_layer_key(key, spec, n_blocks)
        parsed.append((block, order[linear], linear, key, entry))
    parsed.sort()
    layers = {}
    for block, _, linear, key, entry in parsed:
        canon = layer_key(block, linear)
        if canon in layers:
            raise ConfigError(f"plan names layer {canon} twice (as {key!r})")
        layers[canon] = _validate_entry(key, entry, linear, tuple(lin[linear]))
    out = {k: copy.deepcopy(v) for k, v in plan.items() if k not in ("layers", "options")}
    out["version"] = PLAN_VERSION
    out["layers"] = layers
    out["options"] = _validate_options(plan.get("options"))
    return out


def new_plan(
    layers: Mapping[str, Mapping],
    *,
    model: str | None = None,
    model_digest: str | None = None,
    architecture: str | None = None,
    bias_compensation: str = "intended",
    jitter: float = 1e-6,
    notes: Mapping | None = None,
) -> dict:
    """A plan dict with its header filled in (not validated: see `validate_plan`)."""
    plan = {"version": PLAN_VERSION, "model": model, "model_digest": model_digest, "architecture": architecture,
            "layers": {k: dict(v) for k, v in layers.items()},
            "options": {"bias_compensation": bias_compensation, "jitter": jitter}}
    if notes:
        plan["notes"] = dict(notes)
    return plan


def _targets(spec: ArchSpec, n_blocks: int, linears: Iterable[str], blocks: Iterable[int] | None) -> list[tuple[int, str]]:
    linears = list(linears)
    bad = [n for n in linears if n not in spec.linears]
    if bad or not linears:
        raise ConfigError(f"linear(s) {bad or '[]'} unknown; choose from {', '.join(spec.linears)}")
    chosen = list(range(n_blocks)) if blocks is None else sorted({int(b) for b in blocks})
    if any(not 0 <= b < n_blocks for b in chosen) or not chosen:
        raise ConfigError(f"blocks {chosen} out of range; the model has blocks 0..{n_blocks - 1}")
    return [(b, n) for b in chosen for n in spec.linears if n in linears]


def largest_fitting(fits, lo: int, hi: int) -> int:
    """The largest r in [lo, hi] with fits(r), for a `fits` that holds up to some rank and not above it
    (a parameter count rising with r under a limit); lo is returned when nothing above it fits, unchecked."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def ratio_rank(keep_ratio: float, kappa: int) -> int:
    """Rank at a keep ratio: floor(keep_ratio * kappa), at least 1 (kappa itself means dense)."""
    return max(1, math.floor(keep_ratio * kappa + _ROUND_GUARD))


def uniform_plan(
    spec: ArchSpec,
    n_blocks: int,
    linears: Iterable[str],
    shapes: Shapes | ModelShapes,
    keep_ratio: float,
    method: str = "feature",
    blocks: Iterable[int] | None = None,
    **header,
) -> dict:
    """The same reduction for every targeted layer, optionally on a subset of blocks.

    Factor methods: rank = floor(keep_ratio * kappa) (at least 1), a FRACTION OF KAPPA like the
    paper's candidate ranks, so keep_ratio is about the fraction of the layer's parameters kept
    (r (in + out) / (in out) = r / kappa); keep_ratio 1 keeps the layers dense.
    laser / vendi: rate = 10 (1 - keep_ratio), i.e. k = floor(keep_ratio * min(in, out)).
    `header` goes to `new_plan` (model, model_digest, architecture, bias_compensation, jitter, notes)."""
    if not _is_number(keep_ratio) or not 0 < keep_ratio <= 1:
        raise ConfigError(f"keep_ratio {keep_ratio!r} must be in (0, 1]")
    if method not in (*FACTOR_METHODS, *DENSE_METHODS):
        raise ConfigError(f"uniform_plan: unknown method {method!r}; use one of {', '.join(FACTOR_METHODS + DENSE_METHODS)}")
    lin = _linear_shapes(shapes)
    layers = {}
    for block, name in _targets(spec, n_blocks, linears, blocks):
        out_f, in_f = lin[name]
        if method in FACTOR_METHODS:
            kappa = max_rank(in_f, out_f)
            rank = ratio_rank(keep_ratio, kappa)
            layers[layer_key(block, name)] = {"method": "dense"} if rank >= kappa else {"method": method, "rank": rank}
        else:
            layers[layer_key(block, name)] = {"method": method, "rate": round(10.0 * (1.0 - keep_ratio), 12)}
    notes = {"builder": "uniform", "keep_ratio": keep_ratio, **header.pop("notes", {})}
    return new_plan(layers, notes=notes, **header)


def laser_plan(
    spec: ArchSpec,
    n_blocks: int,
    lnum: int,
    lname: str,
    rate: float,
    intervention: str = "laser",
    **options,
) -> dict:
    """One LASER intervention in LASER's own terms: layer number `lnum` (-1 = every block), layer type
    `lname` (fc_in, fc_up, fc_out, q_proj, k_proj, v_proj, out_proj, attn, mlp, all, dont; mapped through
    the architecture registry) and `rate` (rho = 1 - 0.1 rate). `intervention` 'vendi' keeps k rows
    picked by Vendi score instead of the top singular directions (`options`: use_quality,
    min_diversity, bandwidth, exact). 'dont' gives an empty plan: the unchanged model."""
    if lname not in spec.laser_types:
        raise ConfigError(f"unknown LASER layer type {lname!r}; choose one of {', '.join(spec.laser_types)}")
    if intervention not in DENSE_METHODS:
        raise ConfigError(f"intervention {intervention!r} is not one of {', '.join(DENSE_METHODS)}")
    if not _is_int(lnum) or not -1 <= lnum < n_blocks:
        raise ConfigError(f"LASER lnum {lnum!r} out of range: use -1 (all blocks) or 0..{n_blocks - 1}")
    blocks = range(n_blocks) if lnum == -1 else [lnum]
    entry = {"method": intervention, "rate": float(rate), **options}
    layers = {layer_key(b, name): dict(entry) for b in blocks for name in spec.laser_types[lname]}
    return new_plan(layers, notes={"builder": "laser", "lnum": lnum, "lname": lname, "rate": rate,
                                   "intervention": intervention})


def count_params(shapes, plan: Mapping) -> dict:
    """Exact parameter counts and per-token Linear multiply-accumulates of a plan's model.

    `shapes`: a ModelShapes, or anything `model_shapes` reads (dense model, config, model folder).

    Returns {"model": {...}, "decoder_linear": {...}, "macs_per_token": {...},
    "decoder_linear_macs_per_token": {...}}, each {"dense", "compressed", "fraction"}:
    - model: every parameter (embeddings, norms, lm_head; tied embeddings once), as SFSD counts;
    - decoder_linear: weights and biases of the decoder blocks' Linear layers only, as SVD-LLM counts;
    - macs: one per weight of every Linear per token (lm_head included in macs_per_token); a low-rank
      layer costs r (in + out); bias adds, norms and attention's score products are not counted.
    A factored layer carries a bias of size out when the original had one, or when it is a feature-
    space layer with bias_compensation 'intended'. laser/vendi/dense layers cost the dense amount."""
    if not isinstance(shapes, ModelShapes):
        shapes = model_shapes(shapes)
    spec = get_arch(shapes.architecture)
    norm = validate_plan(plan, spec, shapes.n_blocks, shapes)
    bias_comp = norm["options"]["bias_compensation"]
    delta_params = 0
    delta_macs = 0
    for key, entry in norm["layers"].items():
        if entry["method"] not in FACTOR_METHODS:
            continue
        _, linear = parse_layer_key(key, spec, shapes.n_blocks)
        out_f, in_f = shapes.linears[linear]
        had_bias = shapes.biases[linear]
        has_bias = had_bias or (entry["method"] == "feature" and bias_comp == "intended")
        low = entry["rank"] * (in_f + out_f)
        delta_params += low + (out_f if has_bias else 0) - (out_f * in_f + (out_f if had_bias else 0))
        delta_macs += low - out_f * in_f

    def pair(dense: int, delta: int) -> dict:
        return {"dense": dense, "compressed": dense + delta, "fraction": (dense + delta) / dense}

    dec_macs = shapes.n_blocks * sum(o * i for o, i in shapes.linears.values())
    head_macs = shapes.lm_head[0] * shapes.lm_head[1]
    return {
        "model": pair(shapes.total_params, delta_params),
        "decoder_linear": pair(shapes.decoder_linear_params(), delta_params),
        "macs_per_token": pair(dec_macs + head_macs, delta_macs),
        "decoder_linear_macs_per_token": pair(dec_macs, delta_macs),
    }


def budget_plan(
    spec: ArchSpec,
    shapes: ModelShapes,
    linears: Iterable[str],
    target_params_fraction: float,
    method: str = "feature",
    blocks: Iterable[int] | None = None,
    convention: str = "model",
    **header,
) -> dict:
    """The `uniform_plan` with the largest keep ratio whose parameter count is at most
    target_params_fraction of the dense count (`convention` 'model' = whole model, 'decoder_linear').

    The count is a step function of the ratio that changes only at r / kappa; the search bisects over
    those breakpoints, so the result lies below the target by less than one rank step (every targeted
    layer one rank higher). A target below rank 1 everywhere is a ConfigError; one at or above the
    dense count keeps every layer dense."""
    if method not in FACTOR_METHODS:
        raise ConfigError(f"budget_plan needs a factor method ({', '.join(FACTOR_METHODS)}); {method!r} saves no parameters")
    if convention not in ("model", "decoder_linear"):
        raise ConfigError(f"convention {convention!r} is unknown; use 'model' or 'decoder_linear'")
    if not _is_number(target_params_fraction) or target_params_fraction <= 0:
        raise ConfigError(f"target_params_fraction {target_params_fraction!r} must be a positive number")
    linears = list(linears)
    targets = _targets(spec, shapes.n_blocks, linears, blocks)
    kappas = sorted({max_rank(shapes.linears[n][1], shapes.linears[n][0]) for _, n in targets})
    ratios = sorted({r / k for k in kappas for r in range(1, k)} | {1.0})

    def count(ratio: float) -> tuple[int, dict]:
        p = uniform_plan(spec, shapes.n_blocks, linears, shapes, ratio, method, blocks, **header)
        return count_params(shapes, p)[convention]["compressed"], p

    dense = count_params(shapes, new_plan({}))[convention]["dense"]
    target = target_params_fraction * dense
    lowest, plan = count(ratios[0])
    if lowest > target:
        raise ConfigError(f"target {target_params_fraction:.4f} of the {convention} parameters is unreachable: rank 1 "
                          f"everywhere already keeps {lowest / dense:.4f}")
    lo, hi = 0, len(ratios) - 1  # invariant: count(ratios[lo]) <= target
    if count(ratios[hi])[0] <= target:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(ratios[mid])[0] <= target:
            lo = mid
        else:
            hi = mid
    reached, plan = count(ratios[lo])
    plan.setdefault("notes", {}).update({"builder": "budget", "convention": convention,
                                         "target_params_fraction": target_params_fraction,
                                         "params_fraction": reached / dense})
    return plan
