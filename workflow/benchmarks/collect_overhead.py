"""Feature collection cost versus a plain forward pass, measured and predicted.

Prints (collection wall time) / (plain full forward over the same tokens) beside the ratio that
multiply-add counts predict: (blocks + accumulation GEMMs) / (blocks + lm_head). Target: the
measured ratio within 1.25x of the predicted one.

    python workflow/benchmarks/collect_overhead.py [--sequences 64 --seq-len 128 --batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_tokens, embedded_model_dir  # noqa: E402

from sfsd.features.collect import collect_input_moments  # noqa: E402
from sfsd.model.loading import load_model  # noqa: E402
from sfsd.model.registry import architecture_of, blocks_of, get_arch, groups_for, select_linears  # noqa: E402


def macs_per_token(model, spec, groups: list[str], seq_len: int) -> dict[str, float]:
    """Multiply-adds per token of the blocks, of the moment accumulation and of the lm_head."""
    cfg = model.config
    blocks = blocks_of(model, spec)
    linear = sum(m.in_features * m.out_features for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # scores and weighted values: 2 * heads * head_dim per attended position, (T+1)/2 positions on average
    attention = len(blocks) * 2 * cfg.num_attention_heads * head_dim * (seq_len + 1) / 2
    first = {g: spec.input_groups[g][0] for g in groups}
    accumulate = sum(
        blocks[0].get_submodule(spec.linears[first[g]]).in_features ** 2 for g in groups
    ) * len(blocks)
    head = model.get_output_embeddings().weight.numel()
    return {"blocks": linear + attention, "accumulate": accumulate, "lm_head": head}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model_dir = embedded_model_dir(args.model_dir)
    model, _ = load_model(model_dir, dtype=args.dtype, device=args.device)
    spec = get_arch(architecture_of(model.config))
    groups = groups_for(spec, select_linears(spec, list(spec.linears)))
    tokens = dense_tokens(model_dir, args.sequences, args.seq_len)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    device = next(model.parameters()).device
    n_tokens = int(mask.sum())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with torch.inference_mode():
            for s in range(0, ids.shape[0], args.batch_size):
                model(input_ids=ids[s : s + args.batch_size].to(device),
                      attention_mask=mask[s : s + args.batch_size].to(device), use_cache=False)
        sync()

    def collect():
        collect_input_moments(model, spec, groups, ids, mask, args.batch_size, progress=False)
        sync()

    forward()  # warm-up (allocator, kernels)
    t_forward, t_collect = [], []
    for _ in range(args.repeats):  # interleaved, so drift of a noisy machine hits both alike
        t_forward.append(best_of(forward, 1))
        t_collect.append(best_of(collect, 1))
    t_f, t_c = min(t_forward), min(t_collect)
    macs = macs_per_token(model, spec, groups, args.seq_len)
    predicted = (macs["blocks"] + macs["accumulate"]) / (macs["blocks"] + macs["lm_head"])
    measured = t_c / t_f
    print(f"model {model_dir} on {device} ({args.dtype}), {n_tokens} tokens, batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"MACs/token: blocks {macs['blocks'] / 1e6:.1f}M, accumulation {macs['accumulate'] / 1e6:.1f}M, "
          f"lm_head {macs['lm_head'] / 1e6:.1f}M")
    print(f"plain forward   {t_f:8.3f} s  ({n_tokens / t_f:,.0f} tok/s)")
    print(f"collection      {t_c:8.3f} s  ({n_tokens / t_c:,.0f} tok/s)")
    print(f"measured ratio  {measured:.3f}")
    print(f"predicted ratio {predicted:.3f}")
    print(f"measured / predicted = {measured / predicted:.3f}  (target <= 1.25: {'met' if measured / predicted <= 1.25 else 'NOT met'})")


if __name__ == "__main__":
    main()
