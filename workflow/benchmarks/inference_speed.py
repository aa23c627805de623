"""Inference cost of the dense model and every compressed variant, in one run: prefill tokens/s, decode
tokens/s at batch 1 and at the largest batch, weight bytes and peak memory, each as a ratio to the
dense model (sfsd/evaluate/speed.py; the same measurement as the workflow's inference_speed rule).

Each model runs in its own process (`python -m sfsd inference-speed`), one after the other, with every
thread given, on the device given (`auto`: the first CUDA device where there is one, else the CPU; the
table says which). Run it on an otherwise idle machine.

    snakemake --cores 2      # once, for results/models/<model> and results/<model>/compressed/*
    python workflow/benchmarks/inference_speed.py [--variants feature-p54,feature-p34] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sfsd.defaults import default
from sfsd.evaluate.speed import speed_rows, speed_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--variants", default=None,
                        help="comma-separated compressed variants (default: every folder under compressed/)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=default("speed.prompt_tokens"))
    parser.add_argument("--decode-tokens", type=int, default=default("speed.decode_tokens"))
    parser.add_argument("--batch-sizes", default=",".join(map(str, default("speed.batch_sizes"))))
    parser.add_argument("--repeats", type=int, default=default("speed.repeats"))
    args = parser.parse_args()

    model_dir = args.results / "models" / args.model
    compressed = args.results / args.model / "compressed"
    names = args.variants.split(",") if args.variants else sorted(p.name for p in compressed.iterdir() if p.is_dir())
    measured = {}
    with tempfile.TemporaryDirectory(prefix="sfsd-speed-") as tmp:
        for name in ["base", *names]:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "sfsd", "--threads", str(args.threads), "inference-speed",
                   "--model-dir", str(model_dir), "--compressed", "none" if name == "base" else str(compressed / name),
                   "--variant", name, "--device", args.device, "--prompt-tokens", str(args.prompt_tokens),
                   "--decode-tokens", str(args.decode_tokens), "--batch-sizes", args.batch_sizes,
                   "--repeats", str(args.repeats), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
            measured[name] = json.loads(out.read_text())
            print(f"measured {name}", file=sys.stderr)
    print(speed_table(speed_rows(measured)))


if __name__ == "__main__":
    main()
