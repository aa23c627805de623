"""Multiple-choice scoring speed: lm-eval against the native scorer, on the same documents, in one run.

Scores the first --docs test documents of every task with lm-eval (HFLM on the in-memory model,
simple_evaluate with samples=, as the evaluate stage's `scorer: lm_eval`) and with the native scorer
(`scorer: native`: each document's shared context once through a KV cache, the lm_head only on scored
positions), checks that they agree (acc and acc_norm identical, every choice's log-likelihood within
1e-4), and prints documents per second of each, per task and over all tasks, and their ratio.

It also prints the ratio of the forward WORK of the two (model input tokens, the lm_head counted at the
positions each computes it): on a CPU, where a forward is bound by its matrix products, that ratio is the
most an exact scorer can gain, whatever its implementation. Each timing runs --repeats times (the best
is reported: the machine may be shared).

    snakemake --cores 2 results/tasks results/splits.json    # once (or any workflow run)
    python workflow/benchmarks/scoring_speed.py [--docs 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars would bury the table

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embedded_model_dir  # noqa: E402

from sfsd.evaluate.harness import evaluate_lmeval_detailed  # noqa: E402
from sfsd.evaluate.scoring import build_requests, check_against_lmeval, encode_requests, forward_work, \
    lmeval_max_length, score_multiple_choice  # noqa: E402
from sfsd.model.loading import load_model
from sfsd.model.placement import resolve_device
from sfsd.tasks.lmeval import source_by_name  # noqa: E402
from sfsd.tasks.registry import TASKS  # noqa: E402
from sfsd.tasks.splits import read_split_ids  # noqa: E402


def best_time(fn, repeats: int):
    """(best wall seconds, the last result) of `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the workflow's embedded model")
    parser.add_argument("--results", type=Path, default=Path("results"), help="holds tasks/ and splits.json")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--docs", type=int, default=30, help="first N test docs per task")
    parser.add_argument("--batch-size", type=int, default=8, help="as evaluation.batch_size, for both scorers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval's per-call chatter

    device = resolve_device(args.device)
    model, tokenizer = load_model(embedded_model_dir(args.model_dir), device=str(device))
    source = source_by_name("local", args.results / "tasks")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    max_length = lmeval_max_length(model, tokenizer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.docs} test docs per task; batch size {args.batch_size}; "
          f"best of {args.repeats}")
    print(f"{'task':<14} {'docs':>5} {'lm-eval docs/s':>15} {'native docs/s':>14} {'speed-up':>9} "
          f"{'work ratio':>11} {'max |dll|':>10} {'acc diffs':>10}")
    totals = {"lm": 0.0, "native": 0.0, "docs": 0, "work_lm": 0.0, "work_native": 0.0}
    for task in tasks:
        ids, n_docs = read_split_ids(args.results / "splits.json", [task], "test", args.docs)

        def native():
            requests = build_requests(source, [task], ids, n_docs=n_docs)
            enc = encode_requests(tokenizer, requests, max_length)
            return score_multiple_choice(model, tokenizer, enc, args.batch_size), enc

        t_native, (scores, enc) = best_time(native, args.repeats)
        t_lm, (_, reference) = best_time(
            lambda: evaluate_lmeval_detailed(model, tokenizer, source, [task], ids, args.batch_size, n_docs=n_docs),
            args.repeats)
        check = check_against_lmeval(scores, reference)
        work = forward_work(enc, model)
        wrong = sum(1 for m in check["mismatches"] if m["what"].startswith("acc"))
        n = len(scores)
        print(f"{task:<14} {n:>5} {n / t_lm:>15.2f} {n / t_native:>14.2f} {t_lm / t_native:>8.2f}x "
              f"{work['lm_eval'] / work['native']:>10.2f}x {check['max_abs_diff']:>10.1e} {wrong:>10}")
        if check["mismatches"]:
            print(f"  DISAGREEMENT: {check['mismatches'][:3]}")
        totals["lm"] += t_lm
        totals["native"] += t_native
        totals["docs"] += n
        totals["work_lm"] += work["lm_eval"]
        totals["work_native"] += work["native"]
    n = totals["docs"]
    print(f"{'all':<14} {n:>5} {n / totals['lm']:>15.2f} {n / totals['native']:>14.2f} "
          f"{totals['lm'] / totals['native']:>8.2f}x {totals['work_lm'] / totals['work_native']:>10.2f}x")
    print(f"ratio (lm-eval seconds / native seconds, all tasks): {totals['lm'] / totals['native']:.2f}")
    print(f"work ratio (the bound of an exact scorer where matrix products dominate): "
          f"{totals['work_lm'] / totals['work_native']:.2f}")


if __name__ == "__main__":
    main()
