"""Feature space keeping the directions of largest loss cost (lambda_i u_i^T G u_i) instead of largest
variance (lambda_i): LAMBADA perplexity at equal size, a prototype outside the workflow's methods.

From the workflow's eigen files (eigenvalues, eigenvectors, output mean) and output gradients (G), for
one budget: the uniform plan with plain feature space (its factor cache: the reference), the same ranks
with the directions ranked by `criteria.fisher_order` ("fisher order"), and the loss allocation (groups
type) with each order, the fisher order's curve being loss(r) = 1/2 (sum of all scores - the r largest).
Each is scored on the LAMBADA test passages as `allocation_ppl.py` scores them, with the paired ratio to
the reference and its 95% interval.

    snakemake --cores 2 results/smollm2-135m/loss/feature    # eigen files, factor cache, gradients, loss criterion
    python workflow/benchmarks/fisher_order.py [--budget 0.806 --docs 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sfsd.decompose.allocate import LayerSpectrum, curve_spectra, spectral_plan
from sfsd.decompose.compress import BlockFile
from sfsd.decompose.criteria import fisher_order
from sfsd.decompose.factor_cache import apply_cached_plan
from sfsd.decompose.lowrank import from_factors, linear_path, replace_module
from sfsd.decompose.methods import feature_space, max_rank
from sfsd.decompose.plan import budget_plan, count_params, parse_layer_key
from sfsd.defaults import default
from sfsd.evaluate.perplexity import perplexity, perplexity_texts, split_texts
from sfsd.features.calibration import read_texts
from sfsd.features.collect import block_file
from sfsd.features.gradients import output_gradient
from sfsd.io import model_digest
from sfsd.model.loading import load_model
from sfsd.model.registry import get_arch, perplexity_bos
from sfsd.model.shapes import model_shapes
from sfsd.report.compare import paired_ppl_ratio

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--budget", type=float, default=0.806, help="fraction of the parameters kept")
    parser.add_argument("--first-block", type=int, default=4, help="as compression.first_block")
    parser.add_argument("--docs", type=int, default=100, help="test passages scored (LAMBADA, after the searched 20%)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.results / "models" / args.model
    root = args.results / args.model
    shapes = model_shapes(model_dir)
    spec = get_arch(shapes.architecture)
    digest = model_digest(model_dir)
    blocks = range(args.first_block, shapes.n_blocks)
    keys = [f"{b}.{n}" for b in blocks for n in LINEARS]

    orders, scores = {}, {}
    for key in keys:
        b, n = parse_layer_key(key, spec, shapes.n_blocks)
        eigen = BlockFile(root / "eigen" / block_file(b), digest)
        g = output_gradient(BlockFile(root / "gradients" / block_file(b), digest), n)
        orders[key], scores[key] = fisher_order(eigen[f"{n}.eigenvalues"], eigen[f"{n}.eigenvectors"], g)

    def fisher_curve(key: str) -> torch.Tensor:
        out_f, in_f = shapes.linears[key.split(".", 1)[1]]
        kept = scores[key][orders[key]].cumsum(0)[: max_rank(in_f, out_f) - 1]
        total = scores[key].sum()
        return 0.5 * torch.cat([total[None], total - kept])

    fisher_spectra = {k: LayerSpectrum.from_curve(shapes.linears[k.split(".", 1)[1]][1],
                                                  shapes.linears[k.split(".", 1)[1]][0], fisher_curve(k)) for k in keys}
    plain_spectra = curve_spectra(spec, shapes, keys, lambda b, n: BlockFile(
        root / "loss" / "feature" / block_file(b), digest)[f"{n}.loss"])
    uniform = budget_plan(spec, shapes, LINEARS, args.budget, "feature", blocks=blocks)
    plans = {
        "uniform, eigenvalue order": (uniform, "plain"),
        "uniform, fisher order": (uniform, "fisher"),
        "loss (type), eigenvalue order": (spectral_plan(spec, shapes, LINEARS, args.budget, "feature", plain_spectra,
                                                        blocks=blocks, criterion="loss"), "plain"),
        "loss (type), fisher order": (spectral_plan(spec, shapes, LINEARS, args.budget, "feature", fisher_spectra,
                                                    blocks=blocks, criterion="loss"), "fisher"),
    }

    calibration = [d["doc_id"] for d in read_texts(args.results / "calibration" / "texts.jsonl")]
    docs = split_texts(perplexity_texts("lambada", exclude_ids=calibration, max_docs=300), 0.2)["test"][:args.docs]
    bos = perplexity_bos(default("evaluation.perplexity.bos"),
                         json.loads((model_dir / "config.json").read_text()).get("model_type"))
    print(f"{args.model}, feature space, budget {args.budget}, blocks {args.first_block}-{shapes.n_blocks - 1}; "
          f"LAMBADA perplexity on {len(docs)} test passages, 128-token windows")
    print(f"{'plan':<32}{'params %':>9}{'pred. loss':>12}{'ppl':>10}{'vs first [95% CI]':>26}")
    reference = None
    for name, (plan, order) in plans.items():
        model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
        predicted = 0.0
        if order == "plain":
            apply_cached_plan(model, spec, plan, root / "factors", model_digest=digest)
        for key, entry in plan["layers"].items():
            rank = entry.get("rank") if entry["method"] != "dense" else None
            predicted += (fisher_spectra if order == "fisher" else plain_spectra)[key].error(rank)
            if order == "plain" or rank is None:
                continue
            b, n = parse_layer_key(key, spec, shapes.n_blocks)
            eigen = BlockFile(root / "eigen" / block_file(b), digest)
            path = linear_path(spec, b, n)
            layer = model.get_submodule(path)
            vectors = eigen[f"{n}.eigenvectors"][:, orders[key]]
            with torch.no_grad():
                factors = feature_space(layer.weight, layer.bias, vectors, eigen[f"{n}.mean"], rank)
            replace_module(model, path, from_factors(factors))
        result = perplexity(model, tokenizer, docs, 128, batch_size=8, bos=bos)
        reference = reference or result
        ratio = paired_ppl_ratio(result["window_nll"], result["window_tokens"], reference["window_nll"],
                                 reference["window_tokens"])
        fraction = count_params(shapes, plan)["model"]["fraction"]
        print(f"{name:<32}{100 * fraction:>9.2f}{predicted:>12.4f}{result['ppl']:>10.1f}"
              f"{ratio.value:>10.3f} [{ratio.low:.3f}, {ratio.high:.3f}]", flush=True)


if __name__ == "__main__":
    main()
