"""Does a layer's predicted cost order the real loss increase? One layer at a time, feature space.

The workflow's calibration texts are split: every `--every`-th text is HELD BACK, the others ("fit") give
everything the criteria read (the input moments, the output covariances' eigenvectors, G = E[g g^T] of
the output gradients). For a sample of layers across depth and Linear types, each layer alone is cut to
floor(ratio x kappa) ranks (feature space, intended bias) and the increase of the mean token NLL on the
held-back texts is measured against the uncompressed model; the same cut is predicted by

    energy (normalised)    sum of the dropped eigenvalues / sum of all (what the spectral allocation sums)
    energy                 sum of the dropped eigenvalues (E||dy||^2, unnormalised)
    loss (full G)          1/2 sum_{i>r} lambda_i u_i^T G u_i   (sfsd.decompose.criteria, K-FAC)
    loss (diagonal G)      the same with diag(G)

and the script prints the Spearman rank correlation of measured vs predicted over all (layer, ratio)
points, within each ratio (across layers: what an allocation has to get right), with a 95% interval from
resampling the layers (2000 draws), and the ratio measured / predicted of the loss criterion (its
prediction converted to the mean NLL per predicted token: x tokens / predicted tokens).

    python -m sfsd ... (or snakemake) once, for results/models/<model> and results/calibration/texts.jsonl
    python workflow/benchmarks/criterion_check.py [--results results --every 4 --ratios 0.2,0.5,0.8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from sfsd.decompose.criteria import loss_curve
from sfsd.decompose.lowrank import from_factors, linear_path, replace_module
from sfsd.decompose.methods import feature_space, max_rank
from sfsd.features.calibration import read_texts, tokenize
from sfsd.features.collect import collect_input_moments
from sfsd.features.gradients import collect_output_gradients, token_losses
from sfsd.features.stats import eigh_descending, output_moments
from sfsd.model.loading import load_model
from sfsd.model.registry import architecture_of, get_arch, groups_for
from sfsd.search.block_cache import BlockCache

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# 16 layers: every Linear type at least twice, blocks spread over the compressed range (4..29)
LAYERS = [(4, "q_proj"), (4, "down_proj"), (6, "gate_proj"), (8, "k_proj"), (10, "o_proj"), (11, "up_proj"),
          (13, "v_proj"), (15, "down_proj"), (17, "q_proj"), (19, "gate_proj"), (21, "k_proj"), (23, "up_proj"),
          (25, "o_proj"), (26, "v_proj"), (28, "down_proj"), (29, "gate_proj")]


def mean_nll(model, batches) -> tuple[float, int]:
    """Mean token NLL over the batches (position t predicts t + 1 among real tokens) and the predictions."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches:
            loss, k = token_losses(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            total, n = total + float(loss), n + k
    return total / n, n


def spearman_with_interval(measured: np.ndarray, predicted: np.ndarray, groups: np.ndarray, draws: int = 2000,
                           seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho and a 95% interval from resampling the groups (layers) with replacement."""
    rho = float(spearmanr(measured, predicted).statistic)
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    values = []
    for _ in range(draws):
        pick = np.concatenate([np.flatnonzero(groups == g) for g in rng.choice(ids, size=ids.size)])
        if np.unique(measured[pick]).size > 2:
            values.append(spearmanr(measured[pick], predicted[pick]).statistic)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return rho, float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--every", type=int, default=4, help="hold back every n-th calibration text")
    parser.add_argument("--ratios", default="0.2,0.5,0.8", help="keep ratios of kappa")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write every point and the correlations as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tokenizer = load_model(args.results / "models" / args.model, dtype="float32", device="cpu")
    spec = get_arch(architecture_of(model.config))
    texts = [d["text"] for d in read_texts(args.results / "calibration" / "texts.jsonl")]
    fit = tokenize([t for i, t in enumerate(texts) if i % args.every != args.every - 1], tokenizer, args.seq_len)
    held = tokenize([t for i, t in enumerate(texts) if i % args.every == args.every - 1], tokenizer, args.seq_len)
    print(f"{args.model}: {fit['input_ids'].shape[0]} fit texts ({int(fit['attention_mask'].sum())} tokens), "
          f"{held['input_ids'].shape[0]} held back ({int(held['attention_mask'].sum())} tokens)", flush=True)

    groups = groups_for(spec, LINEARS)
    moments = collect_input_moments(model, spec, groups, fit["input_ids"], fit["attention_mask"], args.batch_size,
                                    progress=False)
    grads, summary = collect_output_gradients(model, spec, LINEARS, fit["input_ids"], fit["attention_mask"],
                                              args.batch_size, full=True, progress=False)
    print(f"statistics and gradients of the fit texts: {time.perf_counter() - started:.0f} s "
          f"(fit mean NLL {summary['loss'] / summary['predicted_tokens']:.4f})", flush=True)

    batches = [(held["input_ids"][i:i + args.batch_size], held["attention_mask"][i:i + args.batch_size])
               for i in range(0, held["input_ids"].shape[0], args.batch_size)]
    base, n_pred = mean_nll(model, batches)
    per_pred = int(held["attention_mask"].sum()) / n_pred  # summed-NLL-per-token -> mean NLL per prediction
    cache = BlockCache(model, spec)
    points = []
    for block in sorted({b for b, _ in LAYERS}, reverse=True):
        cache.record(block, lambda: mean_nll(model, batches))
        for linear in [n for b, n in LAYERS if b == block]:
            group = spec.group_of(linear)
            acc = moments[block][group]
            features = {f"{group}.xxt": acc.xxt, f"{group}.xsum": acc.xsum, f"{group}.count": torch.tensor(acc.count)}
            path = linear_path(spec, block, linear)
            layer = model.get_submodule(path)
            weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
            x_mean = acc.xsum / acc.count
            mu, cov = output_moments(weight, bias, x_mean, acc.xxt / acc.count - torch.outer(x_mean, x_mean))
            eig = eigh_descending(cov)
            lam = eig.values.clamp_min(0)
            kappa = max_rank(weight.shape[1], weight.shape[0])
            v = eig.vectors[:, :kappa - 1]
            entry = {"first": v.T @ weight.double(), "second": v}
            g = grads[block][linear].second_moment()
            full = loss_curve(weight, bias, "feature", entry, features, group, g)
            diag = loss_curve(weight, bias, "feature", entry, features, group, g.diagonal())
            for ratio in ratios:
                rank = max(1, int(ratio * kappa))
                replace_module(model, path, from_factors(feature_space(weight, bias, eig.vectors, mu, rank)))
                with cache.cached():
                    measured = mean_nll(model, batches)[0] - base
                replace_module(model, path, layer)
                points.append({"layer": f"{block}.{linear}", "ratio": ratio, "rank": rank, "measured": measured,
                               "energy_normalised": float(lam[rank:].sum() / lam.sum()),
                               "energy": float(lam[rank:].sum()), "loss_full": float(full[rank]) * per_pred,
                               "loss_diag": float(diag[rank]) * per_pred})
                p = points[-1]
                print(f"{p['layer']:<16} ratio {ratio:.1f} rank {rank:>4}: measured {measured:+.5f}  "
                      f"loss(full G) {p['loss_full']:.5f}  loss(diag G) {p['loss_diag']:.5f}  "
                      f"energy {p['energy']:.4g} ({p['energy_normalised']:.4f})  [{time.perf_counter() - started:.0f} s]",
                      flush=True)
    cache.close()

    measured = np.array([p["measured"] for p in points])
    layers = np.array([p["layer"] for p in points])
    criteria = ("energy_normalised", "energy", "loss_full", "loss_diag")
    report = {"model": args.model, "base_nll": base, "held_tokens": int(held["attention_mask"].sum()),
              "fit_tokens": summary["tokens"], "ratios": ratios, "points": points, "spearman": {}}
    print(f"\nheld-back mean NLL {base:.4f}; {len(LAYERS)} layers x {len(ratios)} ratios; Spearman rho "
          "[95% interval, layers resampled]")
    print(f"{'criterion':<20}{'all points':>26}" + "".join(f"{'ratio ' + str(r):>26}" for r in ratios))
    for c in criteria:
        pred = np.array([p[c] for p in points])
        row = {"all": spearman_with_interval(measured, pred, layers)}
        for r in ratios:
            sel = np.array([p["ratio"] == r for p in points])
            row[str(r)] = spearman_with_interval(measured[sel], pred[sel], layers[sel])
        report["spearman"][c] = row
        print(f"{c:<20}" + "".join(f"{v[0]:>+10.3f} [{v[1]:+.2f}, {v[2]:+.2f}]  " for v in row.values()))
    ratio = measured / np.array([p["loss_full"] for p in points])
    report["measured_over_loss_full"] = {"median": float(np.median(ratio)), "q25": float(np.quantile(ratio, 0.25)),
                                         "q75": float(np.quantile(ratio, 0.75))}
    print(f"measured / predicted (loss, full G): median {np.median(ratio):.2f} "
          f"(quartiles {np.quantile(ratio, 0.25):.2f}, {np.quantile(ratio, 0.75):.2f})")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
