"""The loss criterion (sfsd.decompose.criteria): on a Linear followed by a quadratic loss with a known
Hessian, the predicted loss increase of every rank equals the measured one for every factor method; the
additive per-component form holds exactly where the theory says; the loss allocation's spectra and plans."""

from __future__ import annotations

import pytest
import torch

from sfsd.decompose.allocate import LayerSpectrum, curve_spectra, greedy_ranks, spectral_plan
from sfsd.decompose.compress import BlockFile, factors_for
from sfsd.decompose.criteria import additive_gains, kfac_loss_curve, loss_curve, method_quadratic, save_loss_spectra
from sfsd.decompose.factor_cache import factor_entry, full_rank_factors, save_factor_cache
from sfsd.decompose.methods import feature_space, max_rank
from sfsd.decompose.plan import FACTOR_METHODS, budget_plan, count_params
from sfsd.features.collect import block_file
from sfsd.features.gradients import collect_output_gradients
from sfsd.features.stats import eigh_descending, output_moments
from sfsd.model.registry import get_arch

SPEC = get_arch("LlamaForCausalLM")


def _symmetric_root(m: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.pow(power)) @ vectors.T


def quadratic_case(n=600, d_in=10, d_out=7, seed=0):
    """Inputs x (n, d_in), a Linear (W, b), a Hessian H (SPD, not diagonal) and targets t = y + e whose
    residuals e have mean 0, are orthogonal to every input column (sum_t e_t x_t^T = 0) and have second
    moment H^-1, all exactly on these n samples. For L(y) = 1/2 (y - t)^T H (y - t), g = H (y - t) = -H e,
    so G = E[g g^T] = H exactly, and the first-order term of any affine change of y sums to 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, d_in, dtype=torch.float64) + 0.4
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    bias = torch.randn(d_out, generator=gen, dtype=torch.float64)
    a = torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / d_out + 0.3 * torch.eye(d_out, dtype=torch.float64)
    z = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1))
    z = z - q @ (q.T @ z)
    e = z @ _symmetric_root(z.T @ z / n, -0.5) @ _symmetric_root(hessian, -0.5)
    y = x @ weight.T + bias
    return x, weight, bias, hessian, y + e


def statistics(x, weight, bias, linear="q_proj"):
    """The eigen and feature entries the cached files hold, from the samples themselves."""
    xxt, xsum = x.T @ x, x.sum(0)
    features = {"attn_in.xxt": xxt, "attn_in.xsum": xsum, "attn_in.xabs": x.abs().sum(0),
                "attn_in.count": torch.tensor(x.shape[0])}
    mean = xsum / x.shape[0]
    mu, cov = output_moments(weight, bias, mean, xxt / x.shape[0] - torch.outer(mean, mean))
    eig = eigh_descending(cov)
    return {f"{linear}.eigenvalues": eig.values, f"{linear}.eigenvectors": eig.vectors, f"{linear}.mean": mu}, features


def measured_increase(x, t, hessian, weight, bias, w_hat, b_hat) -> float:
    """Mean over the samples of L(y_hat) - L(y), L(y) = 1/2 (y - t)^T H (y - t)."""
    def loss(w, b):
        r = x @ w.T + (0 if b is None else b) - t
        return 0.5 * float(((r @ hessian) * r).sum(1).mean())

    return loss(w_hat, b_hat) - loss(weight, bias)


@pytest.mark.parametrize("method,compensation", [(m, "intended") for m in FACTOR_METHODS] + [("feature", "none")])
def test_criterion_equals_the_true_increase_of_a_quadratic_loss(method, compensation):
    """With full G the criterion of every rank equals the measured mean loss increase to round-off
    (rel 1e-8), for every factor method (feature space also without bias compensation): the first-order
    term vanishes by construction, the loss is exactly quadratic and G = H, so nothing is approximated."""
    x, weight, bias, hessian, t = quadratic_case()
    eigen, features = statistics(x, weight, bias)
    y = x @ weight.T + bias
    grad = (hessian @ (y - t).T).T
    g_moment = grad.T @ grad / x.shape[0]
    torch.testing.assert_close(g_moment, hessian, rtol=1e-9, atol=1e-12)
    entry = full_rank_factors(weight, bias, method, eigen=eigen, features=features, linear="q_proj", group="attn_in")
    curve = loss_curve(weight, bias, method, entry, features, "attn_in", g_moment, bias_compensation=compensation)
    top = max_rank(x.shape[1], weight.shape[0]) - 1
    assert curve.shape == (top + 1,)
    assert float(curve[0]) == pytest.approx(measured_increase(x, t, hessian, weight, bias, 0 * weight,
                                                              _rank0_bias(method, compensation, eigen, bias)), rel=1e-8)
    for rank in range(1, top + 1):
        f = factors_for(weight, bias, method, rank, eigen=eigen, features=features, linear="q_proj", group="attn_in",
                        bias_compensation=compensation)[0]
        w_hat, b_hat = f.dense()
        assert float(curve[rank]) == pytest.approx(measured_increase(x, t, hessian, weight, bias, w_hat, b_hat),
                                                   rel=1e-8, abs=1e-12), rank


def _rank0_bias(method, compensation, eigen, bias):
    """The bias of a rank-0 layer: feature space (intended) keeps the output mean, without compensation
    nothing; the other methods keep the layer's bias."""
    if method != "feature":
        return bias
    return eigen["q_proj.mean"] if compensation == "intended" else None


@pytest.mark.parametrize("method,exact", [("feature", True), ("whitened", True), ("weight", False), ("asvd", False)])
def test_additive_form_is_exact_only_where_the_components_are_uncorrelated(method, exact):
    """The per-component sum 1/2 (s_i^T G s_i)(f_i^T C f_i) equals the curve's decrements for feature space
    and whitened SVD (f_i^T C f_j = 0 for i != j) and differs from them for weight-space SVD and ASVD,
    whose cross terms the curve keeps."""
    x, weight, bias, hessian, _ = quadratic_case(seed=1)
    eigen, features = statistics(x, weight, bias)
    entry = full_rank_factors(weight, bias, method, eigen=eigen, features=features, linear="q_proj", group="attn_in")
    n = x.shape[0]
    w, f, s, c = method_quadratic(method, weight, bias, entry["first"], entry["second"], x.T @ x / n, x.mean(0))
    curve = kfac_loss_curve(w, f, s, c, hessian)
    additive = additive_gains(f, s, c, hessian)
    decrements = curve[:-1] - curve[1:]
    if exact:
        torch.testing.assert_close(additive, decrements, rtol=1e-7, atol=1e-10 * float(curve[0]))
    else:
        assert not torch.allclose(additive, decrements, rtol=1e-3)


def test_feature_space_closed_form_and_diagonal_g():
    """Feature space: loss(r) = 1/2 sum_{i>r} lambda_i u_i^T G u_i; with a diagonal G the (d,) vector and
    the matrix diag(G) give the same curve."""
    x, weight, bias, hessian, _ = quadratic_case(seed=2)
    eigen, features = statistics(x, weight, bias)
    entry = full_rank_factors(weight, bias, "feature", eigen=eigen, features=features, linear="q_proj", group="attn_in")
    lam, u = eigen["q_proj.eigenvalues"], eigen["q_proj.eigenvectors"]
    per = lam * ((u.T @ hessian) * u.T).sum(1)
    curve = loss_curve(weight, bias, "feature", entry, features, "attn_in", hessian)
    expected = 0.5 * torch.stack([per[r:].sum() for r in range(curve.numel())])
    torch.testing.assert_close(curve, expected, rtol=1e-9, atol=1e-12)
    diag = hessian.diagonal()
    torch.testing.assert_close(loss_curve(weight, bias, "feature", entry, features, "attn_in", diag),
                               loss_curve(weight, bias, "feature", entry, features, "attn_in", torch.diag(diag)))


def test_loss_spectrum_and_greedy_follow_the_loss():
    """from_curve keeps the curve as it is (error(r) = loss(r), dense 0, no normalisation); two layers of
    one shape whose curves differ by a factor 100 and one budget of 3 rank steps: the greedy gives every
    step to the layer whose loss they lower most, where a normalised criterion would see no difference."""
    curve = torch.tensor([16.0, 8.0, 4.0, 2.0, 0.5], dtype=torch.float64)  # a 10x10 layer: kappa 5
    small = LayerSpectrum.from_curve(10, 10, curve)
    big = LayerSpectrum.from_curve(10, 10, 100 * curve)
    assert [small.error(r) for r in range(5)] + [small.error(None)] == [16.0, 8.0, 4.0, 2.0, 0.5, 0.0]
    assert big.total == 1600.0 and small.rest == 0.5
    ranks = greedy_ranks({"0.q_proj": small, "1.q_proj": big}, slack=3 * 20, fill=False)
    assert ranks == {"0.q_proj": 1, "1.q_proj": 4}


def test_loss_completion_keeps_the_fixed_layers_and_follows_the_curves():
    """Three 10x10 q_proj layers (kappa 5; every other Linear dense), the top one fixed at rank 2 as a search
    decided it, the uniform plan given: rank 3 each at 0.95 of the decoder Linears' parameters (180 of
    the q_projs' 300), so the free layers share 140 - 40 at rank 1 = five rank steps of 20. Layer 0's loss
    curve is 100 times layer 1's: by the loss, four steps take layer 0 to dense (each saves more per
    parameter than any of layer 1's) and the fifth raises layer 1 to rank 2; the plan lands on the uniform
    plan's size and predicts what is left, layer 1's loss at rank 2 (4)."""
    from sfsd.model.shapes import ModelShapes

    names = list(SPEC.linears)
    shapes = ModelShapes("LlamaForCausalLM", 3, {n: (10, 10) for n in names}, {n: False for n in names},
                         3 * 7 * 100 + 500, (50, 10))
    curve = torch.tensor([16.0, 8.0, 4.0, 2.0, 0.5], dtype=torch.float64)
    spectra = {"0.q_proj": LayerSpectrum.from_curve(10, 10, 100 * curve),
               "1.q_proj": LayerSpectrum.from_curve(10, 10, curve)}
    fixed = {"2.q_proj": {"method": "weight", "rank": 2}}
    uniform = budget_plan(SPEC, shapes, ["q_proj"], 0.95, "weight", convention="decoder_linear")
    assert {e["rank"] for e in uniform["layers"].values()} == {3}
    for groups in ("type", "global"):
        plan = spectral_plan(SPEC, shapes, ["q_proj"], 0.95, "weight", spectra, convention="decoder_linear",
                             fixed=fixed, groups=groups, uniform=uniform, criterion="loss")
        assert plan["layers"] == {"0.q_proj": {"method": "dense"}, "1.q_proj": {"method": "weight", "rank": 2},
                                  "2.q_proj": {"method": "weight", "rank": 2}}, groups
        counts = count_params(shapes, plan)["decoder_linear"]
        assert counts["compressed"] == count_params(shapes, uniform)["decoder_linear"]["compressed"] == 1980
        assert plan["notes"]["predicted_loss"] == 4.0 and plan["notes"]["fixed_layers"] == 1


@pytest.fixture(scope="module")
def tiny_loss(tiny_stats, tmp_path_factory):
    """The tiny model's factor caches, gradients and loss spectra of every method."""
    model, tokens = tiny_stats["model"], tiny_stats["tokens"]
    linears = list(SPEC.linears)
    moments, _ = collect_output_gradients(model, SPEC, linears, tokens["input_ids"], tokens["attention_mask"],
                                          batch_size=4, full=True, progress=False)
    gradients = {b: {f"{n}.ggt": acc.second_moment() for n, acc in per.items()} for b, per in enumerate(moments)}
    root = tmp_path_factory.mktemp("loss")
    for method in FACTOR_METHODS:
        save_factor_cache(model, SPEC, method, linears, root / "factors" / method, tiny_stats["eigen"],
                          tiny_stats["features"], model_digest=tiny_stats["digest"])
        save_loss_spectra(model, SPEC, method, linears, root / "loss" / method,
                          lambda b, m=method: BlockFile(root / "factors" / m / block_file(b), tiny_stats["digest"]),
                          tiny_stats["features"], gradients, model_digest=tiny_stats["digest"])
    return {"root": root, "linears": linears, "gradients": gradients, **tiny_stats}


@pytest.mark.parametrize("method", FACTOR_METHODS)
def test_loss_plan_at_the_uniform_size(tiny_loss, method):
    """Each block file holds every Linear's curve (kappa values, starting at tr(G W C W^T)/2 > 0); the loss
    plan keeps at most the uniform plan's parameters, is named by its builder, and predicts no more loss
    than the uniform plan by its own criterion."""
    shapes, root, linears = tiny_loss["shapes"], tiny_loss["root"], tiny_loss["linears"]
    files = {b: BlockFile(root / "loss" / method / block_file(b), tiny_loss["digest"]) for b in range(shapes.n_blocks)}
    keys = [f"{b}.{n}" for b in range(shapes.n_blocks) for n in linears]
    spectra = curve_spectra(SPEC, shapes, keys, lambda b, n: files[b][f"{n}.loss"])
    for key, s in spectra.items():
        out_f, in_f = shapes.linears[key.split(".", 1)[1]]
        assert len(s.gains) == max_rank(in_f, out_f) - 1 and s.total > 0
    uniform = budget_plan(SPEC, shapes, linears, 0.8, method)
    plan = spectral_plan(SPEC, shapes, linears, 0.8, method, spectra, criterion="loss", groups="global")
    assert plan["notes"]["builder"] == "loss"
    assert count_params(shapes, plan)["model"]["compressed"] <= count_params(shapes, uniform)["model"]["compressed"]
    predicted = sum(spectra[k].error(e.get("rank")) for k, e in uniform["layers"].items())
    assert plan["notes"]["predicted_loss"] <= predicted + 1e-12
    entry = factor_entry(BlockFile(root / "factors" / method / block_file(0), tiny_loss["digest"]), "o_proj")
    assert entry["first"].shape[0] == len(spectra["0.o_proj"].gains)


def test_commands_make_a_loss_plan(tiny_llama, tmp_path):
    """The stage's commands on files: collect, gradients, factor-cache, loss-spectra, then make-plan
    --allocation loss writes a plan of the loss builder at the uniform plan's size (whitened SVD, which
    reads no eigendecomposition)."""
    from sfsd.cli.main import main as sfsd_main
    from sfsd.features.calibration import tokenize, tokens_digest
    from sfsd.io import read_json, save_tensors
    from sfsd.model.loading import load_tokenizer
    from sfsd.model.shapes import model_shapes
    from sfsd.provenance import tokenizer_digest

    from helpers import CORPUS

    tokens = tokenize(CORPUS[:12], load_tokenizer(tiny_llama), seq_len=32)
    path = tmp_path / "tokens.safetensors"
    save_tensors(path, tokens, {"digest": tokens_digest(tokens), "tokenizer_digest": tokenizer_digest(tiny_llama)})
    res, m = tmp_path / "tiny", str(tiny_llama)
    common = ["--model-dir", m, "--model-name", "tiny", "--tokens", str(path), "--layers", "proj", "--device", "cpu"]
    assert sfsd_main(["collect", *common, "--out", str(res / "features")]) in (0, None)
    assert sfsd_main(["gradients", *common, "--full", "true", "--out", str(res / "gradients")]) in (0, None)
    assert sfsd_main(["factor-cache", "--model-dir", m, "--results", str(res), "--method", "whitened", "--layers", "proj",
                      "--out", str(res / "factors" / "whitened")]) in (0, None)
    assert sfsd_main(["loss-spectra", "--model-dir", m, "--results", str(res), "--factors", str(res / "factors"),
                      "--method", "whitened", "--layers", "proj", "--out", str(res / "loss" / "whitened")]) in (0, None)
    plan_args = ["make-plan", "--model-dir", m, "--model-name", "tiny", "--method", "whitened", "--params-fraction", "0.8",
                 "--first-block", "0", "--layers", "proj"]
    assert sfsd_main([*plan_args, "--allocation", "loss", "--loss", str(res / "loss"), "--out", str(res / "loss.json")]) in (0, None)
    assert sfsd_main([*plan_args, "--out", str(res / "uniform.json")]) in (0, None)
    plan, uniform = read_json(res / "loss.json"), read_json(res / "uniform.json")
    assert plan["notes"]["builder"] == "loss" and plan["notes"]["predicted_loss"] > 0
    assert plan["notes"]["provenance"]["calibration_digest"] == tokens_digest(tokens)
    shapes = model_shapes(tiny_llama)
    assert count_params(shapes, plan)["model"]["compressed"] <= count_params(shapes, uniform)["model"]["compressed"]


def test_make_plan_completes_a_search_by_the_loss(tiny_loss, tmp_path, capsys):
    """make-plan --allocation searched --complete loss: the search's decisions as it took them and the other
    layers as the loss allocation places them around those (spectral_plan, criterion loss, the decisions
    fixed), at most the uniform plan's size; auto reads loss where --loss is given and spectral where it is
    not, and loss without --loss is one line naming the option."""
    import json

    from sfsd.cli.main import main as sfsd_main
    from sfsd.io import read_json

    shapes, root, linears, method = tiny_loss["shapes"], tiny_loss["root"], tiny_loss["linears"], "feature"
    search = tmp_path / "search"
    search.mkdir()
    decided = {"1.down_proj": {"method": method, "rank": 1}, "1.up_proj": {"method": "dense"}}
    (search / "plan.json").write_text(json.dumps({"layers": decided}))
    base = ["make-plan", "--model-dir", str(tiny_loss["dir"]), "--model-name", "tiny", "--method", method,
            "--params-fraction", "0.8", "--first-block", "0", "--layers", ",".join(linears), "--allocation", "searched",
            "--search", str(search), "--budget-label", "p80"]

    def make(*extra: str) -> dict:
        out = tmp_path / "plan.json"
        assert sfsd_main([*base, *extra, "--out", str(out)]) == 0
        return read_json(out)

    plan = make("--complete", "loss", "--loss", str(root / "loss"))
    files = {b: BlockFile(root / "loss" / method / block_file(b), tiny_loss["digest"]) for b in range(shapes.n_blocks)}
    free = [f"{b}.{n}" for b in range(shapes.n_blocks) for n in linears if f"{b}.{n}" not in decided]
    spectra = curve_spectra(SPEC, shapes, free, lambda b, n: files[b][f"{n}.loss"])
    uniform = budget_plan(SPEC, shapes, linears, 0.8, method)
    expected = spectral_plan(SPEC, shapes, linears, 0.8, method, spectra, fixed=decided, uniform=uniform,
                             criterion="loss")
    assert plan["layers"] == expected["layers"] and all(plan["layers"][k] == v for k, v in decided.items())
    notes = plan["notes"]
    assert (notes["builder"], notes["completion"], notes["completed_layers"]) == ("searched", "loss", len(free))
    assert notes["predicted_loss"] == pytest.approx(expected["notes"]["predicted_loss"])
    assert notes["provenance"]["settings"]["complete"] == "loss"
    assert count_params(shapes, plan)["model"]["compressed"] <= count_params(shapes, uniform)["model"]["compressed"]
    assert make("--loss", str(root / "loss"))["layers"] == plan["layers"]  # auto with --loss: the loss
    assert make("--factors", str(root / "factors"))["notes"]["completion"] == "spectral"  # auto without it
    assert sfsd_main([*base, "--complete", "loss", "--factors", str(root / "factors"), "--out", str(tmp_path / "x")]) == 2
    assert "make-plan --allocation searched --complete loss needs --loss" in capsys.readouterr().err


@pytest.mark.slow  # two Snakemake dry runs of the real workflow
def test_searched_plan_reads_the_loss_criterion_where_it_completes_by_it(tiny_llama, calibration_text_file, tmp_path):
    """A dry run of a search cut at a budget: with compression.allocations listing loss (search.complete
    auto), searched_plan waits for its method's loss spectra (and so the gradients) and passes them with
    --complete loss; without loss, it completes spectrally from the factor cache alone."""
    from helpers import base_config, deep_merge, new_run, planned_jobs, snakemake

    snakefile, workdir = new_run(tmp_path)
    target = "results/tiny/plans/search-feature-kl-average-b80.json"
    for allocations, complete in ((["uniform", "loss"], "loss"), (["uniform"], "spectral")):
        config = deep_merge(base_config(tiny_llama, calibration_text_file),
                            {"compression": {"methods": ["feature"], "allocations": allocations},
                             "search": {"enabled": True, "modes": ["kl"]}})
        proc = snakemake(snakefile, workdir, config, "--dry-run", "--printshellcmds", target)
        jobs = planned_jobs(proc)
        assert jobs["searched_plan"] == 1 and jobs["search"] == 1
        job = proc.stdout[proc.stdout.index("rule searched_plan:"):]
        inputs, command = job.splitlines()[1], job[job.index("make-plan"):].splitlines()[0]
        assert f"--complete {complete} " in command
        if complete == "loss":
            assert jobs["loss_spectra"] == 1 and jobs["collect_gradients"] == 1
            assert "results/tiny/loss/feature" in inputs and "--loss results/tiny/loss " in command
        else:
            assert not {"loss_spectra", "collect_gradients"} & set(jobs)
            assert "loss" not in inputs and "--loss" not in command


def test_loss_shots_chain_each_shot_to_the_gradients_of_the_last(tiny_llama, calibration_text_file, tmp_path):
    """A dry run with compression.loss_shots 3: shots 1 and 2 are each planned, compressed, passed backward and
    criterioned; shot 1 allocates by the dense model's loss criterion at 1 - 0.2/3 of the parameters, shot 2 by
    shot 1's, and the loss variant's plan (shot 3) by shot 2's, at the budget. Every gradient pass, the dense
    model's and each shot's, scores the labels gradients.labels names, drawn with its seed, and packs the
    texts as gradients.pack says."""
    from helpers import base_config, deep_merge, new_run, planned_jobs, snakemake

    snakefile, workdir = new_run(tmp_path)
    config = deep_merge(base_config(tiny_llama, calibration_text_file),
                        {"compression": {"methods": ["feature"], "allocations": ["uniform", "loss"], "loss_shots": 3},
                         "gradients": {"labels": "sampled", "seed": 5, "pack": True}})
    proc = snakemake(snakefile, workdir, config, "--dry-run", "--printshellcmds",
                     "results/tiny/plans/feature-loss-b80.json")
    jobs = planned_jobs(proc)
    assert {rule: jobs.get(rule) for rule in ("collect_gradients", "loss_spectra", "loss_shot_plan", "loss_shot_model",
                                              "loss_shot_gradients", "loss_shot_spectra", "loss_plan")} == {
        "collect_gradients": 1, "loss_spectra": 1, "loss_shot_plan": 2, "loss_shot_model": 2,
        "loss_shot_gradients": 2, "loss_shot_spectra": 2, "loss_plan": 1}
    shots = "results/tiny/loss_shots/feature-b80"
    steps = proc.stdout.split("\n\n")

    def job(rule: str, output: str) -> str:
        return next(j for j in steps if f"rule {rule}:" in j and f"output: {output}" in j)

    final = job("loss_plan", "results/tiny/plans/feature-loss-b80.json")
    assert f"input: {shots}/2/loss/feature, " in final and "--params-fraction 0.8 " in final
    for shot, loss, fraction in ((1, "results/tiny/loss/feature", 1 - 0.2 / 3), (2, f"{shots}/1/loss/feature", 1 - 0.4 / 3)):
        plan = job("loss_shot_plan", f"{shots}/{shot}/plan.json")
        assert f"input: {loss}, " in plan and f"--params-fraction {fraction} " in plan, plan
    assert f"input: {shots}/2/plan.json" in job("loss_shot_model", f"{shots}/2/model")
    assert f"--compressed {shots}/2/model " in job("loss_shot_gradients", f"{shots}/2/gradients")
    assert f"--gradients {shots}/2/gradients " in job("loss_shot_spectra", f"{shots}/2/loss/feature")
    for passes in (job("collect_gradients", "results/tiny/gradients"), job("loss_shot_gradients", f"{shots}/1/gradients")):
        assert "--labels sampled --seed 5 --pack --out " in passes, passes


@pytest.mark.slow
def test_loss_shots_run_on_the_gradients_of_each_shots_model(tiny_llama, calibration_text_file, tmp_path):
    """The loss allocation in two shots, run: shot 1 lands on 0.9 of the parameters, its model's gradients
    carry its plan's digest and weigh the criterion the budget's plan is allocated by; the shot's model is
    removed once its gradients are written."""
    from helpers import base_config, deep_merge, new_run, snakemake
    from sfsd.io import load_tensors, read_json
    from sfsd.provenance import value_digest

    snakefile, workdir = new_run(tmp_path)
    config = deep_merge(base_config(tiny_llama, calibration_text_file),
                        {"compression": {"methods": ["feature"], "allocations": ["uniform", "loss"], "loss_shots": 2}})
    snakemake(snakefile, workdir, config, "results/tiny/plans/feature-loss-b80.json")
    shot = workdir / "results/tiny/loss_shots/feature-b80/1"
    first, final = read_json(shot / "plan.json"), read_json(workdir / "results/tiny/plans/feature-loss-b80.json")
    assert first["notes"]["target_params_fraction"] == pytest.approx(0.9)
    assert final["notes"]["target_params_fraction"] == 0.8 and final["notes"]["builder"] == "loss"
    assert not (shot / "model").exists()
    _, grads = load_tensors(shot / "gradients" / "block_001.safetensors")
    assert grads["settings"]["compressed_plan"] == value_digest(first["layers"])
    _, loss = load_tensors(shot / "loss" / "feature" / "block_001.safetensors")
    assert loss["gradients_of_plan"] == value_digest(first["layers"]) and loss["gradients_labels"] == "data"
    _, dense = load_tensors(workdir / "results/tiny/loss/feature/block_001.safetensors")
    assert dense["gradients_of_plan"] is None


def test_fisher_order_keeps_the_costliest_directions():
    """Directions ranked by lambda_i u_i^T G u_i: keeping the top r of them, the measured increase of a
    quadratic loss whose Hessian G weighs the low-variance output directions most is 1/2 the sum of the
    dropped scores, never above the eigenvalue order's at any rank, and below it somewhere."""
    from sfsd.decompose.criteria import fisher_order

    x, weight, bias, _, _ = quadratic_case(seed=3)
    eigen, _ = statistics(x, weight, bias)
    lam, u, mu = eigen["q_proj.eigenvalues"], eigen["q_proj.eigenvectors"], eigen["q_proj.mean"]
    hessian = (u * lam.clamp_min(1e-6).pow(-0.75)) @ u.T  # scores lambda^0.25: near-flat, order kept
    hessian = hessian + (u[:, -2:] @ u[:, -2:].T) * 50 * float(hessian.diagonal().max())  # two weak directions matter
    n = x.shape[0]
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(n, weight.shape[0], generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1))
    z = z - q @ (q.T @ z)
    t = x @ weight.T + bias + z @ _symmetric_root(z.T @ z / n, -0.5) @ _symmetric_root(hessian, -0.5)
    order, scores = fisher_order(lam, u, hessian)
    assert torch.all(scores[order][:-1] >= scores[order][1:]) and order.tolist() != list(range(u.shape[1]))
    better = False
    for rank in range(1, u.shape[1]):
        def measured(vectors):
            f = feature_space(weight, bias, vectors, mu, rank)
            return measured_increase(x, t, hessian, weight, bias, *f.dense())
        fisher, plain = measured(u[:, order]), measured(u)
        assert fisher == pytest.approx(0.5 * float(scores[order[rank:]].sum()), rel=1e-8, abs=1e-12)
        assert fisher <= plain * (1 + 1e-9) + 1e-12
        better |= fisher < plain * 0.99
    assert better
