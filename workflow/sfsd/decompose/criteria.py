"""The loss criterion: the expected increase of the language-model loss when one Linear is cut to rank r,
for every factor method, from its cached factors, the input statistics of stage 1 and the second moment
G = E[g g^T] of the loss's gradient at the Linear's output (`sfsd.features.gradients`).

A layer's output error dy enters the loss through everything downstream: dL ~ g^T dy + 1/2 dy^T H dy.
The first-order term is left out (E[g] ~ 0 at a trained model; `gsum` in the gradients files shows how
small it is) and H is replaced by the Fisher g g^T. With K-FAC's assumption (the output gradient g
independent of the input x; LLM Surgeon, ICLR 2024, F ~ G (x) A) a change y -> y + D x costs

    loss(D) = 1/2 E[(g^T D x)^2] ~ 1/2 tr(G D C D^T),       C = E[x x^T] (the moment the method uses),

per token of G's normalisation (G per real token, L the summed NLL: the increase of L per token).

Every method writes its rank-r approximation as W_r = sum_{i<=r} s_i f_i^T (s_i = column i of `second`,
f_i = row i of `first`), so with D = W_r - W (`kfac_loss_curve`, exact for the quadratic form above):

    loss(r) = 1/2 [tr(G W C W^T) - 2 sum_{i<=r} s_i^T G W C f_i + sum_{i,j<=r} (s_i^T G s_j)(f_i^T C f_j)],

every rank at once from two k x k matrices (k = kappa - 1, the cached ranks). The per-component form
the energy criterion enjoys, loss(r) = 1/2 sum_{i>r} (s_i^T G s_i)(f_i^T C f_i) (`additive_gains`), needs
the cross terms (s_i^T G s_j)(f_i^T C f_j), i != j, to vanish. With G not a multiple of I, s_i^T G s_j
!= 0 in general, so that takes f_i^T C f_j = 0:
- feature space (intended bias): C = Cov[x], f_i = W^T u_i, f_i^T C f_j = u_i^T Cov[y] u_j = lambda_i
  delta_ij (the kept directions are uncorrelated), so loss(r) = 1/2 sum_{i>r} lambda_i u_i^T G u_i EXACTLY;
- whitened SVD (SVD-LLM): C = L L^T, f_i = sigma_i^1/2 L^-T v_i, f_i^T C f_j = sigma_i delta_ij, so
  loss(r) = 1/2 sum_{i>r} sigma_i^2 u_i^T G u_i exactly (up to the Cholesky jitter, which the curve,
  computed with the true C, does not assume away);
- weight-space SVD and ASVD: f_i^T C f_j != 0 (the SVD ignores C), so the additive form is only an
  approximation; `kfac_loss_curve` keeps the cross terms and is exact for them too.
With the diagonal of G only (`gradients.full: false`), G is replaced by diag(G): an approximation for
every method (exact where G is diagonal).

What stays approximate whatever the method: the Fisher for the Hessian, K-FAC's independence of g and x,
the first-order term, and the sum over layers (each layer's error priced with the others intact). How
well the criterion orders real loss increases is measured by `workflow/benchmarks/criterion_check.py`
(docs/benchmarks.md).

Files: `save_loss_spectra` writes `<out>/block_NNN.safetensors` with each layer's `<linear>.loss` (float64,
loss(r) for r = 0..kappa-1), read by the loss allocation (`allocate.LayerSpectrum.from_curve`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sfsd.decompose.compress import BlockFile, BlockSource, BlockTensors, block_statistics, statistic, token_count
from sfsd.decompose.factor_cache import factor_entry
from sfsd.decompose.plan import FACTOR_METHODS
from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.features.gradients import output_gradient
from sfsd.io import save_tensors
from sfsd.model.spec import ArchSpec
from sfsd.model.stream import BlockStream, WholeModel, return_freed_memory
from sfsd.provenance import common_value, stamp

Tensor = torch.Tensor


def _weigh(grad: Tensor, matrix: Tensor) -> Tensor:
    """G @ matrix, G a (d, d) matrix or its (d,) diagonal."""
    return grad[:, None] * matrix if grad.ndim == 1 else grad @ matrix


def kfac_loss_curve(weight: Tensor, first: Tensor, second: Tensor, moment: Tensor, grad: Tensor) -> Tensor:
    """loss[r] = 1/2 tr(G (W - W_r) C (W - W_r)^T) for r = 0..k (float64, length k + 1), W_r =
    second[:, :r] @ first[:r], C = `moment` (in x in), G = `grad` (out x out, or its diagonal)."""
    w, f, s = weight.double(), first.double(), second.double()
    c, g = moment.double().to(w.device), grad.double().to(w.device)
    gwc = _weigh(g, w) @ c                        # G W C (out x in)
    total = float((gwc * w).sum())                # tr(G W C W^T)
    a = ((s.T @ gwc) * f).sum(1)                  # a_i = s_i^T G W C f_i
    cross = (s.T @ _weigh(g, s)) * (f @ c @ f.T)  # T_ij = (s_i^T G s_j)(f_i^T C f_j), symmetric
    below = cross.tril(-1).sum(1)                 # sum_{j<i} T_ij
    step = 2 * a - cross.diagonal() - 2 * below   # what rank i+1 saves, times 2
    zero = torch.zeros(1, dtype=torch.float64, device=w.device)
    return 0.5 * (total - torch.cat([zero, step.cumsum(0)]))


def additive_gains(first: Tensor, second: Tensor, moment: Tensor, grad: Tensor) -> Tensor:
    """1/2 (s_i^T G s_i)(f_i^T C f_i) per component: what rank i saves when the cross terms vanish
    (feature space, whitened SVD: exact; weight-space SVD and ASVD: an approximation)."""
    f, s = first.double(), second.double()
    c, g = moment.double().to(f.device), grad.double().to(f.device)
    return 0.5 * (s * _weigh(g, s)).sum(0) * ((f @ c) * f).sum(1)


def fisher_order(eigenvalues: Tensor, eigenvectors: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Feature space's directions ranked by their loss cost instead of their variance: (order, scores),
    scores_i = lambda_i u_i^T G u_i (G a matrix or its diagonal), order = indices by descending score.
    Keeping the columns `eigenvectors[:, order[:r]]` gives loss(r) = 1/2 sum of the other scores, the
    smallest any r of these directions give (the dropped directions stay uncorrelated, so the cost is
    additive whatever the subset); plain feature space keeps the r largest lambda_i instead."""
    u, lam = eigenvectors.double(), eigenvalues.double().clamp_min(0.0)
    g = grad.double().to(u.device)
    scores = lam * (u * _weigh(g, u)).sum(0)
    return torch.argsort(scores, descending=True, stable=True), scores


def method_quadratic(
    method: str,
    weight: Tensor,
    bias: Tensor | None,
    first: Tensor,
    second: Tensor,
    second_moment: Tensor,
    mean: Tensor,
    bias_compensation: str = "intended",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W, first, second, C) whose `kfac_loss_curve` is the method's: the output error is D x with
    D = W_r - W for the methods that keep the bias (C = E[x x^T]); feature space with its intended bias
    (I - P) mu + P b has error -(I - P) W (x - E[x]) (C = Cov[x]); without compensation (y ~ P (W x + b))
    the bias is a column of W and 1 an input: W' = [W b], f_i' = [f_i, s_i^T b], C' = E[[x;1][x;1]^T]."""
    xxt, m = second_moment.double(), mean.double()
    if method != "feature":
        return weight, first, second, xxt
    if bias_compensation == "intended":
        return weight, first, second, xxt - torch.outer(m, m)
    if bias_compensation != "none":
        raise ConfigError(f"bias_compensation {bias_compensation!r} is unknown; use 'intended' or 'none'")
    if bias is None:
        return weight, first, second, xxt
    b = bias.double()
    aug = torch.cat([torch.cat([xxt, m[:, None]], 1), torch.cat([m, m.new_ones(1)])[None]], 0)
    return (torch.cat([weight.double(), b[:, None]], 1), torch.cat([first.double(), (second.double().T @ b)[:, None]], 1),
            second, aug)


def loss_curve(
    weight: Tensor,
    bias: Tensor | None,
    method: str,
    entry: Mapping[str, Tensor],
    features: BlockTensors,
    group: str,
    grad: Tensor,
    block: int = -1,
    bias_compensation: str = "intended",
) -> Tensor:
    """One Linear's loss(r), r = 0..kappa-1, from its factor-cache entry (`factor_cache.factor_entry`), the
    input statistics of its group (stage 1's `<group>.xxt/.xsum/.count`) and G."""
    count = token_count(features, group, block)
    xxt = statistic(features, f"{group}.xxt", block, "feature").double() / count
    mean = statistic(features, f"{group}.xsum", block, "feature").double() / count
    if grad.shape[0] != weight.shape[0]:
        raise DataError(f"block {block}: G of {grad.shape[0]} outputs for a layer of {weight.shape[0]}; the gradients "
                        "come from another model")
    w, f, s, c = method_quadratic(method, weight, bias, entry["first"], entry["second"], xxt, mean, bias_compensation)
    return kfac_loss_curve(w, f, s, c, grad)


def save_loss_spectra(
    model: nn.Module | BlockStream | WholeModel,
    spec: ArchSpec,
    method: str,
    linears: list[str],
    out_dir: str | os.PathLike,
    factor_blocks: BlockSource,
    feature_blocks: BlockSource,
    gradient_blocks: BlockSource,
    *,
    model_digest: str | None = None,
    bias_compensation: str = "intended",
) -> list[Path]:
    """Write `<out_dir>/block_NNN.safetensors` with each Linear's `<linear>.loss` (`loss_curve`) for one
    factor method; every input of one model and one calibration run (a DataError otherwise)."""
    if method not in FACTOR_METHODS:
        raise ConfigError(f"the loss criterion needs a factor method ({', '.join(FACTOR_METHODS)}), not {method!r}")
    source = WholeModel(model) if isinstance(model, nn.Module) else model
    paths, sources = [], []
    for block in range(len(source.blocks)):
        factors = block_statistics(factor_blocks, block, "factor cache")
        features = block_statistics(feature_blocks, block, "feature")
        gradients = block_statistics(gradient_blocks, block, "gradient")
        for stats in (factors, features, gradients):  # weight-space factors may name no calibration run
            if isinstance(stats, BlockFile) and stats.metadata.get("calibration_digest") is not None:
                sources.append((str(stats.path), stats.metadata))
        calibration = common_value(sources, "calibration_digest", f"{method} loss criterion inputs")
        tensors = {}
        with source.block(block) as module:
            for linear in linears:
                layer = module.get_submodule(spec.linears[linear])
                with torch.no_grad():
                    curve = loss_curve(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), method,
                                       factor_entry(factors, linear), features, spec.group_of(linear),
                                       output_gradient(gradients, linear), block, bias_compensation)
                tensors[f"{linear}.loss"] = curve.cpu()
                # the float64 temporaries of this Linear back to the system: left in glibc's heap, they raised the
                # peak of a 2048-wide block by 15% (0.32 GB) above the tensors held (resources.loss_needs)
                return_freed_memory()
        full = gradients.metadata.get("full") if isinstance(gradients, BlockFile) else None
        # the plan of the compressed model the gradients were measured on (a shot of the loss allocation), else None
        weighed_by = gradients.metadata.get("settings", {}).get("compressed_plan") if isinstance(
            gradients, BlockFile) else None
        # the tokens the gradients' NLL scored (gradients.labels): the text's, or drawn from the model
        labels = gradients.metadata.get("labels", "data") if isinstance(gradients, BlockFile) else None
        path = Path(out_dir) / block_file(block)
        save_tensors(path, tensors, {"method": method, "block": block, "linears": list(linears), "full_g": full,
                                     "gradients_of_plan": weighed_by, "gradients_labels": labels,
                                     **stamp(model_digest, calibration, {"method": method, "layers": list(linears),
                                                                         "bias_compensation": bias_compensation})})
        paths.append(path)
    return paths


__all__ = ["additive_gains", "fisher_order", "kfac_loss_curve", "loss_curve", "method_quadratic", "save_loss_spectra"]
