"""`python -m sfsd` subcommands that score models: task export, splits, evaluation, the scorer check,
result tables and paired comparisons, and the surgical rank search."""

from __future__ import annotations

import argparse
import logging

from sfsd.cli.options import METHOD_CHOICES, METRIC_HELP, add_dtype, csv_list, optional
from sfsd.defaults import choices, default
from sfsd.errors import ConfigError
from sfsd.tasks.registry import METRIC_CHOICES

PPL_BOS_HELP = ("where BOS goes in the perplexity windows: every_window (BOS + window-1 text tokens), "
                "first_window (the tokenizer's own, once at the start of the text), auto (the model family's)")


def add_parsers(sub) -> None:
    """This module's subcommands, on the subparsers of `sfsd.cli.main.build_parser`."""
    p = sub.add_parser("export-tasks", help="the six benchmarks as local lm-eval tasks (offline)")
    p.add_argument("--tasks", required=True)
    p.add_argument("--metrics", default="", help="comma-separated metric_list for every task (acc, acc_norm); "
                   "default: lm-eval's own (acc for boolq and winogrande, acc and acc_norm for the others)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_tasks)

    p = sub.add_parser("splits", help="seeded search/test doc ids of every task (calibration part left out)")
    p.add_argument("--tasks", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--calibration-fraction", type=float, required=True)
    p.add_argument("--search-fraction", type=float, required=True)
    p.add_argument("--source", choices=["local", "hub"], default=default("evaluation.source"),
                   help="local: the shipped validation docs; hub: lm-eval's own eval_docs (downloads them)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("evaluate", help="benchmarks (+ perplexity) of the base or a compressed model, as Parquet")
    p.add_argument("--model-dir", required=True, help="the base model (parameter counts refer to it)")
    p.add_argument("--compressed", default=None, help="a compressed model folder; omit for the base model")
    p.add_argument("--model-name", required=True)
    p.add_argument("--method", default="baseline")
    p.add_argument("--variant", required=True, help="plan name written to the rows (base, feature-p54, ...)")
    p.add_argument("--task-source", choices=["local", "hub"], default=default("evaluation.source"),
                   help="local: the exported tasks of --tasks-dir; hub: lm-eval's built-in tasks (downloads data)")
    p.add_argument("--tasks-dir", default=None, help="export-tasks folder (task source local)")
    p.add_argument("--tasks", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--split", choices=["search", "test"], default=default("evaluation.split"))
    p.add_argument("--limit", type=optional(int), default=default("evaluation.limit"),
                   help="first N docs of the split per task (none: all)")
    p.add_argument("--scorer", choices=["lm_eval", "native"], default=default("evaluation.scorer"),
                   help="native (exact, faster; checked against lm-eval by the check_scorer rule) or lm_eval")
    p.add_argument("--batch-size", type=int, default=default("evaluation.batch_size"))
    p.add_argument("--device", default=default("device"))
    add_dtype(p)
    p.add_argument("--ppl-source", default=default("evaluation.perplexity.source"),
                   help="lambada, coqa, wikitext2, text_file, jsonl_file or none")
    p.add_argument("--ppl-window", type=int, default=default("evaluation.perplexity.window"))
    p.add_argument("--ppl-bos", choices=choices("evaluation.perplexity.bos"),
                   default=default("evaluation.perplexity.bos"), help=PPL_BOS_HELP)
    p.add_argument("--ppl-max-docs", type=optional(int), default=default("evaluation.perplexity.max_docs"),
                   help="first N documents (none: all)")
    p.add_argument("--ppl-search-fraction", type=float, default=None,
                   help="leading fraction of the perplexity documents kept for the rank search and never scored "
                        "here (splits.search_fraction; required with a perplexity source); 0 scores them all")
    p.add_argument("--ppl-path", default=None, help="the file of the text_file / jsonl_file perplexity sources")
    p.add_argument("--ppl-text-field", default=default("evaluation.perplexity.text_field"),
                   help="JSONL field of the jsonl_file perplexity source")
    p.add_argument("--calibration-texts", default=None, help="texts.jsonl whose doc ids perplexity must skip")
    p.add_argument("--out", required=True)
    p.add_argument("--items-out", default=None, help="per-document / per-window scores (paired comparisons)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inference-speed", help="prefill and decode throughput and memory of the dense model or "
                       "one compressed folder (JSON; one process per model, for its peak memory)")
    p.add_argument("--model-dir", required=True, help="the dense model (parameter fractions refer to it)")
    p.add_argument("--compressed", type=optional(str), default=None, help="a compressed folder; none: the dense model")
    p.add_argument("--variant", required=True, help="name written to the output (base, feature-p54, ...)")
    p.add_argument("--device", default=default("device"))
    add_dtype(p)
    p.add_argument("--prompt-tokens", type=int, default=default("speed.prompt_tokens"))
    p.add_argument("--decode-tokens", type=int, default=default("speed.decode_tokens"))
    p.add_argument("--batch-sizes", default=",".join(map(str, default("speed.batch_sizes"))))
    p.add_argument("--repeats", type=int, default=default("speed.repeats"))
    p.add_argument("--out", required=True, help="JSON output")
    p.set_defaults(func=cmd_inference_speed)

    p = sub.add_parser("check-scorer", help="re-score the first test docs of every task with lm-eval and fail on "
                       "any difference from the native scorer")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--compressed", default=None, help="a compressed model folder; omit for the base model")
    p.add_argument("--task-source", choices=["local", "hub"], default=default("evaluation.source"))
    p.add_argument("--tasks-dir", default=None)
    p.add_argument("--tasks", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--limit", type=int, required=True, help="first N test docs per task")
    p.add_argument("--tolerance", type=optional(float), default=None,
                   help="largest |log-likelihood difference| per choice (none: the model dtype's, "
                        "sfsd.evaluate.scoring.CHECK_TOLERANCE)")
    p.add_argument("--batch-size", type=int, default=default("evaluation.batch_size"))
    p.add_argument("--device", default=default("device"))
    add_dtype(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_check_scorer)

    p = sub.add_parser("combine-results", help="concatenate result Parquet files")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_combine_results)

    p = sub.add_parser("paper-table", help="the SFSD paper's Table 1 for one model, as Markdown and CSV")
    p.add_argument("--results", required=True)
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("evaluation.metric"), help=METRIC_HELP)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.set_defaults(func=cmd_paper_table)

    p = sub.add_parser("comparisons", help="paired bootstrap differences between variants scored on the same "
                       "documents (MD + CSV)")
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("evaluation.metric"), help=METRIC_HELP)
    p.add_argument("--seed", type=int, default=default("evaluation.bootstrap.seed"),
                   help="seed of numpy.random.default_rng for the resamples")
    p.add_argument("--n-boot", type=int, default=default("evaluation.bootstrap.resamples"),
                   help="bootstrap resamples per pair")
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("inputs", nargs="+", help="results/<model>/eval/<variant>.docs.parquet files of one model")
    p.set_defaults(func=cmd_comparisons)

    p = sub.add_parser("search", help="surgical rank search (resumable) -> plan, log, curve, summary")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--factors", required=True, help="folder holding <method>/block_NNN.safetensors (factor-cache)")
    p.add_argument("--method", required=True, choices=METHOD_CHOICES)
    p.add_argument("--mode", required=True, choices=("accuracy", "loglik", "kl", "perplexity"))
    p.add_argument("--target", required=True, help="a task, 'average' (accuracy), or a perplexity source")
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("search.metric"), help=METRIC_HELP)
    p.add_argument("--delta", type=float, default=default("search.delta"),
                   help="accuracy: accepted drop from the baseline")
    p.add_argument("--eps", type=float, default=default("search.eps"), help="perplexity: growth allowed per step")
    p.add_argument("--order", default=",".join(default("search.order")))
    p.add_argument("--fractions", default=",".join(str(f) for f in default("search.fractions")))
    p.add_argument("--first-block", type=int, default=default("search.first_block"),
                   help="lowest block searched; negative counts from the top")
    p.add_argument("--last-block", type=optional(int), default=default("search.last_block"),
                   help="highest block searched (none: the top)")
    p.add_argument("--strategy", default=default("search.strategy"), choices=("bisect", "linear", "released"),
                   help="bisect; linear (the published scan); released (the released code's chunks and re-check)")
    p.add_argument("--loglik-delta", type=float, default=default("search.loglik_delta"),
                   help="loglik: accepted drop (nats) from the baseline")
    p.add_argument("--kl-max", type=float, default=default("search.kl_max"),
                   help="kl: accepted mean KL (nats) from the baseline")
    p.add_argument("--budgets", default=None, help="label=fraction,...: also save plans landed on these budgets "
                   "(checkpoints/<label>.json)")
    p.add_argument("--stop-at", type=optional(float), default=default("search.stop_at"),
                   help="stop once params fall to this fraction")
    p.add_argument("--convention", default=default("compression.convention"), choices=["model", "decoder_linear"])
    p.add_argument("--bias-compensation", default=default("compression.bias_compensation"),
                   choices=["intended", "none"])
    p.add_argument("--checkpoints", default=",".join(str(c) for c in default("search.checkpoints")) or "none",
                   help="save the plan when params first fall under these")
    p.add_argument("--layers", required=True)
    p.add_argument("--task-source", choices=["local", "hub"], default=default("evaluation.source"),
                   help="local = exported tasks in --tasks-dir; hub = lm-eval's own tasks (online)")
    p.add_argument("--tasks-dir", default=None)
    p.add_argument("--splits", required=True)
    p.add_argument("--tasks", required=True, help="tasks of the test-split curve (and of the 'average' target)")
    p.add_argument("--search-limit", type=optional(int), default=default("search.search_limit"),
                   help="search-split docs per task (none: all)")
    p.add_argument("--curve-limit", type=optional(int), default=default("search.curve_limit"),
                   help="test-split docs per task for the curve (none: all)")
    p.add_argument("--curve-every", type=int, default=default("search.curve_every"),
                   help="evaluate the test split every N finished blocks")
    p.add_argument("--ppl-window", type=int, default=default("evaluation.perplexity.window"))
    p.add_argument("--ppl-bos", choices=choices("evaluation.perplexity.bos"),
                   default=default("evaluation.perplexity.bos"), help=PPL_BOS_HELP)
    p.add_argument("--ppl-max-docs", type=optional(int), default=default("evaluation.perplexity.max_docs"),
                   help="first N perplexity documents (none: all)")
    p.add_argument("--ppl-search-fraction", type=float, required=True,
                   help="leading fraction of the perplexity documents searched on (splits.search_fraction)")
    p.add_argument("--ppl-path", default=None, help="the file of the text_file / jsonl_file perplexity targets")
    p.add_argument("--ppl-text-field", default=default("evaluation.perplexity.text_field"),
                   help="JSONL field of the jsonl_file perplexity target")
    p.add_argument("--calibration-texts", default=None, help="calibration JSONL whose docs perplexity text excludes")
    p.add_argument("--batch-size", type=int, default=default("search.batch_size"))
    p.add_argument("--device", default=default("device"))
    add_dtype(p)
    p.add_argument("--no-cache", action="store_true", help="full forwards for every candidate (the published cost)")
    p.add_argument("--cache-max-mb", type=float, default=default("search.cache_max_mb"),
                   help="bound on the cached block inputs")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_search)


def cmd_export_tasks(args: argparse.Namespace) -> None:
    from sfsd.tasks.lmeval import export_local_tasks

    manifest = export_local_tasks(args.out, csv_list(args.tasks), metrics=csv_list(args.metrics) or None)
    logging.info("exported %s", ", ".join(f"{t} ({v['n_docs']} docs)" for t, v in manifest["tasks"].items()))


def cmd_splits(args: argparse.Namespace) -> None:
    from sfsd.io import write_json
    from sfsd.tasks.splits import eval_splits

    out = eval_splits(csv_list(args.tasks), args.seed, args.calibration_fraction, args.search_fraction, source=args.source)
    write_json(args.out, out)
    logging.info("%s splits: %s", args.source, ", ".join(
        f"{t} {out['eval_split'][t]} {out['n_docs'][t]} docs -> search {len(v['search'])}, test {len(v['test'])}"
        for t, v in out["tasks"].items()))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sfsd.features.calibration import read_texts
    from sfsd.decompose.compress import load_compressed
    from sfsd.evaluate.harness import evaluate_lmeval_detailed
    from sfsd.evaluate.items import item_rows, with_golds, write_items
    from sfsd.io import checkpoint_metadata, model_digest
    from sfsd.tasks.lmeval import source_by_name
    from sfsd.model.loading import load_model, load_tokenizer
    from sfsd.evaluate.perplexity import perplexity, perplexity_texts, split_texts
    from sfsd.model.placement import placement
    from sfsd.decompose.plan import count_params, new_plan
    from sfsd.model.shapes import model_shapes
    from sfsd.evaluate.rows import common_columns, perplexity_row, summarize_scores, with_floor_rates, write_rows
    from sfsd.evaluate.scoring import build_requests, score_multiple_choice
    from sfsd.tasks.splits import read_split_ids

    if args.compressed:
        model, plan = load_compressed(args.compressed, device=args.device, dtype=args.dtype)
        tokenizer = load_tokenizer(args.compressed)
        method = args.method
    else:
        model, tokenizer = load_model(args.model_dir, dtype=args.dtype, device=args.device)
        plan, method = new_plan({}), "baseline"
    counts = count_params(model_shapes(args.model_dir), plan)
    tasks = csv_list(args.tasks)
    ids, n_docs = read_split_ids(args.splits, tasks, args.split, args.limit, args.task_source)
    source = source_by_name(args.task_source, args.tasks_dir)
    requests = build_requests(source, tasks, ids, n_docs=n_docs)  # lm-eval's own requests and gold labels
    if args.scorer == "lm_eval":
        rows, doc_scores = evaluate_lmeval_detailed(model, tokenizer, source, tasks, ids, batch_size=args.batch_size,
                                                    n_docs=n_docs)
    else:
        doc_scores = score_multiple_choice(model, tokenizer, requests, batch_size=args.batch_size)
        rows = summarize_scores(doc_scores)
    # each document's gold and choice count, and each task's majority-class rate and chance (the tables'
    # informative average compares the dense model with them)
    doc_scores = with_golds(doc_scores, requests)
    rows = with_floor_rates(rows, doc_scores)
    ppl, ppl_docs = None, []
    if args.ppl_source != "none":
        exclude = [d["doc_id"] for d in read_texts(args.calibration_texts)] if args.calibration_texts else []
        texts = perplexity_texts(args.ppl_source, path=args.ppl_path, text_field=args.ppl_text_field,
                                 exclude_ids=exclude, max_docs=args.ppl_max_docs)
        # the rank search tunes on the "search" part; every variant is scored on the rest
        if args.ppl_search_fraction is None:
            raise ConfigError("--ppl-search-fraction is required with a perplexity source (the search part of the "
                              "text, splits.search_fraction; 0 scores every document)")
        ppl_docs = split_texts(texts, args.ppl_search_fraction)["test"] if args.ppl_search_fraction else texts
        ppl = perplexity(model, tokenizer, ppl_docs, args.ppl_window, bos=args.ppl_bos)
        rows.append(perplexity_row(ppl, args.ppl_source, docs=ppl_docs))

    # what the compressed weights were cut from (the factor caches' calibration), recorded per row
    provenance = checkpoint_metadata(args.compressed) if args.compressed else {}
    common = common_columns(args.model_name, method, args.variant, counts, device=placement(model),
                            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                            limit=args.limit, model_digest=model_digest(args.model_dir),
                            calibration_digest=provenance.get("calibration_digest"))
    if args.items_out:
        write_items(args.items_out, item_rows(doc_scores, ppl, args.ppl_source, args.split), common,
                    [d["doc_id"] for d in ppl_docs], ppl_bos=ppl["bos"] if ppl else None)
    write_rows(args.out, rows, common)
    logging.info("evaluated %s/%s: %d rows", args.model_name, args.variant, len(rows))


def cmd_inference_speed(args: argparse.Namespace) -> None:
    from sfsd.decompose.compress import load_compressed
    from sfsd.io import write_json
    from sfsd.model.loading import load_model
    from sfsd.model.placement import input_device
    from sfsd.model.shapes import model_shapes
    from sfsd.evaluate.speed import SpeedSettings, measure, rss_mb

    before = rss_mb()
    if args.compressed:
        model, _ = load_compressed(args.compressed, device=args.device, dtype=args.dtype)
    else:
        model, _ = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    device = input_device(model)
    settings = SpeedSettings(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                             batch_sizes=tuple(int(b) for b in csv_list(args.batch_sizes)), repeats=args.repeats)
    row = measure(model, settings, device, model.config.vocab_size, rss_before=before)
    params = sum(p.numel() for p in model.parameters())
    row.update(variant=args.variant, params=params, params_fraction=params / model_shapes(args.model_dir).total_params)
    write_json(args.out, row)
    logging.info("%s: decode %.1f tok/s at batch 1, prefill %.0f tok/s", args.variant, row["decode_tok_s_b1"] or 0,
                 row["prefill_tok_s"])


def cmd_check_scorer(args: argparse.Namespace) -> None:
    from sfsd.decompose.compress import load_compressed
    from sfsd.errors import NumericalError
    from sfsd.evaluate.harness import evaluate_lmeval_detailed
    from sfsd.io import write_json
    from sfsd.tasks.lmeval import source_by_name
    from sfsd.model.loading import load_model, load_tokenizer
    from sfsd.evaluate.scoring import CHECK_TOLERANCE, build_requests, check_against_lmeval, score_multiple_choice
    from sfsd.tasks.splits import read_split_ids

    if args.compressed:
        model, _ = load_compressed(args.compressed, device=args.device, dtype=args.dtype)
        tokenizer = load_tokenizer(args.compressed)
    else:
        model, tokenizer = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    tasks = csv_list(args.tasks)
    ids, n_docs = read_split_ids(args.splits, tasks, "test", args.limit, args.task_source)
    source = source_by_name(args.task_source, args.tasks_dir)
    native = score_multiple_choice(model, tokenizer, build_requests(source, tasks, ids, n_docs=n_docs),
                                   batch_size=args.batch_size)
    _, reference = evaluate_lmeval_detailed(model, tokenizer, source, tasks, ids, batch_size=args.batch_size,
                                            n_docs=n_docs)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tolerance = CHECK_TOLERANCE[dtype] if args.tolerance is None else (args.tolerance, 0.0)
    report = check_against_lmeval(native, reference, *tolerance)
    if report["mismatches"]:
        first = report["mismatches"][0]
        raise NumericalError(f"the native scorer disagrees with lm-eval on {len(report['mismatches'])} of "
                             f"{report['docs']} documents (first: {first['task']} doc {first['doc_id']}: "
                             f"{first['what']}); score with evaluation.scorer lm_eval and report this")
    write_json(args.out, {**report, "tasks": tasks, "docs_per_task": args.limit, "dtype": dtype,
                          "model": args.compressed or args.model_dir})
    logging.info("native scorer = lm-eval on %d docs (%d choices) of %s: max |diff| %.2e", report["docs"],
                 report["choices"], ", ".join(tasks), report["max_abs_diff"])


def cmd_combine_results(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from sfsd.io import atomic_path
    from sfsd.evaluate.rows import combine

    table = combine(args.inputs)
    with atomic_path(args.out) as tmp:
        pq.write_table(table, tmp)
    logging.info("combined %d rows from %d files", table.num_rows, len(args.inputs))


def cmd_paper_table(args: argparse.Namespace) -> None:
    from sfsd.report.tables import paper_table

    paper_table(args.results, args.metric, args.out_md, args.out_csv)


def cmd_comparisons(args: argparse.Namespace) -> None:
    from sfsd.report.compare import comparisons_table

    rows = comparisons_table(args.inputs, args.metric, args.out_md, args.out_csv, seed=args.seed,
                             n_boot=args.n_boot)
    logging.info("comparisons: %d pairs of %d variants, %d bootstrap resamples (seed %d)", len(rows),
                 len(args.inputs), args.n_boot, args.seed)


def cmd_search(args: argparse.Namespace) -> None:
    from sfsd.search.settings import SearchSettings
    from sfsd.search.run import run_search

    settings = SearchSettings(
        method=args.method, mode=args.mode, target=args.target, metric=args.metric, delta=args.delta, eps=args.eps,
        order=tuple(csv_list(args.order)), fractions=tuple(float(f) for f in csv_list(args.fractions)),
        first_block=args.first_block, last_block=args.last_block, strategy=args.strategy, stop_at=args.stop_at,
        convention=args.convention, bias_compensation=args.bias_compensation,
        checkpoints=tuple(float(c) for c in csv_list(args.checkpoints) if c != "none"),
        loglik_delta=args.loglik_delta, kl_max=args.kl_max, budgets=_budgets(args.budgets))
    run_search(model_dir=args.model_dir, model_name=args.model_name, factors_dir=args.factors, out_dir=args.out,
               settings=settings, layers=csv_list(args.layers), tasks_dir=args.tasks_dir, splits_file=args.splits,
               task_source=args.task_source,
               tasks=csv_list(args.tasks), search_limit=args.search_limit, curve_limit=args.curve_limit,
               curve_every=args.curve_every, ppl_window=args.ppl_window, ppl_bos=args.ppl_bos,
               ppl_max_docs=args.ppl_max_docs,
               ppl_search_fraction=args.ppl_search_fraction, ppl_path=args.ppl_path,
               ppl_text_field=args.ppl_text_field, calibration_texts=args.calibration_texts,
               batch_size=args.batch_size, device=args.device, dtype=args.dtype, cache=not args.no_cache,
               cache_max_mb=args.cache_max_mb)


def _budgets(text: str | None) -> tuple[tuple[str, float], ...]:
    """'p54=0.806,p34=0.507' -> (("p54", 0.806), ("p34", 0.507)); a malformed item is a ConfigError."""
    out = []
    for item in csv_list(text or ""):
        label, _, value = item.partition("=")
        try:
            out.append((label, float(value)))
        except ValueError:
            raise ConfigError(f"--budgets item {item!r} is not <label>=<fraction> (e.g. p54=0.806)") from None
        if not label:
            raise ConfigError(f"--budgets item {item!r} has no label (e.g. p54=0.806)")
    return tuple(out)
