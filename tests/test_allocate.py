"""Spectral allocation (sfsd.decompose.allocate): the error identity behind it, the greedy, and the plans it makes."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from sfsd.decompose.allocate import LayerSpectrum, captured_energy, greedy_ranks, layer_spectra, output_energy, spectral_plan
from sfsd.decompose.compress import factors_for
from sfsd.decompose.factor_cache import factor_spectrum, layer_spectrum, save_factor_cache
from sfsd.decompose.methods import max_rank
from sfsd.decompose.plan import FACTOR_METHODS, budget_plan, count_params
from sfsd.errors import ConfigError
from sfsd.features.stats import eigh_descending, output_moments
from sfsd.model.registry import get_arch


SPEC = get_arch("LlamaForCausalLM")


def test_captured_energy_known_answer():
    """W = diag(3, 1), inputs with E[x1^2] = 1, E[x2^2] = 4: the SVD's components add 9 and 4, the total
    is 13, so rank 1 loses exactly E[(x2)^2] = 4."""
    weight = torch.diag(torch.tensor([3.0, 1.0]))
    moment = torch.diag(torch.tensor([1.0, 4.0]))
    factors = factors_for(weight, None, "weight", 2)[0]
    assert captured_energy(factors.first, factors.second, moment).tolist() == pytest.approx([9.0, 4.0])
    assert output_energy(weight, moment) == pytest.approx(13.0)


def _statistics(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, linear: str = "q_proj"):
    """The eigen and feature entries the cached files hold, from the samples x (n, in) themselves."""
    xd = x.double()
    xxt, xsum = xd.T @ xd, xd.sum(0)
    features = {"attn_in.xxt": xxt, "attn_in.xsum": xsum, "attn_in.xabs": xd.abs().sum(0),
                "attn_in.count": torch.tensor(x.shape[0])}
    mean = xsum / x.shape[0]
    mu, cov = output_moments(weight, bias, mean, xxt / x.shape[0] - torch.outer(mean, mean))
    eig = eigh_descending(cov)
    eigen = {f"{linear}.eigenvalues": eig.values, f"{linear}.eigenvectors": eig.vectors, f"{linear}.mean": mu}
    return eigen, features


@pytest.mark.parametrize("method,compensation", [(m, "intended") for m in FACTOR_METHODS] + [("feature", "none")])
def test_spectrum_gives_the_measured_error_at_every_rank(method, compensation):
    """E||y_r - y||^2 measured on the calibration samples equals energy - cumsum(gain) at every rank, for
    every factor method (feature space with its intended bias: the dropped variance; without compensation
    also the dropped part of the output mean, as `factor_spectrum` adds it)."""
    torch.manual_seed(0)
    n, d_in, d_out = 400, 12, 9
    x = torch.randn(n, d_in, dtype=torch.float64) * torch.logspace(-1, 1, d_in, dtype=torch.float64) + 0.3
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64)
    eigen, features = _statistics(x, weight, bias)
    top = max_rank(d_in, d_out) - 1
    full = factors_for(weight, bias, method, top, eigen=eigen, features=features, linear="q_proj", group="attn_in")[0]
    entry = {"first": full.first, "second": full.second}
    spectrum = layer_spectrum(weight, method, entry, eigen=eigen, features=features, linear="q_proj", group="attn_in")
    assert spectrum["gain"].shape == (top,)
    block = {f"q_proj.{k}": v for k, v in {**spectrum, **entry, "mean": eigen["q_proj.mean"]}.items()}
    if method != "feature":
        del block["q_proj.mean"]  # stored for feature space only
    gain, energy = factor_spectrum(block, "q_proj", compensation)
    y = x @ weight.T + bias
    for rank in range(1, top + 1):
        f = factors_for(weight, bias, method, rank, eigen=eigen, features=features, linear="q_proj",
                        group="attn_in", bias_compensation=compensation)[0]
        w_hat, b_hat = f.dense()
        y_hat = x @ w_hat.T + (b_hat if b_hat is not None else 0)
        measured = float((y_hat - y).square().sum(1).mean())
        predicted = energy - float(gain[:rank].sum())
        assert measured == pytest.approx(predicted, rel=1e-6, abs=1e-9 * energy), rank


def _brute_force(spectra, slack, costs):
    """The best ranks by exhaustive search (small cases only)."""
    keys = list(spectra)
    options = []
    for k in keys:
        s = spectra[k]
        kappa = max_rank(s.in_features, s.out_features)
        options.append(list(range(1, kappa)) + [None])
    best = None
    for combo in itertools.product(*options):
        spent = sum(costs(k, r) - costs(k, 1) for k, r in zip(keys, combo))
        if spent <= slack:
            err = sum(spectra[k].error(r) for k, r in zip(keys, combo))
            if best is None or err < best[0] - 1e-12:
                best = (err, dict(zip(keys, combo)))
    return best


def test_greedy_is_optimal_for_what_it_spends():
    """Three layers (one whose dense step saves more per parameter than its last rank): without the fill
    pass the greedy equals the exhaustive optimum at the parameters it spends, at every budget; the fill
    pass only lowers the error; neither spends more than it is given."""
    def spectrum(values, i, o):
        g = torch.tensor(values, dtype=torch.float64)
        return LayerSpectrum.from_energy(i, o, g, float(g.sum()) * 1.1)

    spectra = {"0.a": spectrum([5, 3, 2, 1], 10, 10), "0.b": spectrum([8, 1, 0.5, 0.25], 10, 10),
               "1.a": spectrum([4, 4, 3, 0.1], 10, 10)}

    def costs(k, r):
        return 100 if r is None else 20 * r

    def spent_and_error(ranks):
        return (sum(costs(k, r) - costs(k, 1) for k, r in ranks.items()),
                sum(spectra[k].error(r) for k, r in ranks.items()))

    for slack in range(0, 241, 7):
        hull_spent, hull_err = spent_and_error(greedy_ranks(spectra, slack, fill=False))
        spent, err = spent_and_error(greedy_ranks(spectra, slack))
        assert hull_spent <= spent <= slack and err <= hull_err + 1e-12
        best = _brute_force(spectra, hull_spent, costs)
        assert hull_err == pytest.approx(best[0], abs=1e-12), (slack, best)
    assert greedy_ranks(spectra, 240) == {"0.a": None, "0.b": None, "1.a": None}
    with pytest.raises(ConfigError, match="below rank 1"):
        greedy_ranks(spectra, -1)


@pytest.fixture(scope="module")
def cached(tiny_stats, tmp_path_factory):
    """A factor cache (with spectra) of every method for the tiny model, from the in-memory statistics of
    the `tiny_stats` fixture."""
    linears = list(SPEC.linears)
    root = tmp_path_factory.mktemp("factors")
    for method in FACTOR_METHODS:
        save_factor_cache(tiny_stats["model"], SPEC, method, linears, root / method, tiny_stats["eigen"], tiny_stats["features"],
                          model_digest=tiny_stats["digest"])
    return {"root": root, "shapes": tiny_stats["shapes"], "linears": linears, "dir": tiny_stats["dir"]}


def _spectra(cached, method, keys):
    from sfsd.features.collect import block_file
    from sfsd.decompose.compress import BlockFile
    from sfsd.decompose.factor_cache import factor_spectrum

    def read(block, linear):
        return factor_spectrum(BlockFile(cached["root"] / method / block_file(block), None), linear)

    return layer_spectra(SPEC, cached["shapes"], keys, read)


@pytest.mark.parametrize("method", FACTOR_METHODS)
@pytest.mark.parametrize("groups", ["type", "global"])
def test_spectral_plans_land_on_the_budget_of_the_uniform_plan(cached, method, groups):
    """At every budget the spectral plan keeps at most the target and lies within 0.5% of the uniform plan's
    fraction; its summed normalised error is no larger than the uniform plan's (the objective it minimises)."""
    shapes, linears = cached["shapes"], cached["linears"]
    keys = [f"{b}.{n}" for b in range(shapes.n_blocks) for n in linears]
    spectra = _spectra(cached, method, keys)
    for target in (0.9, 0.75):
        uniform = budget_plan(SPEC, shapes, linears, target, method)
        plan = spectral_plan(SPEC, shapes, linears, target, method, spectra, groups=groups)
        fraction = count_params(shapes, plan)["model"]["fraction"]
        assert fraction <= target
        assert abs(fraction - uniform["notes"]["params_fraction"]) < 0.005
        ranks = {k: e.get("rank") for k, e in plan["layers"].items()}
        uniform_ranks = {k: e.get("rank") for k, e in uniform["layers"].items()}
        error = sum(spectra[k].error(r) for k, r in ranks.items())
        assert error <= sum(spectra[k].error(r) for k, r in uniform_ranks.items()) + 1e-9
        assert plan["notes"]["normalised_error"] == pytest.approx(error)


def test_type_groups_keep_each_types_parameters(cached):
    """groups 'type' moves rank across depth only: each Linear type keeps the uniform plan's parameters up
    to what one rank step of that type costs, plus the leftover handed out at the end."""
    shapes, linears = cached["shapes"], cached["linears"]
    keys = [f"{b}.{n}" for b in range(shapes.n_blocks) for n in linears]
    plan = spectral_plan(SPEC, shapes, linears, 0.75, "weight", _spectra(cached, "weight", keys), groups="type")
    uniform = budget_plan(SPEC, shapes, linears, 0.75, "weight")
    slack = int(0.75 * count_params(shapes, uniform)["model"]["dense"]) - count_params(shapes, uniform)["model"][
        "compressed"]

    def params(p, linear):
        total = 0
        for k, e in p["layers"].items():
            if k.endswith(f".{linear}"):
                o, i = shapes.linears[linear]
                total += o * i if e["method"] == "dense" else e["rank"] * (o + i)
        return total

    for linear in linears:
        o, i = shapes.linears[linear]
        assert abs(params(plan, linear) - params(uniform, linear)) <= (o + i) + slack + o * i - max_rank(i, o) * (i + o)


def test_fixed_layers_are_kept_and_unreachable_budgets_fail(cached):
    shapes, linears = cached["shapes"], cached["linears"]
    free = [f"0.{n}" for n in linears]
    fixed = {f"1.{n}": {"method": "feature", "rank": 2} for n in linears}
    plan = spectral_plan(SPEC, shapes, linears, 0.8, "feature", _spectra(cached, "feature", free), fixed=fixed)
    assert all(plan["layers"][k] == v for k, v in fixed.items())
    assert count_params(shapes, plan)["model"]["fraction"] <= 0.8
    with pytest.raises(ConfigError, match="unreachable: rank 1 on every free layer already keeps"):
        spectral_plan(SPEC, shapes, linears, 0.01, "feature", _spectra(cached, "feature", free), fixed=fixed)
    with pytest.raises(ConfigError, match="no spectrum for layer"):
        spectral_plan(SPEC, shapes, linears, 0.8, "feature", {}, fixed=fixed)


@pytest.mark.slow  # several make-plan commands in subprocesses
def test_make_plan_cli_spectral_and_searched(cached, tmp_path):
    """make-plan --allocation spectral from a factor cache; --allocation searched takes a search's landed
    checkpoint as it is, and otherwise completes the search's plan spectrally to the budget."""
    base = [sys.executable, "-m", "sfsd", "make-plan", "--model-dir", str(cached["dir"]), "--model-name", "tiny",
            "--method", "feature", "--params-fraction", "0.8", "--first-block", "0", "--layers", ",".join(cached["linears"]),
            "--factors", str(cached["root"].parent / cached["root"].name)]
    # the factor cache root holds <method>/ folders
    out = tmp_path / "spectral.json"
    run = subprocess.run([*base, "--allocation", "spectral", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    plan = json.loads(out.read_text())
    assert plan["notes"]["builder"] == "spectral" and plan["notes"]["params_fraction"] <= 0.8
    search = tmp_path / "search"
    (search / "checkpoints").mkdir(parents=True)
    (search / "plan.json").write_text(json.dumps({"layers": {"1.down_proj": {"method": "feature", "rank": 1},
                                                             "1.up_proj": {"method": "dense"}}}))
    out = tmp_path / "searched.json"
    subprocess.run([*base, "--allocation", "searched", "--search", str(search), "--budget-label", "p80", "--out",
                    str(out)], check=True, capture_output=True)
    plan = json.loads(out.read_text())
    assert plan["layers"]["1.down_proj"] == {"method": "feature", "rank": 1}
    assert plan["layers"]["1.up_proj"] == {"method": "dense"}
    assert plan["notes"]["builder"] == "searched" and plan["notes"]["completed_layers"] == 2 * 7 - 2
    uniform = budget_plan(SPEC, cached["shapes"], cached["linears"], 0.8, "feature")["notes"]["params_fraction"]
    assert uniform - 0.005 <= plan["notes"]["params_fraction"] <= uniform
    landed = {"layers": {"1.down_proj": {"method": "feature", "rank": 3}}, "notes": {"builder": "search-budget"}}
    (search / "checkpoints" / "p80.json").write_text(json.dumps(landed))
    subprocess.run([*base, "--allocation", "searched", "--search", str(search), "--budget-label", "p80", "--out",
                    str(out)], check=True, capture_output=True)
    plan = json.loads(out.read_text())
    assert plan["layers"] == landed["layers"] and plan["notes"]["completed_layers"] == 0
    # a landed plan above the uniform plan's size is lowered to it at its crossing layer (never below the
    # rank the search accepted); a checkpoint that is not a budget plan is not taken for one
    uniform_size = count_params(cached["shapes"], budget_plan(SPEC, cached["shapes"], cached["linears"], 0.8,
                                                             "feature"))["model"]["compressed"]
    uniform = budget_plan(SPEC, cached["shapes"], cached["linears"], 0.8, "feature")
    accepted = uniform["layers"]["1.down_proj"]["rank"]
    o, i = cached["shapes"].linears["down_proj"]
    big = {"layers": {**uniform["layers"], "1.down_proj": {"method": "feature", "rank": max_rank(i, o) - 1}},
           "notes": {"builder": "search-budget", "crossing_layer": "1.down_proj", "accepted_rank": accepted}}
    assert count_params(cached["shapes"], big)["model"]["compressed"] > uniform_size
    (search / "checkpoints" / "p80.json").write_text(json.dumps(big))
    subprocess.run([*base, "--allocation", "searched", "--search", str(search), "--budget-label", "p80", "--out",
                    str(out)], check=True, capture_output=True)
    plan = json.loads(out.read_text())
    assert accepted <= plan["layers"]["1.down_proj"]["rank"] < max_rank(i, o) - 1
    assert count_params(cached["shapes"], plan)["model"]["compressed"] <= uniform_size
    (search / "checkpoints" / "p80.json").write_text(json.dumps({**landed, "notes": {"builder": "search-checkpoint"}}))
    subprocess.run([*base, "--allocation", "searched", "--search", str(search), "--budget-label", "p80", "--out",
                    str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text())["notes"]["completed_layers"] == 2 * 7 - 2
    # a search that decided every layer yet stayed above the budget keeps its leading decisions only
    everything = {f"{b}.{n}": {"method": "dense"} for b in (1, 0) for n in cached["linears"]}
    (search / "plan.json").write_text(json.dumps({"layers": everything}))
    (search / "log.jsonl").write_text("".join(json.dumps({"layer": k}) + "\n" for k in everything))
    (search / "checkpoints" / "p80.json").unlink()
    subprocess.run([*base, "--allocation", "searched", "--search", str(search), "--budget-label", "p80", "--out",
                    str(out)], check=True, capture_output=True)
    plan = json.loads(out.read_text())
    kept = [k for k in everything if plan["layers"][k] == {"method": "dense"}]
    assert kept == list(everything)[:len(kept)] and 0 < len(kept) < 14
    assert count_params(cached["shapes"], plan)["model"]["compressed"] <= uniform_size
    bad = subprocess.run([*base, "--allocation", "searched", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "needs --search" in bad.stderr
    assert math.isfinite(plan["notes"]["params_fraction"])


def test_cli_method_choices_are_the_factor_methods():
    from sfsd.cli.options import METHOD_CHOICES

    assert METHOD_CHOICES == FACTOR_METHODS


def test_shot_fractions_step_linearly_to_the_budget():
    """Shots reach the budget from the dense model in equal steps of the parameters removed; one shot is the
    budget itself."""
    from sfsd.decompose.allocate import shot_fractions

    assert shot_fractions(0.5, 1) == [0.5]
    assert shot_fractions(0.5, 2) == [0.75, 0.5]
    assert shot_fractions(0.4, 3) == pytest.approx([0.8, 0.6, 0.4]) and shot_fractions(0.4, 3)[-1] == 0.4
    with pytest.raises(ConfigError, match="loss_shots must be >= 1"):
        shot_fractions(0.5, 0)
