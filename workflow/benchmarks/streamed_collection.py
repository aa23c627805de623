"""Block-streamed stage 1 on a model whose weights exceed a memory cap, against the whole-model pass.

Writes (once, reused) a random-weight Llama of a few billion parameters as bfloat16 safetensors shards
with the embedded model's tokenizer, and a smaller one of the same family. Then, each in a fresh process
(MALLOC_ARENA_MAX=1 and a fixed MALLOC_MMAP_THRESHOLD_, see --mmap-threshold-mb), `sfsd.features.collect.run_collect`
with the workflow's default layers and collection settings on the CPU: the small model whole and streamed
without a cap; the large model streamed and whole under an address-space cap (RLIMIT_AS, set after a
warm-up) of the warmed-up process plus a budget far below its weights (the whole load should fail: the
cap bites). Prints a markdown table, the throughput ratio (also per parameter), and an ESTIMATE of memory
and time for a 70B Llama on one GPU. Each run's statistics (GB of float64 moments) are deleted after it.

    python workflow/benchmarks/streamed_collection.py [--work-dir DIR] [--large 2048,5632,40,16]
        [--small 1024,2816,24,16 | --small embedded] [--sequences 32 --seq-len 128] [--budget-gb 3]
        [--mmap-threshold-mb 4] [--gpu-tflops 30 --read-gbps 2 --write-gbps 1 --pcie-gbps 25]

Shapes are hidden,intermediate,layers,heads[,kv_heads]. Cache: DIR (default: <tempdir>/sfsd-streamed-bench).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9
OOM = 3  # exit code of a run that ran out of memory


def probe(config) -> dict:
    """Parameter counts and the dimensions of the workflow's input groups (default layers), read from a
    one-block copy of `config` on the meta device and `sfsd.model.registry`'s spec of the architecture."""
    from transformers import AutoModelForCausalLM

    from sfsd.model.registry import architecture_of, blocks_of, get_arch, groups_for, select_linears
    from sfsd.defaults import default

    one = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    spec = get_arch(architecture_of(config))
    block = blocks_of(model, spec)[0]
    dims = {g: block.get_submodule(spec.linears[spec.input_groups[g][0]]).in_features
            for g in groups_for(spec, select_linears(spec, default("layers")))}
    per_block = sum(p.numel() for p in block.parameters())
    head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    before = sum(p.numel() for p in model.parameters()) - per_block - head  # embedding, final norm
    total = before + head + per_block * config.num_hidden_layers
    return {"block": per_block, "before": before, "head": head, "total": total, "dims": dims}


def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def child(model_dir: str, tokens: str, out: str, mode: str, budget_gb: float) -> None:
    """One collection in this (fresh) process: warm up, cap the address space (budget > 0), collect."""
    import gc
    import resource

    import transformers
    from accelerate import init_empty_weights

    from sfsd.features.collect import run_collect
    from sfsd.defaults import default

    # warm up on a tiny model (the lazy imports, a first forward): an empty copy of the large model here
    # would leave its transient CPU allocations' heap in the baseline, i.e. raise the cap
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    with init_empty_weights(include_buffers=False):
        transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.inference_mode():
        transformers.LlamaForCausalLM(cfg).model(input_ids=torch.ones(2, 8, dtype=torch.long))
    gc.collect()
    cap = None
    if budget_gb > 0:
        cap = _status("VmSize") + int(budget_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    report = {"base": _status("VmRSS"), "cap": cap}
    start = time.perf_counter()
    try:
        manifest = run_collect(model_dir, tokens, out, Path(model_dir).name, default("layers"),
                               dtype=default("collection.dtype"), device="cpu",
                               batch_size=default("collection.batch_size"),
                               flush_every=default("collection.flush_every"), streamed=mode)
    except (MemoryError, RuntimeError) as err:
        print(json.dumps({**report, "error": str(err)[:200], "hwm": _status("VmHWM")}))
        sys.exit(OOM)
    print(json.dumps({**report, "wall": time.perf_counter() - start, "collect": manifest["seconds"],
                      "tokens": manifest["tokens"], "hwm": _status("VmHWM")}))


def run(model_dir: Path, tokens: Path, out: Path, mode: str, budget_gb: float, mmap_mb: int) -> dict:
    """`child` in a fresh process; the statistics' size on disk, then the statistics deleted."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    if mmap_mb:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_mb << 20)
    proc = subprocess.run([sys.executable, __file__, "_child", str(model_dir), str(tokens), str(out), mode,
                           str(budget_gb)], capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, OOM) or not lines:
        sys.exit(f"{model_dir.name} {mode} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                 f"{proc.stderr[-3000:]}")
    result = {**json.loads(lines[-1]), "ok": proc.returncode == 0}
    stats = list(out.parent.glob(f"*{out.name}*"))  # the output and any temporary sibling left behind
    result["stats"] = sum(f.stat().st_size for p in stats for f in p.rglob("*") if f.is_file())
    for p in stats:
        shutil.rmtree(p)
    return result


def reduce_seconds_per_element(n: int = 4096) -> float:
    """Host time of one float64 reduction (`InputMoments.flush`: float32 -> float64, added) per element."""
    staged, acc, times = torch.randn(n, n), torch.zeros(n, n, dtype=torch.float64), []
    for _ in range(3):
        times.append(-time.perf_counter())
        acc += staged.to(torch.float64)
        times[-1] += time.perf_counter()
    return min(times) / n**2


def estimate(config, n_tokens: int, batch_tokens: int, n_batches: int, flush_every: int,
             compute_bytes: int = 4, storage_bytes: int = 2) -> dict:
    """ESTIMATE of streamed collection, from the config and the workflow's input groups (d: their widths):
    peak device memory = one block's weights + the modules before the blocks + the hidden states of all
    calibration tokens (kept on the device) + the float32 staged moments of one block (sum d^2 x 4) + one
    batch's activations; peak host memory = the float64 moments of one block (sum d^2 x 8) + the float32
    and float64 copies of the largest group while it is reduced + one block's weights as read;
    FLOPs = 2 x (block params + sum d^2) x blocks x tokens; reductions: sum d^2 x blocks x flushes."""
    p = probe(config)
    d2 = sum(d * d for d in p["dims"].values())
    layers = config.num_hidden_layers
    device = {"one block's weights": p["block"] * compute_bytes,
              "modules before the blocks (embedding)": p["before"] * compute_bytes,
              "hidden states of all calibration tokens": n_tokens * config.hidden_size * compute_bytes,
              "float32 staged moments of one block": d2 * 4,
              "activations of one batch (rough)": batch_tokens * (3 * config.intermediate_size
                                                                  + 2 * config.hidden_size) * compute_bytes}
    host = {"float64 moments of one block": d2 * 8,
            "float32 + float64 copies of the largest group in a flush": max(p["dims"].values()) ** 2 * 12,
            "one block's weights as read": p["block"] * storage_bytes}
    return {"probe": p, "device": device, "host": host,
            "flops": 2 * layers * (p["block"] + d2) * n_tokens,  # blocks' multiply-adds + x x^T accumulation
            "flush_elements": layers * math.ceil(n_batches / flush_every) * d2,
            "read_bytes": (p["total"] - p["head"]) * storage_bytes,  # the lm_head is never read
            "stats_bytes": layers * (d2 + 2 * sum(p["dims"].values())) * 8}


def print_terms(title: str, terms: dict) -> None:
    print(f"  {title}: {sum(terms.values()) / GB:.2f} GB = "
          + " + ".join(f"{v / GB:.2f} ({k})" for k, v in terms.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sfsd-streamed-bench")
    parser.add_argument("--large", default="2048,5632,40,16", help="hidden,intermediate,layers,heads[,kv_heads]")
    parser.add_argument("--small", default="1024,2816,24,16", help="a shape, or 'embedded' (SmolLM2-135M)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budget-gb", type=float, default=3.0, help="address space allowed above the warm-up")
    parser.add_argument("--mmap-threshold-mb", type=int, default=4, help=(
        "glibc MALLOC_MMAP_THRESHOLD_ of the runs (0: glibc's moving default, under which freed tensors' heap "
        "holes stay in the address space and the empty model's transient CPU allocations take ~2 GB of it)"))
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-tflops", type=float, default=30.0, help="float32 rate of the GPU of the estimate")
    parser.add_argument("--read-gbps", type=float, default=2.0, help="weights' read bandwidth, GB/s")
    parser.add_argument("--write-gbps", type=float, default=1.0, help="statistics' write bandwidth, GB/s")
    parser.add_argument("--pcie-gbps", type=float, default=25.0, help="device-to-host bandwidth, GB/s")
    args = parser.parse_args()
    started = time.perf_counter()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import build_weights, dense_tokens, embedded_model_dir, llama_config
    from transformers import AutoConfig

    from sfsd.features.calibration import tokens_digest
    from sfsd.defaults import default
    from sfsd.io import save_tensors
    from sfsd.provenance import tokenizer_digest

    embedded = embedded_model_dir(None)
    vocab = json.loads((embedded / "config.json").read_text())["vocab_size"]
    models = {}
    for role, shape in (("small", args.small), ("large", args.large)):
        if shape == "embedded":
            models[role] = (embedded, AutoConfig.from_pretrained(embedded))
            continue
        config = llama_config(shape, vocab)
        folder = args.work_dir / ("llama-" + shape.replace(",", "-"))
        print(f"weights of the {role} model: {folder}", flush=True)
        build_weights(config, folder, embedded, args.seed, args.shard_mb)
        models[role] = (folder, config)
    tokens = dense_tokens(embedded, args.sequences, args.seq_len)
    n_tokens = int(tokens["attention_mask"].sum())
    tokens_path = args.work_dir / "tokens.safetensors"
    save_tensors(tokens_path, tokens, {"digest": tokens_digest(tokens), "seq_len": args.seq_len,
                                       "tokenizer_digest": tokenizer_digest(embedded)})

    rows = []
    for role, mode, budget in (("small", "never", 0.0), ("small", "always", 0.0), ("large", "always", args.budget_gb),
                               ("large", "never", args.budget_gb)):
        folder, config = models[role]
        print(f"collecting: {role} model, streamed={mode}, budget {budget or 'none'} GB", flush=True)
        result = run(folder, tokens_path, args.work_dir / "stats" / f"{role}-{mode}", mode, budget,
                     args.mmap_threshold_mb)
        rows.append({"name": folder.name, "role": role, "mode": "streamed" if mode == "always" else "whole",
                     "params": probe(config)["total"], "budget": budget, **result,
                     "stored": sum(f.stat().st_size for f in folder.glob("*.safetensors"))})
    batch, flush_every = default("collection.batch_size"), default("collection.flush_every")
    print(f"\n{n_tokens} calibration tokens ({len(tokens['input_ids'])} x {args.seq_len}), CPU, "
          f"{torch.get_num_threads()} threads, dtype {default('collection.dtype')}, layers {default('layers')}, "
          f"batch {batch}, flush_every {flush_every}, MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold_mb or 'default'} "
          "MB\n")
    print("| model (params) | mode | memory cap | weights GB stored / f32 | peak RSS GB (above warm-up) | "
          "stats GB | wall s (collect s) | tokens/s |\n" + "|---" * 8 + "|")
    for r in rows:
        cap = f"+{r['budget']:.1f} GB AS ({r['cap'] / GB:.1f} GB)" if r["cap"] else "none"
        wall = f"{r['wall']:.1f} ({r['collect']:.1f})" if r["ok"] else "fails (out of memory)"
        rate = f"{n_tokens / r['wall']:.1f}" if r["ok"] else "-"
        print(f"| {r['name']} ({r['params'] / 1e9:.2f}B) | {r['mode']} | {cap} | {r['stored'] / GB:.2f} / "
              f"{r['params'] * 4 / GB:.2f} | {r['hwm'] / GB:.2f} ({(r['hwm'] - r['base']) / GB:+.2f}) | "
              f"{r['stats'] / GB:.2f} | {wall} | {rate} |")
    for r in rows:
        if not r["ok"]:
            print(f"\n{r['role']} {r['mode']} under the cap: {r['error']}")
    big, small = rows[2], rows[0]
    if not big["ok"]:
        sys.exit("the streamed run of the large model failed under the cap: raise --budget-gb")
    tps = [n_tokens / big["wall"], n_tokens / small["wall"]]
    print(f"\nstreamed large / whole small, tokens/s: {tps[0] / tps[1]:.3f}; params x tokens/s: large streamed "
          f"{big['params'] * tps[0]:.3g}, small whole {small['params'] * tps[1]:.3g}, "
          f"ratio {big['params'] * tps[0] / (small['params'] * tps[1]):.3f}")

    est = estimate(models["large"][1], n_tokens, batch * args.seq_len, math.ceil(len(tokens["input_ids"]) / batch),
                   flush_every)
    cpu_flops = est["flops"] / big["collect"]
    print("\nMemory model checked on the large streamed run (on the CPU, device and host terms share the RAM):")
    print_terms("device terms", est["device"])
    print_terms("host terms", est["host"])
    print(f"  predicted {(sum(est['device'].values()) + sum(est['host'].values())) / GB:.2f} GB above warm-up; "
          f"measured {(big['hwm'] - big['base']) / GB:.2f} GB")
    print(f"  effective CPU rate: {est['flops'] / 1e12:.2f} TFLOP in {big['collect']:.1f} s = {cpu_flops / 1e9:.1f} "
          "GFLOP/s (includes reading the weights, the float64 reductions and writing the statistics)")

    n_seq, seq_len = default("calibration.num_samples"), default("calibration.seq_len")
    e = estimate(llama_config("8192,28672,80,64,8", 128256), n_seq * seq_len, batch * seq_len,
                 math.ceil(n_seq / batch), flush_every)
    reduce_s = reduce_seconds_per_element()
    times = {"compute": e["flops"] / (args.gpu_tflops * 1e12), "read weights": e["read_bytes"] / (args.read_gbps * GB),
             "float64 reductions": e["flush_elements"] * (4 / (args.pcie_gbps * GB) + reduce_s),
             "write statistics": e["stats_bytes"] / (args.write_gbps * GB)}
    print(f"\nESTIMATE (not measured): 70B Llama ({e['probe']['total'] / 1e9:.1f}B params; input groups "
          f"{e['probe']['dims']}), {n_seq * seq_len} tokens (calibration defaults), float32, streamed on one 24 GB GPU")
    print_terms("peak device memory", e["device"])
    print_terms("peak host memory", e["host"])
    print(f"  time ~ {sum(times.values()) / 60:.0f} min = "
          + " + ".join(f"{v:.0f} s ({k})" for k, v in times.items()))
    print(f"    compute {e['flops'] / 1e15:.2f} PFLOP at {args.gpu_tflops:g} TFLOP/s; weights "
          f"{e['read_bytes'] / GB:.0f} GB at {args.read_gbps:g} GB/s; {e['flush_elements'] / 1e9:.0f}G elements "
          f"reduced (PCIe {args.pcie_gbps:g} GB/s + {reduce_s * 1e9:.2f} ns/element measured on this host); statistics "
          f"{e['stats_bytes'] / GB:.0f} GB at {args.write_gbps:g} GB/s")
    print(f"  on this machine's CPU at the effective rate above: ~{e['flops'] / cpu_flops / 3600:.0f} h of compute")
    print(f"\nscript wall time {time.perf_counter() - started:.0f} s; cache {args.work_dir}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        child(*sys.argv[2:6], float(sys.argv[6]))
    else:
        main()
