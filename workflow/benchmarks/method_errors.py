"""Relative output error of each decomposition method on held-out calibration tokens.

For a few blocks of the embedded model and each Linear type, the layer's outputs Y on tokens that
were NOT used to collect the statistics are compared with those of its rank-r replacement:
    error = ||Y - Y_hat||_F / ||Y||_F
at several ranks (fractions of kappa = floor(in*out/(in+out))). Methods: feature space (SFSD) with the
intended bias compensation and without it (the released code's), weight-space SVD, whitened SVD
(SVD-LLM), ASVD (SVD of W scaled by the mean |x| of each input channel), and the Vendi row selection
(rank r rebuilt from r selected rows).

    snakemake --cores 2      # once, for results/<model>/{features,eigen} and the calibration texts
    python workflow/benchmarks/method_errors.py [--blocks 5,15,25 --held-out 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfsd.decompose.methods import (  # noqa: E402
    asvd,
    feature_space,
    max_rank,
    vendi_rebuild,
    vendi_select,
    weight_space,
    whitened,
)
from sfsd.features.calibration import CalibrationSettings, sample_texts, tokenize  # noqa: E402
from sfsd.features.collect import block_file, load_block_moments  # noqa: E402
from sfsd.io import load_tensors  # noqa: E402
from sfsd.model.loading import load_model  # noqa: E402
from sfsd.model.registry import architecture_of, get_arch, linear_of  # noqa: E402


def held_out_texts(used_path: Path, n: int, seed: int) -> list[str]:
    """Documents of the same calibration pool (the tasks' calibration parts) not used for statistics."""
    used = {json.loads(line)["doc_id"] for line in used_path.read_text().splitlines()}
    pool = sample_texts(CalibrationSettings(source="combination", num_samples=100_000, seed=seed))
    return [d["text"] for d in pool if d["doc_id"] not in used][:n]


def block_io(model, spec, tokens, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of every Linear of one block over the real tokens (one forward pass)."""
    seen: dict[str, tuple] = {}
    handles = [
        linear_of(model, spec, block, name).register_forward_hook(
            lambda _m, i, o, name=name: seen.update({name: (i[0].detach(), o.detach())})
        )
        for name in spec.linears
    ]
    with torch.inference_mode():
        model(**tokens)
    for h in handles:
        h.remove()
    mask = tokens["attention_mask"].reshape(-1).bool()
    flat = lambda t: t.reshape(-1, t.shape[-1])[mask].double()  # noqa: E731
    return {name: (flat(x), flat(y)) for name, (x, y) in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--blocks", default="5,15,25")
    parser.add_argument("--fractions", default="0.25,0.5,0.75")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    model_dir = args.results / "models" / args.model
    model, tokenizer = load_model(model_dir, device="cpu")
    spec = get_arch(architecture_of(model.config))
    texts = held_out_texts(args.results / "calibration" / "texts.jsonl", args.held_out, args.seed)
    tokens = tokenize(texts, tokenizer, seq_len=128)
    print(f"held-out tokens: {int(tokens['attention_mask'].sum())} from {len(texts)} documents")
    fractions = [float(f) for f in args.fractions.split(",")]
    header = (f"{'block':>5} {'layer':>9} {'rank':>5}  {'feature':>8} {'feat/none':>9} {'weight':>8} {'whitened':>8} "
              f"{'asvd':>8} {'vendi':>8}")
    print(header)
    totals: dict[str, list[float]] = {}
    for block in (int(b) for b in args.blocks.split(",")):
        eig, _ = load_tensors(args.results / args.model / "eigen" / block_file(block))
        moments, _ = load_block_moments(args.results / args.model / "features" / block_file(block))
        io = block_io(model, spec, tokens, block)
        for linear in spec.linears:
            layer = linear_of(model, spec, block, linear)
            w = layer.weight.detach().double()
            b = None if layer.bias is None else layer.bias.detach().double()
            x, y = io[linear]
            second = moments[spec.group_of(linear)].second_moment()
            mean_abs = moments[spec.group_of(linear)].mean_abs()
            vectors, mean = eig[f"{linear}.eigenvectors"].double(), eig[f"{linear}.mean"]
            kappa = max_rank(w.shape[1], w.shape[0])
            for fraction in fractions:
                r = max(1, int(kappa * fraction))
                outs = {
                    "feature": feature_space(w, b, vectors, mean, r).dense(),
                    "feat/none": feature_space(w, b, vectors, mean, r, bias_compensation="none").dense(),
                    "weight": weight_space(w, b, r).dense(),
                    "whitened": whitened(w, b, second, r)[0].dense(),
                    "asvd": asvd(w, b, mean_abs, r).dense(),
                    "vendi": (vendi_rebuild(w, vendi_select(w, r)), b),
                }
                errors = {}
                for name, (w_hat, b_hat) in outs.items():
                    y_hat = x @ w_hat.T + (0 if b_hat is None else b_hat)
                    errors[name] = float((y - y_hat).norm() / y.norm())
                    totals.setdefault(f"{fraction}:{name}", []).append(errors[name])
                print(f"{block:5d} {linear:>9} {r:5d}  " + " ".join(f"{errors[n]:>8.4f}" for n in outs))
    print("\nmean relative error over blocks and layer types:")
    for fraction in fractions:
        row = {n: sum(v) / len(v) for k, v in totals.items() for n in [k.split(":")[1]] if k.startswith(f"{fraction}:")}
        print(f"  rank = {fraction:.2f} kappa: " + ", ".join(f"{n} {e:.4f}" for n, e in row.items()))


if __name__ == "__main__":
    main()
