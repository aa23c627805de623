"""The published surgical search (linear scan, a full forward per candidate) against ours (bisection with
the block-input cache), on the embedded model with the same settings; for the multiple-choice modes also
the released code's procedure (three chunks of the search split, the largest accepted rank, a re-check on
the whole split: strategy released, full forwards as the released code runs them).

Prints the rank each search chose for every layer (they must agree; every difference is listed with the
scores that explain it), the work of each in block forwards (sequences x transformer blocks run, a
deterministic counter: baseline + recorded block inputs + candidate evaluations; the test-split curve is
left out of both), and the ratio. Target: >= 10x fewer block forwards with identical plans.

    snakemake --cores 2          # once, for results/<model>/factors and results/tasks, results/splits.json
    python workflow/benchmarks/search_cost.py [--mode perplexity --first-block -1 --ppl-max-docs 100]
    python workflow/benchmarks/search_cost.py --mode accuracy --target arc_easy --first-block 28 --search-limit 10
    python workflow/benchmarks/search_cost.py --mode accuracy --target average --first-block -1 --search-limit 9

The ratio depends on how deep the search goes: the cache runs only the blocks from the current one up,
so its gain is largest near the top (about n_blocks / (n_blocks - block)) and bisection's is about
(evaluations of the scan) / (log2(candidates) + 1) at every depth.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sfsd.search.run import run_search
from sfsd.search.settings import SearchSettings
from sfsd.tasks.registry import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--method", default="feature")
    parser.add_argument("--mode", default="perplexity", choices=["accuracy", "loglik", "kl", "perplexity"],
                        help="perplexity (default) is close to monotone in rank; accuracy on a small split is not")
    parser.add_argument("--target", default=None, help="a task or 'average' (accuracy), lambada or coqa (perplexity)")
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--ppl-max-docs", type=int, default=100, help="perplexity: docs (the first part searched)")
    parser.add_argument("--ppl-search-fraction", type=float, default=0.2, help="as splits.search_fraction")
    parser.add_argument("--metric", default="paper", help="as search.metric")
    parser.add_argument("--delta", type=float, default=0.02)
    parser.add_argument("--first-block", type=int, default=-1, help="negative counts from the top")
    parser.add_argument("--search-limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.results / "models" / args.model
    target = args.target or ("lambada" if args.mode == "perplexity" else "arc_easy")
    settings = SearchSettings(method=args.method, mode=args.mode, target=target, metric=args.metric,
                              delta=args.delta, eps=args.eps, first_block=args.first_block, checkpoints=())
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sfsd-search-cost-") as tmp:
        strategies = [("published", "linear", False), ("ours", "bisect", True)]
        if args.mode != "perplexity":  # the released perplexity search is the linear scan itself
            strategies.append(("released", "released", False))
        for name, strategy, cache in strategies:
            out = Path(tmp) / f"{name}-{args.method}-{args.mode}-{target}"
            start = time.perf_counter()
            summary = run_search(
                model_dir=str(model_dir), model_name=args.model, factors_dir=str(args.results / args.model / "factors"),
                out_dir=str(out), settings=SearchSettings(**{**settings.__dict__, "strategy": strategy}),
                layers=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                tasks_dir=str(args.results / "tasks"), splits_file=str(args.results / "splits.json"),
                tasks=list(TASKS), search_limit=args.search_limit, curve_limit=1, batch_size=args.batch_size,
                ppl_max_docs=args.ppl_max_docs, ppl_search_fraction=args.ppl_search_fraction,
                calibration_texts=str(args.results / "calibration" / "texts.jsonl"),
                device="cpu", cache=cache, progress=False, with_curve=False)
            seconds = time.perf_counter() - start
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            runs[name] = (summary, log, seconds)

    (pub, pub_log, pub_s), (our, our_log, our_s) = runs["published"], runs["ours"]
    data = (f"{args.metric}, delta {args.delta}, {args.search_limit} search docs per task" if args.mode == "accuracy"
            else f"ppl, eps {args.eps}, first 20% of {args.ppl_max_docs} docs")
    print(f"model {args.model}, method {args.method}, {args.mode} search on {target} ({data}), first block "
          f"{args.first_block}, baseline {pub['baseline']:.4f}")
    print(f"{'layer':<16}{'kappa':>6}{'published':>11}{'ours':>7}{'evals pub/ours':>16}")
    differences = []
    for a, b in zip(pub_log, our_log, strict=True):
        ra = "dense" if a["rank"] is None else a["rank"]
        rb = "dense" if b["rank"] is None else b["rank"]
        print(f"{a['layer']:<16}{a['kappa']:>6}{ra!s:>11}{rb!s:>7}{len(a['tried']):>10}/{len(b['tried'])}")
        if a["rank"] != b["rank"]:
            differences.append((a, b))
    for a, b in differences:
        scan = ", ".join(f"r{t['rank']}={t['score']:.4f}{'+' if t['accepted'] else '-'}" for t in a["tried"])
        bis = ", ".join(f"r{t['rank']}={t['score']:.4f}{'+' if t['accepted'] else '-'}" for t in b["tried"])
        print(f"  {a['layer']}: differs. published scan {scan}; bisection {bis} (threshold {a['threshold']:.4f}). "
              "Acceptance is not monotone in rank here (or an earlier difference changed the model), so the "
              "scan's first accepted rank is one bisection never visits.")
    fwd_pub, fwd_our = pub["search_block_forwards"], our["search_block_forwards"]
    print(f"plans identical: {not differences} ({len(pub_log) - len(differences)}/{len(pub_log)} layers agree)")
    print(f"evaluations: published {pub['evaluations']}, ours {our['evaluations']}")
    print(f"block forwards: published {fwd_pub} {pub['forwards']}, ours {fwd_our} {our['forwards']}")
    print(f"block-forward ratio published/ours: {fwd_pub / fwd_our:.2f} (target >= 10)")
    print(f"wall time: published {pub_s:.1f} s, ours {our_s:.1f} s, ratio {pub_s / our_s:.2f} "
          f"(includes model loading and the lm_head, which the counter leaves out)")
    print(f"params after search: {our.get('params_model_fraction', 1.0):.4f} of the model; "
          f"cache peak {our['cache_peak_mb']:.1f} MB")
    if "released" in runs:
        rel, rel_log, rel_s = runs["released"]
        agree = sum(a["rank"] == b["rank"] for a, b in zip(rel_log, our_log, strict=True))
        print(f"released procedure (3 chunks + re-check, full forwards): {rel['evaluations']} evaluations, "
              f"{rel['search_block_forwards']} block forwards {rel['forwards']}, {rel_s:.1f} s; "
              f"ratio released/ours {rel['search_block_forwards'] / fwd_our:.2f}; its ranks agree with ours on "
              f"{agree}/{len(rel_log)} layers; params {rel.get('params_model_fraction', 1.0):.4f}")


if __name__ == "__main__":
    main()
