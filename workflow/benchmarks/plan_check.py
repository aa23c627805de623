"""The resource planner's host-memory predictions against the peak resident memory of the stages on the CPU.

Writes (once, reused) a random-weight Llama stored as bfloat16 shards with the embedded model's tokenizer,
tokenizes CoQA stories, and runs each CPU stage as its command in a fresh process (device cpu, float32, one
thread): stage 1 whole and streamed, the output gradients with the whole G and its diagonal, the
eigendecomposition of block 0, the feature and whitened factor caches whole and streamed. Prints, per run,
the planner's predicted host memory (its chosen formula with the mode forced), the process's peak resident
memory (VmHWM) and their ratio. The predictions include
`PROCESS_BYTES` for the interpreter and what the formulas leave out, so the
table also gives both without it. GPU memory is not checked here.

    python workflow/benchmarks/plan_check.py [--shape 1024,2816,8,16] [--sequences 64 --seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import build_weights, dense_tokens, embedded_model_dir, llama_config

GB = 1e9
LAYERS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# runs the command in this process and reports its peak resident memory: VmHWM of /proc/self/status (kB),
# the high-water mark of this program's own memory (ru_maxrss would start from the parent's at the fork)
CHILD = ("import sys\nfrom sfsd.cli.main import main\ncode = main(sys.argv[1:])\n"
         "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
         "print('PEAK_RSS', int(hwm.split()[1]) * 1024, file=sys.stderr)\nsys.exit(code)\n")


def peak(args: list[str]) -> int:
    run = subprocess.run([sys.executable, "-c", CHILD, "--threads", "1", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{run.stderr[-3000:]}")
    return int(next(line.split()[1] for line in run.stderr.splitlines() if line.startswith("PEAK_RSS")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,2816,8,16", help="hidden,intermediate,layers,heads[,kv_heads]")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gradients-batch-size", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sfsd-plan-check")
    args = parser.parse_args()

    from dataclasses import replace

    from sfsd.features.calibration import tokens_digest
    from sfsd.io import save_tensors
    from sfsd.provenance import tokenizer_digest
    from sfsd.resources.modes import candidates
    from sfsd.resources.loss_needs import gradients
    from sfsd.resources.needs import PROCESS_BYTES, Machine, Settings
    from sfsd.resources.read import model_size

    embedded = embedded_model_dir(None)
    vocab = json.loads((embedded / "config.json").read_text())["vocab_size"]
    model = args.work_dir / ("llama-" + args.shape.replace(",", "-"))
    build_weights(llama_config(args.shape, vocab), model, embedded, seed=0, shard_mb=512)
    tokens = dense_tokens(embedded, args.sequences, args.seq_len)
    tokens_path = args.work_dir / "tokens.safetensors"
    save_tensors(tokens_path, tokens, {"digest": tokens_digest(tokens), "seq_len": args.seq_len,
                                       "tokenizer_digest": tokenizer_digest(embedded)})
    n = int(tokens["input_ids"].shape[0])
    size = model_size(model, LAYERS.split(","))
    s = Settings(itemsize=4, collect_itemsize=4, gpu=False, samples=n, seq_len=args.seq_len,
                 collect_batch=args.batch_size, methods=("feature", "whitened"), grad_itemsize=4,
                 grad_batch=args.gradients_batch_size)
    host = Machine(None, 0, 1e15)  # the streamed hidden states stay in memory, as on this machine
    out = args.work_dir / "out"
    common = ["--model-dir", str(model)]
    collect = ["collect", *common, "--model-name", "m", "--tokens", str(tokens_path), "--layers", LAYERS,
               "--dtype", "float32", "--device", "cpu", "--batch-size", str(args.batch_size)]
    by_mode = {n.mode: n for n in candidates("collect_features", size, replace(s, staging="device"), host)}
    rows = []
    for streamed in ("never", "always"):
        measured = peak([*collect, "--streamed", streamed, "--staging", "device", "--out", str(out / f"f-{streamed}")])
        rows.append((f"collect_features {'streamed' if streamed == 'always' else 'whole'}",
                     by_mode[f"{'streamed' if streamed == 'always' else 'whole'}, staging device"].host_bytes, measured))
    for full in ("true", "false"):  # set, not auto: auto's full G counts its sums twice (loss_needs.gradients)
        need = gradients(size, replace(s, grad_full=full), host, full == "true")
        measured = peak(["gradients", *common, "--model-name", "m", "--tokens", str(tokens_path), "--layers", LAYERS,
                         "--full", full, "--dtype", "float32", "--device", "cpu", "--batch-size",
                         str(args.gradients_batch_size), "--streamed", "never", "--out", str(out / f"g-{full}")])
        rows.append((f"collect_gradients {need.mode}", need.host_bytes, measured))
    features = out / "f-never"
    results = out / "results"
    (results / "eigen").mkdir(parents=True, exist_ok=True)
    if not (results / "features").exists():
        (results / "features").symlink_to(features.resolve())
    measured = peak(["eigen", "--features", str(features / "block_000.safetensors"), *common, "--layers", LAYERS,
                     "--out", str(results / "eigen" / "block_000.safetensors")])
    rows.append(("eigendecompose (block 0)", candidates("eigendecompose", size, s, host)[0].host_bytes, measured))
    for b in range(1, size.n_blocks):
        peak(["eigen", "--features", str(features / f"block_{b:03d}.safetensors"), *common, "--layers", LAYERS,
              "--out", str(results / "eigen" / f"block_{b:03d}.safetensors")])
    for method in ("feature", "whitened"):
        whole, streamed = candidates("factor_cache", size, s, host, method=method)
        for mode, need in (("never", whole), ("always", streamed)):
            measured = peak(["factor-cache", *common, "--results", str(results), "--method", method, "--layers", LAYERS,
                             "--dtype", "float32", "--streamed", mode, "--out", str(out / f"c-{method}-{mode}")])
            rows.append((f"factor_cache {method} {need.mode.split(',')[0]}", need.host_bytes, measured))
    print(f"random Llama {args.shape} ({size.total_params / 1e6:.0f}M parameters, float32 on the CPU), "
          f"{n} x {args.seq_len} tokens, batch {args.batch_size}")
    print(f"| stage | predicted GB | measured peak RSS GB | ratio | predicted - {PROCESS_BYTES / GB:.2f} GB | measured - interpreter |")
    print("|---|---|---|---|---|---|")
    base = peak(["architectures", "LlamaForCausalLM"])  # the interpreter with the package and torch loaded
    for name, predicted, measured in rows:
        print(f"| {name} | {predicted / GB:.2f} | {measured / GB:.2f} | {measured / predicted:.2f} | "
              f"{(predicted - PROCESS_BYTES) / GB:.2f} | {(measured - base) / GB:.2f} |")
    print(f"(interpreter alone: {base / GB:.2f} GB)")


if __name__ == "__main__":
    main()
