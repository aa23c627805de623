"""Stage 2: per block and per target Linear, the output mean and covariance from the cached input
moments, and its eigendecomposition (float64, descending). One job per block, single-threaded by
default: LAPACK's eigh is several times slower with 2 MKL threads than with 1 on small machines,
so Snakemake runs blocks in parallel instead.

Only the top min(in, out) eigenpairs are stored (`stored_rank`): the covariance W Cov[x] W^T has rank
<= in, and no plan keeps a factored rank above kappa - 1 < min(in, out) (`decompose.methods.max_rank`),
so a widening Linear's zero-eigenvalue completion (out - in columns) would be written and never read."""

from __future__ import annotations

import logging
import os
import time

import torch

from sfsd.errors import DataError, NumericalError
from sfsd.features.collect import load_block_moments
from sfsd.features.stats import covariance_factor, energy_kept, output_eigen, output_mean
from sfsd.io import checkpoint_index, model_digest, read_parameters, save_tensors
from sfsd.model.loading import resolve_dtype
from sfsd.model.registry import get_arch, select_linears
from sfsd.provenance import common_value, stamp

log = logging.getLogger(__name__)

# A negative eigenvalue below -tol * max E[y_i^2] is not round-off: the statistics are broken.
NEGATIVE_TOLERANCE = 1e-5
# |S_ij - S_ji| above tol * sqrt(S_ii S_jj) in a summed x x^T is not float32 round-off either (a GEMM
# may sum the two triangles in different orders: ~sqrt(tokens per flush) * 6e-8 apart, far below this).
ASYMMETRY_TOLERANCE = 1e-3


def check_symmetric(xxt: torch.Tensor, where: str) -> None:
    """NumericalError when a second-moment matrix is not symmetric beyond round-off (eigh would read
    one triangle and silently ignore the other)."""
    a = xxt.double()
    diag = a.diagonal().clamp_min(0)
    scale = torch.sqrt(torch.outer(diag, diag)).clamp_min(float(diag.max()) * 1e-12 + 1e-300)
    worst = float(((a - a.T).abs() / scale).max()) if a.numel() else 0.0
    if worst > ASYMMETRY_TOLERANCE:
        raise NumericalError(f"{where}: x x^T is not symmetric (relative asymmetry {worst:.3e} > "
                             f"{ASYMMETRY_TOLERANCE:.0e}); the statistics are corrupt: rerun collection")


def stored_rank(out_features: int, in_features: int) -> int:
    """Eigenpairs an eigen file keeps per Linear: min(in, out), the rank its output covariance can have."""
    return min(out_features, in_features)


def run_eigen(
    features_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    layers: list[str],
    save_dtype: str = "float32",
) -> dict:
    moments, meta = load_block_moments(features_path)
    block = int(meta["block"])
    digest = model_digest(model_dir)
    if meta.get("model_digest") != digest:
        raise DataError(
            f"{features_path} was collected from another model (digest {meta.get('model_digest')} != {digest}); "
            "rerun feature collection for this model"
        )
    spec = get_arch(meta["architecture"])
    linears = select_linears(spec, layers)
    index = checkpoint_index(model_dir)
    # the block's weights and biases in one read of the checkpoint
    wanted = [spec.param_name(block, linear, kind) for linear in linears for kind in ("weight", "bias")]
    params = read_parameters(model_dir, [n for n in wanted if n in index], index=index)
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    input_stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    eigh_seconds = 0.0
    for linear in linears:
        group = spec.group_of(linear)
        if group not in moments:
            raise DataError(f"{features_path} holds no statistics for {group} (needed by {linear}); rerun collection")
        bias_name = spec.param_name(block, linear, "bias")
        if group not in input_stats:  # q/k/v and gate/up share one input mean, covariance and factor
            check_symmetric(moments[group].xxt, f"{features_path} block {block} {group}")
            x_cov = moments[group].covariance()
            factor = covariance_factor(x_cov)
            if factor is None:  # widening layers then take the out x out eigh path (slower, same result)
                log.info("block %d %s: input covariance is not positive definite (Cholesky failed); "
                         "decomposing the output covariance directly", block, group)
            input_stats[group] = (moments[group].mean(), x_cov, factor)
        x_mean, x_cov, x_factor = input_stats[group]
        weight = params[spec.param_name(block, linear, "weight")]
        mu = output_mean(weight, params.get(bias_name), x_mean)
        started = time.perf_counter()
        eig = output_eigen(weight, x_cov, x_factor, complete=False)
        eigh_seconds += time.perf_counter() - started
        if not torch.isfinite(eig.values).all():
            raise NumericalError(f"block {block} {linear}: eigendecomposition gave NaN/Inf")
        top = float(eig.values[0]) if eig.values.numel() else 0.0
        if eig.min_raw < 0:
            # Round-off in C = E[yy^T] - mu mu^T scales with E[y_i^2] = C_ii + (W E[x])_i^2, not with
            # the centred spread; diag(C) = (V * V) @ lambda.
            diag = (eig.vectors.square() @ eig.values).max()
            scale = float(diag + (weight.double() @ x_mean).square().max())
            if eig.min_raw < -NEGATIVE_TOLERANCE * max(scale, 1e-30):
                raise NumericalError(
                    f"block {block} {linear}: covariance has eigenvalue {eig.min_raw:.3e} (scale {scale:.3e}); "
                    "it is not positive semi-definite beyond round-off, the statistics are corrupt: rerun collection"
                )
        if eig.n_clamped:
            log.info("block %d %s: clamped %d round-off negative eigenvalue(s), min %.3e", block, linear,
                     eig.n_clamped, eig.min_raw)
        keep = stored_rank(*weight.shape)
        tensors[f"{linear}.eigenvalues"] = eig.values[:keep].contiguous()
        tensors[f"{linear}.eigenvectors"] = eig.vectors[:, :keep].to(resolve_dtype(save_dtype)).contiguous()
        tensors[f"{linear}.mean"] = mu
        report[linear] = {"dim": int(weight.shape[0]), "stored": keep, "n_clamped": eig.n_clamped,
                          "min_raw": eig.min_raw, "top": top}
    save_tensors(
        out_path,
        tensors,
        {
            "model": meta.get("model"),
            "architecture": meta["architecture"],
            "block": block,
            "linears": linears,
            "layers": report,
            **stamp(digest, meta.get("calibration_digest"), {"layers": list(layers), "save_dtype": save_dtype}),
        },
    )
    return {"block": block, "eigh_seconds": eigh_seconds, "layers": report}


def summarize(paths: list) -> dict:
    """Per block and Linear: dimension, clamped count, and the rank that keeps 90/95/99% of the
    output variance; the energy curve itself is sampled at 20 evenly spaced ranks of the output dimension
    (the eigenvalues past the stored ones are 0: `stored_rank`)."""
    from sfsd.io import load_tensors

    blocks = []
    metas = []
    for path in paths:
        tensors, meta = load_tensors(path)
        metas.append((path, meta))
        layers = {}
        for linear in meta["linears"]:
            values = tensors[f"{linear}.eigenvalues"]
            n = int(meta["layers"][linear].get("dim", values.numel()))
            energy = energy_kept(torch.cat([values, values.new_zeros(n - values.numel())]))
            sample = sorted({max(1, round(n * i / 20)) for i in range(1, 21)})
            layers[linear] = {
                "dim": n,
                "n_clamped": meta["layers"][linear]["n_clamped"],
                **{f"rank_{int(q * 100)}": int((energy < q).sum()) + 1 for q in (0.9, 0.95, 0.99)},
                "energy_at_rank": {str(r): round(float(energy[r - 1]), 6) for r in sample},
            }
        blocks.append({"block": meta["block"], "layers": layers})
    # one model and one calibration run across all blocks: a stale block of an older run is refused
    model = common_value(metas, "model_digest", "eigen")
    calibration = common_value(metas, "calibration_digest", "eigen")
    return {"model": meta.get("model") if paths else None,
            **stamp(model, calibration, {"blocks": len(paths)}),
            "blocks": sorted(blocks, key=lambda b: b["block"])}
