"""Eigendecomposition stage time versus the bare torch.linalg.eigh calls on the same matrices.

Runs the stage function (read statistics and weights, decompose every output covariance, write) on
cached features of the workflow, then times torch.linalg.eigh alone on the very same covariances
C = W Cov[x] W^T, with the same thread count. The stage forms C and calls eigh for layers with
out <= in, and takes the SVD of W L (Cov[x] = L L^T) for widening layers (gate/up), which avoids
forming C. Target: stage / bare <= 1.2. Python start-up of each Snakemake job
(about 2-3 s for importing torch) is reported separately from the job benchmark files.

    snakemake --cores 2          # once, to produce results/<model>/features
    python workflow/benchmarks/eigen_overhead.py [--model smollm2-135m --blocks 0,1,2 --threads 1]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from sfsd.features.collect import block_file, load_block_moments
from sfsd.features.eigen import run_eigen
from sfsd.features.stats import output_moments
from sfsd.io import read_json, read_parameters
from sfsd.model.registry import get_arch, select_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--blocks", default="0,10,20,29")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    features = args.results / args.model / "features"
    model_dir = args.model_dir or args.results / "models" / args.model
    manifest = read_json(features / "manifest.json")
    spec = get_arch(manifest["architecture"])
    linears = select_linears(spec, manifest["linears"])
    blocks = [int(b) for b in args.blocks.split(",")]
    warm = torch.randn(64, 64, dtype=torch.float64)
    torch.linalg.eigh(warm @ warm.T)  # first LAPACK call pays a one-off set-up

    stage_total = bare_total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for block in blocks:
            path = features / block_file(block)
            start = time.perf_counter()
            run_eigen(path, model_dir, Path(tmp) / f"{block}.safetensors", linears, "float32")
            stage = time.perf_counter() - start
            moments, _ = load_block_moments(path)
            covs = []
            for linear in linears:
                w = read_parameters(model_dir, [spec.param_name(block, linear)])[spec.param_name(block, linear)]
                acc = moments[spec.group_of(linear)]
                covs.append(output_moments(w, None, acc.mean(), acc.covariance())[1])
            start = time.perf_counter()
            for cov in covs:
                torch.linalg.eigh(cov)
            bare = time.perf_counter() - start
            stage_total += stage
            bare_total += bare
            print(f"block {block:3d}: stage {stage:7.3f} s   bare eigh {bare:7.3f} s   ratio {stage / bare:.3f}")
    ratio = stage_total / bare_total
    print(f"all {len(blocks)} blocks: stage {stage_total:.3f} s, bare eigh {bare_total:.3f} s, threads {args.threads}")
    print(f"stage / bare eigh = {ratio:.3f}  (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    bench = args.results / "benchmarks" / "eigendecompose" / args.model
    jobs = [float(next(csv.DictReader(open(f), delimiter="\t"))["s"]) for f in sorted(bench.glob("block_*.tsv"))]
    if jobs:
        print(f"Snakemake job wall time (with Python start-up): mean {sum(jobs) / len(jobs):.2f} s over {len(jobs)} jobs")


if __name__ == "__main__":
    main()
