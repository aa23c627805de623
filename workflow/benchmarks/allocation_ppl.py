"""Rank allocations of one method at one budget, compared on held-out perplexity (no benchmark scoring).

Builds, from the workflow's factor cache, the uniform plan (`compression.budgets`), the spectral plans
with groups `type` (the default: rank moves across depth within each Linear type) and `global` (one
greedy over every layer), the loss plans with both groupings where results/<model>/loss/<method> holds the
loss criterion (rule loss_spectra), as a control the same greedy on the unnormalised output energy
E||dy||^2 (no G), and optionally the searched plans under results/<model>/plans/, applies
each to the embedded model and prints, per plan, the parameters kept, the summed normalised output error
the spectral allocation minimises, the summed predicted loss increase the loss allocation minimises (nats
per token), and perplexity (128-token windows; LAMBADA, or any `evaluation.perplexity.source` with
`--ppl-source`/`--ppl-path`) on the first N of the test passages (those no search scored), with the ratio to the uniform plan's and its 95% interval (the windows
resampled, paired: `report.compare.paired_ppl_ratio`); BOS placed in the windows as
`evaluation.perplexity.bos` places it (`--bos`, default from the schema: auto, the model family's protocol).

    snakemake --cores 2      # once, for results/<model>/factors (with spectra), plans and calibration texts
    python workflow/benchmarks/allocation_ppl.py [--method feature --budget 0.806 --docs 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sfsd.decompose.allocate import LayerSpectrum, curve_spectra, layer_spectra, spectral_plan
from sfsd.decompose.compress import BlockFile
from sfsd.decompose.factor_cache import apply_cached_plan, factor_spectrum
from sfsd.decompose.plan import budget_plan, count_params
from sfsd.defaults import choices, default
from sfsd.evaluate.perplexity import perplexity, perplexity_texts, split_texts
from sfsd.features.calibration import read_texts
from sfsd.features.collect import block_file
from sfsd.io import model_digest
from sfsd.model.loading import load_model
from sfsd.model.registry import architecture_of, get_arch, perplexity_bos
from sfsd.model.shapes import model_shapes
from sfsd.report.compare import paired_ppl_ratio

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--method", default="feature")
    parser.add_argument("--budget", type=float, default=0.806, help="fraction of the parameters kept")
    parser.add_argument("--first-block", type=int, default=4, help="as compression.first_block")
    parser.add_argument("--docs", type=int, default=100, help="test passages scored (after the searched 20%%)")
    parser.add_argument("--ppl-source", default="lambada", choices=choices("evaluation.perplexity.source"),
                        help="the scored text, as evaluation.perplexity.source (text_file: --ppl-path)")
    parser.add_argument("--ppl-path", default=None, help="as evaluation.perplexity.path (text_file, jsonl_file)")
    parser.add_argument("--plans", nargs="*", default=[], help="more plan files to score (e.g. searched plans)")
    parser.add_argument("--bos", choices=choices("evaluation.perplexity.bos"),
                        default=default("evaluation.perplexity.bos"), help="as evaluation.perplexity.bos")
    parser.add_argument("--only", nargs="*", default=[], help="score only the plans whose names contain one of "
                                                              "these (and uniform, the reference)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.results / "models" / args.model
    factors = args.results / args.model / "factors"
    shapes = model_shapes(model_dir)
    spec = get_arch(shapes.architecture)
    digest = model_digest(model_dir)
    blocks = range(args.first_block, shapes.n_blocks)
    keys = [f"{b}.{n}" for b in blocks for n in LINEARS]
    spectra = layer_spectra(spec, shapes, keys, lambda b, n: factor_spectrum(
        BlockFile(factors / args.method / block_file(b), digest), n))
    energy = {k: factor_spectrum(BlockFile(factors / args.method / block_file(int(k.split(".")[0])), digest),
                                 k.split(".", 1)[1])[1] for k in keys}
    plans = {"uniform": budget_plan(spec, shapes, LINEARS, args.budget, args.method, blocks=blocks)}
    for groups in ("type", "global"):
        plans[f"spectral ({groups})"] = spectral_plan(spec, shapes, LINEARS, args.budget, args.method, spectra,
                                                      blocks=blocks, groups=groups)
    loss_dir = args.results / args.model / "loss" / args.method
    losses = curve_spectra(spec, shapes, keys, lambda b, n: BlockFile(loss_dir / block_file(b), digest)[f"{n}.loss"]) \
        if loss_dir.is_dir() else {}
    for groups in ("type", "global") if losses else ():
        plans[f"loss ({groups})"] = spectral_plan(spec, shapes, LINEARS, args.budget, args.method, losses,
                                                  blocks=blocks, groups=groups, criterion="loss")
    # control: the greedy on the UNNORMALISED output energy E||dy||^2 (no G): is it G or dropping the
    # normalisation that matters?
    energies = {k: LayerSpectrum.from_curve(s.in_features, s.out_features, torch.tensor(
        [s.error(r) for r in range(len(s.gains) + 1)], dtype=torch.float64) * energy[k]) for k, s in spectra.items()}
    for groups in ("type", "global"):
        plans[f"energy, unnormalised ({groups})"] = spectral_plan(spec, shapes, LINEARS, args.budget, args.method,
                                                                  energies, blocks=blocks, groups=groups,
                                                                  criterion="loss")
    if args.only:
        plans = {k: v for k, v in plans.items() if k == "uniform" or any(o in k for o in args.only)}
    for path in args.plans:
        plans[Path(path).stem] = json.loads(Path(path).read_text())

    calibration = [d["doc_id"] for d in read_texts(args.results / "calibration" / "texts.jsonl")]
    texts = perplexity_texts(args.ppl_source, path=args.ppl_path, exclude_ids=calibration,
                             max_docs=default("evaluation.perplexity.max_docs"))
    docs = split_texts(texts, 0.2)["test"][:args.docs]
    bos = perplexity_bos(args.bos, json.loads((model_dir / "config.json").read_text()).get("model_type"))
    print(f"{args.model}, {args.method}, budget {args.budget}, blocks {args.first_block}-{shapes.n_blocks - 1}; "
          f"{args.ppl_source} perplexity on {len(docs)} test passages, 128-token windows, BOS {bos.replace('_', ' ')}")
    print(f"{'plan':<34}{'params %':>9}{'norm. error':>13}{'pred. loss':>12}{'ppl':>10}{'vs uniform [95% CI]':>26}")
    reference = None
    for name, plan in plans.items():
        model, tokenizer = load_model(model_dir, device="cpu")
        apply_cached_plan(model, get_arch(architecture_of(model.config)), plan, factors, model_digest=digest)
        result = perplexity(model, tokenizer, docs, 128, batch_size=8, bos=bos)
        ppl = result["ppl"]
        reference = reference or result
        ratio = paired_ppl_ratio(result["window_nll"], result["window_tokens"], reference["window_nll"],
                                 reference["window_tokens"])
        ranks = {k: e.get("rank") for k, e in plan["layers"].items()}
        error = sum(spectra[k].error(r) for k, r in ranks.items() if k in spectra)
        loss = sum(losses[k].error(r) for k, r in ranks.items() if k in losses) if losses else float("nan")
        fraction = count_params(shapes, plan)["model"]["fraction"]
        print(f"{name:<34}{100 * fraction:>9.2f}{error:>13.3f}{loss:>12.4f}{ppl:>10.1f}"
              f"{ratio.value:>10.3f} [{ratio.low:.3f}, {ratio.high:.3f}]", flush=True)


if __name__ == "__main__":
    main()
