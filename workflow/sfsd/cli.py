"""Thin entry points that the Snakemake rules call (`python -m sfsd <stage> ...`).

Each stage also runs on its own outside Snakemake. Errors a user can fix print as one line
("error: ...") with exit status 2; outputs are written atomically, so a failed stage leaves none.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .defaults import block_range, default
from .errors import ConfigError, SfsdError
from .tasks import METRIC_CHOICES

# plan.FACTOR_METHODS, written out so that parsing options imports no torch (a test keeps the two equal)
METHOD_CHOICES = ("feature", "weight", "whitened", "asvd")


METRIC_HELP = ("paper (default): per task the metric lm-eval defines and the SFSD paper reports (acc for boolq "
               "and winogrande, acc_norm for the others); acc or acc_norm: that one (acc_norm only for tasks "
               "whose lm-eval config defines it)")


def _optional(kind: type):
    """An option type for a nullable setting: `none` (or `null`) is None, anything else `kind`."""

    def parse(value: str):
        return None if value.lower() in ("none", "null") else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its error line
    return parse


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from .models import convert_embedded, download_hub_model

    if args.source == "embedded":
        convert_embedded(args.name, args.out)
    else:
        download_hub_model(args.name, args.revision, args.out)


def cmd_calibration_texts(args: argparse.Namespace) -> None:
    from .calibration import CalibrationSettings, sample_texts
    from .io import atomic_path

    raw = json.loads(args.settings)
    if "tasks" in raw:
        raw["tasks"] = tuple(raw["tasks"])
    docs = sample_texts(CalibrationSettings(**raw))
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    logging.info("wrote %d calibration texts to %s", len(docs), args.out)


def cmd_tokenize(args: argparse.Namespace) -> None:
    from .calibration import read_texts, tokenize, tokens_digest
    from .io import file_digest, model_digest, save_tensors
    from .models import load_tokenizer
    from .provenance import stamp, tokenizer_digest

    docs = read_texts(args.texts)
    tokens = tokenize([d["text"] for d in docs], load_tokenizer(args.model_dir), args.seq_len)
    digest = tokens_digest(tokens)
    save_tensors(
        args.out,
        tokens,
        {"digest": digest, "seq_len": args.seq_len, "tokens": int(tokens["attention_mask"].sum()),
         "sequences": int(tokens["input_ids"].shape[0]),
         **stamp(model_digest(args.model_dir), digest, {"seq_len": args.seq_len},
                 tokenizer_digest=tokenizer_digest(args.model_dir), texts_digest=file_digest(args.texts)[:16])},
    )
    logging.info("tokenized %d texts into %d real tokens (digest %s)", len(docs),
                 int(tokens["attention_mask"].sum()), digest)


def cmd_collect(args: argparse.Namespace) -> None:
    from .collect import run_collect

    run_collect(
        args.model_dir, args.tokens, args.out, model_name=args.model_name, layers=_csv(args.layers),
        dtype=args.dtype, device=args.device, batch_size=args.batch_size, flush_every=args.flush_every,
    )


def cmd_eigen(args: argparse.Namespace) -> None:
    from .eigen import run_eigen

    result = run_eigen(args.features, args.model_dir, args.out, _csv(args.layers), args.save_dtype)
    logging.info("block %d: eigh %.2f s", result["block"], result["eigh_seconds"])


def cmd_eigen_summary(args: argparse.Namespace) -> None:
    from .eigen import summarize
    from .io import write_json

    write_json(args.out, summarize([Path(p) for p in args.inputs]))


def cmd_factor_cache(args: argparse.Namespace) -> None:
    from .arch import architecture_of, get_arch, select_linears
    from .compress import cached_statistics
    from .factor_cache import save_factor_cache
    from .io import atomic_dir, model_digest
    from .models import load_model

    model, _ = load_model(args.model_dir, device="cpu")
    spec = get_arch(architecture_of(model.config))
    digest = model_digest(args.model_dir)
    eigen, features = cached_statistics(args.results, model_digest=digest)
    with atomic_dir(args.out) as tmp:
        paths = save_factor_cache(model, spec, args.method, select_linears(spec, _csv(args.layers)), tmp, eigen,
                                  features, model_digest=digest, jitter=args.jitter)
    logging.info("wrote %d blocks of %s factors at rank kappa-1", len(paths), args.method)


def cmd_make_plan(args: argparse.Namespace) -> None:
    from .arch import get_arch, select_linears
    from .io import model_digest, write_json
    from .plan import budget_plan, count_params, model_shapes
    from .provenance import stamp

    shapes = model_shapes(args.model_dir)
    spec = get_arch(shapes.architecture)
    first = block_range(args.first_block, None, shapes.n_blocks, "--first-block").start
    linears = select_linears(spec, _csv(args.layers))
    digest = model_digest(args.model_dir)
    header = dict(model=args.model_name, model_digest=digest, architecture=shapes.architecture,
                  bias_compensation=args.bias_compensation)
    settings = {"method": args.method, "params_fraction": args.params_fraction, "first_block": first,
                "layers": _csv(args.layers), "convention": args.convention, "bias_compensation": args.bias_compensation,
                "allocation": args.allocation}
    calibration = None  # a uniform plan reads no statistics
    if args.allocation == "uniform":
        plan = budget_plan(spec, shapes, linears, args.params_fraction, args.method, blocks=range(first, shapes.n_blocks),
                           convention=args.convention, **header)
    else:
        plan, calibration = _allocated_plan(args, spec, shapes, linears, range(first, shapes.n_blocks), digest, header)
        settings["search"] = args.search
    plan["notes"]["counts"] = count_params(shapes, plan)
    plan["notes"]["provenance"] = stamp(digest, calibration, settings)
    write_json(args.out, plan)
    logging.info("%s plan %s: %.4f of the %s parameters", args.allocation, args.out, plan["notes"]["params_fraction"],
                 args.convention)


def _allocated_plan(args, spec, shapes, linears, blocks: range, digest, header) -> tuple[dict, str | None]:
    """A spectral plan, or a searched one: the search's own plan where it landed on the budget
    (checkpoints/<label>.json), else its decisions completed by the spectral allocation of the rest."""
    from pathlib import Path

    from .allocate import layer_spectra, spectral_plan
    from .compress import BlockFile
    from .factor_cache import factor_spectrum
    from .collect import block_file
    from .io import read_json
    from .plan import budget_plan, count_params, layer_key

    if not args.factors:
        raise ConfigError(f"make-plan --allocation {args.allocation} needs --factors (the factor cache root)")
    files: dict[int, BlockFile] = {}

    def read(block: int, linear: str):
        if block not in files:
            files[block] = BlockFile(Path(args.factors) / args.method / block_file(block), digest)
        return factor_spectrum(files[block], linear, args.bias_compensation)

    fixed, uniform = {}, None
    keys = [layer_key(b, n) for b in blocks for n in linears]
    if args.allocation == "searched":
        if not args.search or not args.budget_label:
            raise ConfigError("make-plan --allocation searched needs --search (a search folder) and --budget-label")
        uniform = budget_plan(spec, shapes, linears, args.params_fraction, args.method,
                              blocks=blocks, convention=args.convention, **header)
        size = count_params(shapes, uniform)[args.convention]["compressed"]
        landed = Path(args.search) / "checkpoints" / f"{args.budget_label}.json"
        plan = read_json(landed) if landed.is_file() else None
        if plan is not None and plan.get("notes", {}).get("builder") == "search-budget":
            plan = _to_size(shapes, plan, size, args.convention)
            plan["notes"].update({"builder": "searched", "search": args.search, "completed_layers": 0,
                                  "params_fraction": _fraction(shapes, plan, args.convention)})
            searched = read_json(Path(args.search) / "plan.json").get("notes", {}).get("provenance", {})
            return plan, searched.get("calibration_digest")
        fixed = _feasible_prefix(Path(args.search), shapes, keys, args.method, size, args.convention, header)
    keys = [k for k in keys if k not in fixed]
    spectra = layer_spectra(spec, shapes, keys, read)
    plan = spectral_plan(spec, shapes, linears, args.params_fraction, args.method, spectra,
                         blocks=blocks, convention=args.convention, fixed=fixed,
                         groups=args.spectral_groups, uniform=uniform, **header)
    if args.allocation == "searched":
        plan["notes"].update({"builder": "searched", "search": args.search, "completed_layers": len(spectra)})
    calibration = {f.metadata.get("calibration_digest") for f in files.values()}
    return plan, (calibration.pop() if len(calibration) == 1 else None)


def _to_size(shapes, plan: dict, size: int, convention: str) -> dict:
    """A search's plan landed on a budget, its crossing layer's rank lowered (never below the rank the
    search accepted) until the plan keeps at most `size` parameters: the uniform plan's count, which lies
    under the budget by up to a rank step per layer, so every allocation compares at the same size."""
    from .plan import count_params, largest_fitting

    notes = plan.get("notes", {})
    key, accepted = notes.get("crossing_layer"), notes.get("accepted_rank")
    entry = plan["layers"].get(key, {})
    if entry.get("rank") is None or accepted is None:
        return plan

    def fits(rank: int) -> bool:
        return count_params(shapes, {**plan, "layers": {**plan["layers"], key: {**entry, "rank": rank}}})[convention][
            "compressed"] <= size

    plan["layers"][key] = {**entry, "rank": largest_fitting(fits, min(accepted, entry["rank"]), entry["rank"])}
    return plan


def _feasible_prefix(search, shapes, keys, method: str, size: int, convention: str, header) -> dict:
    """The search's decisions, in its order, up to the last one that still lets the layers it did not
    decide reach `size` parameters at rank 1 (a search that ends above the budget after covering every
    targeted layer keeps only its top decisions; the spectral allocation takes the rest)."""
    from .io import read_json
    from .plan import count_params, new_plan

    decided = read_json(search / "plan.json")["layers"]
    log_path = search / "log.jsonl"
    order = [json.loads(line)["layer"] for line in log_path.read_text().splitlines()] if log_path.is_file() \
        else list(decided)
    order = [k for k in order if k in decided]
    for n in range(len(order), -1, -1):
        fixed = {k: decided[k] for k in order[:n]}
        trial = new_plan({**{k: {"method": method, "rank": 1} for k in keys if k not in fixed}, **fixed}, **header)
        if count_params(shapes, trial)[convention]["compressed"] <= size:
            if n < len(order):
                logging.info("the search's first %d of %d decisions fit the budget; the rest is allocated spectrally",
                             n, len(order))
            return fixed
    return {}


def _fraction(shapes, plan, convention: str) -> float:
    from .plan import count_params

    return count_params(shapes, plan)[convention]["fraction"]


def cmd_compress(args: argparse.Namespace) -> None:
    from .arch import architecture_of, get_arch
    from .compress import save_compressed
    from .factor_cache import apply_cached_plan
    from .io import model_digest, read_json
    from .models import load_model

    model, tokenizer = load_model(args.model_dir, device="cpu")
    spec = get_arch(architecture_of(model.config))
    plan = read_json(args.plan)
    applied = apply_cached_plan(model, spec, plan, args.factors, model_digest=model_digest(args.model_dir))
    save_compressed(model, applied["plan"], args.out, tokenizer=tokenizer, factors=applied["provenance"])
    logging.info("compressed %d layers into %s", len(applied["layers"]), args.out)


def cmd_export_tasks(args: argparse.Namespace) -> None:
    from .lmeval_tasks import export_local_tasks

    manifest = export_local_tasks(args.out, _csv(args.tasks), metrics=_csv(args.metrics) or None)
    logging.info("exported %s", ", ".join(f"{t} ({v['n_docs']} docs)" for t, v in manifest["tasks"].items()))


def cmd_splits(args: argparse.Namespace) -> None:
    from .io import write_json
    from .splits import eval_splits

    out = eval_splits(_csv(args.tasks), args.seed, args.calibration_fraction, args.search_fraction, source=args.source)
    write_json(args.out, out)
    logging.info("%s splits: %s", args.source, ", ".join(
        f"{t} {out['eval_split'][t]} {out['n_docs'][t]} docs -> search {len(v['search'])}, test {len(v['test'])}"
        for t, v in out["tasks"].items()))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .calibration import read_texts
    from .compress import WEIGHTS_FILE, load_compressed
    from .evaluate import evaluate_lmeval_detailed
    from .items import item_rows, write_items
    from .io import model_digest, read_metadata
    from .lmeval_tasks import source_by_name
    from .models import load_model, load_tokenizer, resolve_device
    from .perplexity import perplexity, perplexity_texts, split_texts
    from .plan import count_params, model_shapes, new_plan
    from .rows import common_columns, perplexity_row, summarize_scores, write_rows
    from .scoring import build_requests, score_multiple_choice
    from .splits import read_split_ids

    device = resolve_device(args.device)
    if args.compressed:
        model, plan = load_compressed(args.compressed, device=device)
        tokenizer = load_tokenizer(args.compressed)
        method = args.method
    else:
        model, tokenizer = load_model(args.model_dir, device=str(device))
        plan, method = new_plan({}), "baseline"
    counts = count_params(model_shapes(args.model_dir), plan)
    tasks = _csv(args.tasks)
    ids, n_docs = read_split_ids(args.splits, tasks, args.split, args.limit, args.task_source)
    source = source_by_name(args.task_source, args.tasks_dir)
    if args.scorer == "lm_eval":
        rows, doc_scores = evaluate_lmeval_detailed(model, tokenizer, source, tasks, ids, batch_size=args.batch_size,
                                                    n_docs=n_docs)
    else:
        doc_scores = score_multiple_choice(model, tokenizer, build_requests(source, tasks, ids, n_docs=n_docs),
                                           batch_size=args.batch_size)
        rows = summarize_scores(doc_scores)
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
        ppl = perplexity(model, tokenizer, ppl_docs, args.ppl_window)
        rows.append(perplexity_row(ppl, args.ppl_source, docs=ppl_docs))

    # what the compressed weights were cut from (the factor caches' calibration), recorded per row
    provenance = read_metadata(Path(args.compressed) / WEIGHTS_FILE) if args.compressed else {}
    common = common_columns(args.model_name, method, args.variant, counts, device=str(device),
                            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                            limit=args.limit, model_digest=model_digest(args.model_dir),
                            calibration_digest=provenance.get("calibration_digest"))
    if args.items_out:
        write_items(args.items_out, item_rows(doc_scores, ppl, args.ppl_source, args.split), common,
                    [d["doc_id"] for d in ppl_docs])
    write_rows(args.out, rows, common)
    logging.info("evaluated %s/%s: %d rows", args.model_name, args.variant, len(rows))


def cmd_check_scorer(args: argparse.Namespace) -> None:
    from .compress import load_compressed
    from .errors import NumericalError
    from .evaluate import evaluate_lmeval_detailed
    from .io import write_json
    from .lmeval_tasks import source_by_name
    from .models import load_model, load_tokenizer, resolve_device
    from .scoring import build_requests, check_against_lmeval, score_multiple_choice
    from .splits import read_split_ids

    device = resolve_device(args.device)
    if args.compressed:
        model, _ = load_compressed(args.compressed, device=device)
        tokenizer = load_tokenizer(args.compressed)
    else:
        model, tokenizer = load_model(args.model_dir, device=str(device))
    tasks = _csv(args.tasks)
    ids, n_docs = read_split_ids(args.splits, tasks, "test", args.limit, args.task_source)
    source = source_by_name(args.task_source, args.tasks_dir)
    native = score_multiple_choice(model, tokenizer, build_requests(source, tasks, ids, n_docs=n_docs),
                                   batch_size=args.batch_size)
    _, reference = evaluate_lmeval_detailed(model, tokenizer, source, tasks, ids, batch_size=args.batch_size,
                                            n_docs=n_docs)
    report = check_against_lmeval(native, reference, args.tolerance)
    if report["mismatches"]:
        first = report["mismatches"][0]
        raise NumericalError(f"the native scorer disagrees with lm-eval on {len(report['mismatches'])} of "
                             f"{report['docs']} documents (first: {first['task']} doc {first['doc_id']}: "
                             f"{first['what']}); score with evaluation.scorer lm_eval and report this")
    write_json(args.out, {**report, "tasks": tasks, "docs_per_task": args.limit, "model": args.compressed or args.model_dir})
    logging.info("native scorer = lm-eval on %d docs (%d choices) of %s: max |diff| %.2e", report["docs"],
                 report["choices"], ", ".join(tasks), report["max_abs_diff"])


def cmd_combine_results(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from .io import atomic_path
    from .rows import combine

    table = combine(args.inputs)
    with atomic_path(args.out) as tmp:
        pq.write_table(table, tmp)
    logging.info("combined %d rows from %d files", table.num_rows, len(args.inputs))


def cmd_paper_table(args: argparse.Namespace) -> None:
    from .tables import paper_table

    paper_table(args.results, args.metric, args.out_md, args.out_csv)


def cmd_comparisons(args: argparse.Namespace) -> None:
    from .compare import comparisons_table

    rows = comparisons_table(args.inputs, args.metric, args.out_md, args.out_csv, seed=args.seed,
                             n_boot=args.n_boot)
    logging.info("comparisons: %d pairs of %d variants, %d bootstrap resamples (seed %d)", len(rows),
                 len(args.inputs), args.n_boot, args.seed)


def cmd_search(args: argparse.Namespace) -> None:
    from .search_settings import SearchSettings
    from .search_run import run_search

    settings = SearchSettings(
        method=args.method, mode=args.mode, target=args.target, metric=args.metric, delta=args.delta, eps=args.eps,
        order=tuple(_csv(args.order)), fractions=tuple(float(f) for f in _csv(args.fractions)),
        first_block=args.first_block, last_block=args.last_block, strategy=args.strategy, stop_at=args.stop_at,
        convention=args.convention, bias_compensation=args.bias_compensation,
        checkpoints=tuple(float(c) for c in _csv(args.checkpoints) if c != "none"),
        loglik_delta=args.loglik_delta, kl_max=args.kl_max, budgets=_budgets(args.budgets))
    run_search(model_dir=args.model_dir, model_name=args.model_name, factors_dir=args.factors, out_dir=args.out,
               settings=settings, layers=_csv(args.layers), tasks_dir=args.tasks_dir, splits_file=args.splits,
               task_source=args.task_source,
               tasks=_csv(args.tasks), search_limit=args.search_limit, curve_limit=args.curve_limit,
               curve_every=args.curve_every, ppl_window=args.ppl_window, ppl_max_docs=args.ppl_max_docs,
               ppl_search_fraction=args.ppl_search_fraction, ppl_path=args.ppl_path,
               ppl_text_field=args.ppl_text_field, calibration_texts=args.calibration_texts,
               batch_size=args.batch_size, device=args.device, cache=not args.no_cache,
               cache_max_mb=args.cache_max_mb)


def _budgets(text: str | None) -> tuple[tuple[str, float], ...]:
    """'p54=0.806,p34=0.507' -> (("p54", 0.806), ("p34", 0.507)); a malformed item is a ConfigError."""
    out = []
    for item in _csv(text or ""):
        label, _, value = item.partition("=")
        try:
            out.append((label, float(value)))
        except ValueError:
            raise ConfigError(f"--budgets item {item!r} is not <label>=<fraction> (e.g. p54=0.806)") from None
        if not label:
            raise ConfigError(f"--budgets item {item!r} has no label (e.g. p54=0.806)")
    return tuple(out)


def _search_inputs(paths: list[str], reader) -> dict:
    """{search name: content} of search outputs given as results/<model>/search/<search>/<file> paths."""
    return {Path(p).parent.name: reader(p) for p in paths}


def cmd_spectra(args: argparse.Namespace) -> None:
    from .spectra import spectra_rows, write_spectra

    rows = spectra_rows(args.eigen, args.model_dir, args.points)
    write_spectra(rows, args.out)
    logging.info("spectra of %d blocks: %d rows", len(args.eigen), len(rows))


def cmd_figure_spectra(args: argparse.Namespace) -> None:
    from .figures import read_parquet_rows
    from .spectra import plot_spectra

    plot_spectra(read_parquet_rows(args.spectra, "spectra"), args.out_png, args.out_svg, title=args.title, dpi=args.dpi)


def cmd_figure_search_curves(args: argparse.Namespace) -> None:
    from .figures import plot_search_curves, read_curve, read_parquet_rows

    results = read_parquet_rows(args.results, "combined results") if args.results else None
    panels = plot_search_curves(_search_inputs(args.curves, read_curve), args.out_png, args.out_svg,
                                tasks=_csv(args.tasks), metric=args.metric, results=results, title=args.title,
                                dpi=args.dpi)
    logging.info("search curves: %d panels from %d searches", len(panels), len(args.curves))


def cmd_figure_layer_budgets(args: argparse.Namespace) -> None:
    from .figures import plot_layer_budgets, read_search_log

    plot_layer_budgets(_search_inputs(args.logs, read_search_log), args.out_png, args.out_svg, title=args.title,
                       dpi=args.dpi, annotate=args.annotate)


def cmd_figure_allocations(args: argparse.Namespace) -> None:
    from .allocation_figure import plot_allocations
    from .figures import read_parquet_rows
    from .tables import methods_table_rows

    table = methods_table_rows(read_parquet_rows(args.results, "combined results"), args.metric)
    plot_allocations(table, args.out_png, args.out_svg, title=args.title, dpi=args.dpi)


def cmd_methods_table(args: argparse.Namespace) -> None:
    from .tables import methods_table

    methods_table(args.results, args.metric, args.out_md, args.out_csv)


# ---------------------------------------------------------------- LASER study (sfsd.laser_study)


def cmd_laser_grid(args: argparse.Namespace) -> None:
    from .arch import get_arch
    from .io import write_json
    from .laser_study import build_grid
    from .plan import model_shapes

    settings = json.loads(args.settings)
    shapes = model_shapes(args.model_dir)
    grid = build_grid(get_arch(shapes.architecture), shapes, **settings)
    write_json(args.out, {**grid, "settings": settings})
    logging.info("LASER grid: %d points (%d skipped)", len(grid["points"]), len(grid["skipped"]))


def cmd_laser_point(args: argparse.Namespace) -> None:
    from .io import model_digest
    from .laser_study import GridPoint, run_point
    from .lmeval_tasks import source_by_name
    from .models import load_model
    from .rows import write_rows
    from .scoring import build_requests, encode_requests, lmeval_max_length
    from .splits import read_split_ids

    point = GridPoint.parse(args.intervention, args.lname, args.lnum, args.rate)
    ids, n_docs = read_split_ids(args.splits, [args.task], args.split, args.limit, args.task_source)
    model, tokenizer = load_model(args.model_dir, device=args.device)
    requests = build_requests(source_by_name(args.task_source, args.tasks_dir), [args.task], ids, n_docs=n_docs)
    enc = encode_requests(tokenizer, requests, lmeval_max_length(model, tokenizer))
    rows, items, common = run_point(model, tokenizer, point, enc, model_name=args.model_name,
                                    batch_size=args.batch_size, bandwidth=args.vendi_bandwidth,
                                    exact=args.vendi_exact, limit=args.limit,
                                    model_digest=model_digest(args.model_dir))
    write_rows(args.out_items, items, common)
    write_rows(args.out_scores, rows, common)


def cmd_laser_choose(args: argparse.Namespace) -> None:
    from .laser_study import choose_file

    choose_file(args.inputs, args.task, args.metric, args.out)


def cmd_laser_results(args: argparse.Namespace) -> None:
    from .laser_study import combine_study

    n_rows, n_items = combine_study(args.scores, args.items, args.chosen, args.out_results, args.out_items)
    logging.info("LASER results: %d rows, %d item records", n_rows, n_items)


def cmd_laser_figure(args: argparse.Namespace) -> None:
    from .laser_report import sweep_figure

    sweep_figure(args.results, args.metric, args.out_png, args.out_svg)


def cmd_laser_table(args: argparse.Namespace) -> None:
    from .laser_report import best_table

    best_table(args.results, args.metric, args.out_md, args.out_csv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfsd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (the job's share of cores; unset lets MKL/OpenMP oversubscribe, which on "
             "small machines makes eigh/SVD several times slower)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert the embedded model or download a hub model")
    p.add_argument("--source", choices=["embedded", "hub"], required=True)
    p.add_argument("--name", required=True, help="embedded model name or hub repo id")
    p.add_argument("--revision", default="main")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("calibration-texts", help="sample calibration documents (seeded, no replacement)")
    p.add_argument("--settings", required=True, help="JSON object of sfsd.calibration.CalibrationSettings fields")
    p.add_argument("--out", required=True, help="JSONL output")
    p.set_defaults(func=cmd_calibration_texts)

    p = sub.add_parser("tokenize", help="tokenize calibration texts into padded batches with a mask")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--texts", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("collect", help="stage 1: per-block input moments of the target Linear layers")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--layers", required=True, help="comma-separated layer keywords")
    p.add_argument("--dtype", default=default("collection.dtype"))
    p.add_argument("--device", default=default("device"))
    p.add_argument("--batch-size", type=int, default=default("collection.batch_size"))
    p.add_argument("--flush-every", type=int, default=default("collection.flush_every"),
                   help="batches summed in float32 before the float64 reduce")
    p.add_argument("--out", required=True, help="output folder (block_XXX.safetensors + manifest.json)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("eigen", help="stage 2: eigendecomposition of one block's output covariances")
    p.add_argument("--features", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--layers", required=True, help="comma-separated short Linear names")
    p.add_argument("--save-dtype", default=default("eigen.save_dtype"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_eigen)

    p = sub.add_parser("factor-cache", help="full-rank factors of one method, from which any plan is cut")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--results", required=True, help="results/<model> (holds eigen/ and features/)")
    p.add_argument("--method", choices=METHOD_CHOICES, required=True)
    p.add_argument("--layers", required=True)
    p.add_argument("--jitter", type=float, default=1e-6, help="relative Cholesky jitter (whitened)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_factor_cache)

    p = sub.add_parser("make-plan", help="a rank plan reaching a parameter budget: uniform, spectral or searched")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--method", choices=METHOD_CHOICES, required=True)
    p.add_argument("--params-fraction", type=float, required=True, help="target fraction of parameters kept")
    p.add_argument("--first-block", type=int, default=default("compression.first_block"),
                   help="compress blocks first_block..last only")
    p.add_argument("--layers", required=True)
    p.add_argument("--convention", choices=["model", "decoder_linear"], default=default("compression.convention"))
    p.add_argument("--bias-compensation", choices=["intended", "none"],
                   default=default("compression.bias_compensation"))
    p.add_argument("--allocation", choices=["uniform", "spectral", "searched"], default="uniform",
                   help="uniform: one keep ratio; spectral: ranks from the cached spectra (sfsd.allocate); searched: "
                        "a search's plan at the budget, its unsearched layers allocated spectrally")
    p.add_argument("--factors", help="factor cache root (results/<model>/factors): spectral and searched")
    p.add_argument("--search", help="search output folder: searched")
    p.add_argument("--budget-label", help="the budget's name (e.g. p54): the search's checkpoint of that budget")
    p.add_argument("--spectral-groups", choices=("type", "global"), default=default("compression.spectral_groups"),
                   help="spectral: move rank across depth within each Linear type, or anywhere")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_plan)

    p = sub.add_parser("compress", help="apply a rank plan (cut from the factor cache) and save the model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--factors", required=True, help="folder holding <method>/block_NNN.safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compress)

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
    p.add_argument("--limit", type=_optional(int), default=default("evaluation.limit"),
                   help="first N docs of the split per task (none: all)")
    p.add_argument("--scorer", choices=["lm_eval", "native"], default=default("evaluation.scorer"),
                   help="native (exact, faster; checked against lm-eval by the check_scorer rule) or lm_eval")
    p.add_argument("--batch-size", type=int, default=default("evaluation.batch_size"))
    p.add_argument("--device", default=default("device"))
    p.add_argument("--ppl-source", default=default("evaluation.perplexity.source"),
                   help="lambada, coqa, wikitext2, text_file, jsonl_file or none")
    p.add_argument("--ppl-window", type=int, default=default("evaluation.perplexity.window"))
    p.add_argument("--ppl-max-docs", type=_optional(int), default=default("evaluation.perplexity.max_docs"),
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

    p = sub.add_parser("check-scorer", help="re-score the first test docs of every task with lm-eval and fail on "
                       "any difference from the native scorer")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--compressed", default=None, help="a compressed model folder; omit for the base model")
    p.add_argument("--task-source", choices=["local", "hub"], default=default("evaluation.source"))
    p.add_argument("--tasks-dir", default=None)
    p.add_argument("--tasks", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--limit", type=int, required=True, help="first N test docs per task")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |log-likelihood difference| per choice")
    p.add_argument("--batch-size", type=int, default=default("evaluation.batch_size"))
    p.add_argument("--device", default=default("device"))
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
    p.add_argument("--last-block", type=_optional(int), default=default("search.last_block"),
                   help="highest block searched (none: the top)")
    p.add_argument("--strategy", default=default("search.strategy"), choices=("bisect", "linear", "released"),
                   help="bisect; linear (the published scan); released (the released code's chunks and re-check)")
    p.add_argument("--loglik-delta", type=float, default=default("search.loglik_delta"),
                   help="loglik: accepted drop (nats) from the baseline")
    p.add_argument("--kl-max", type=float, default=default("search.kl_max"),
                   help="kl: accepted mean KL (nats) from the baseline")
    p.add_argument("--budgets", default=None, help="label=fraction,...: also save plans landed on these budgets "
                   "(checkpoints/<label>.json)")
    p.add_argument("--stop-at", type=_optional(float), default=default("search.stop_at"),
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
    p.add_argument("--search-limit", type=_optional(int), default=default("search.search_limit"),
                   help="search-split docs per task (none: all)")
    p.add_argument("--curve-limit", type=_optional(int), default=default("search.curve_limit"),
                   help="test-split docs per task for the curve (none: all)")
    p.add_argument("--curve-every", type=int, default=default("search.curve_every"),
                   help="evaluate the test split every N finished blocks")
    p.add_argument("--ppl-window", type=int, default=default("evaluation.perplexity.window"))
    p.add_argument("--ppl-max-docs", type=_optional(int), default=default("evaluation.perplexity.max_docs"),
                   help="first N perplexity documents (none: all)")
    p.add_argument("--ppl-search-fraction", type=float, required=True,
                   help="leading fraction of the perplexity documents searched on (splits.search_fraction)")
    p.add_argument("--ppl-path", default=None, help="the file of the text_file / jsonl_file perplexity targets")
    p.add_argument("--ppl-text-field", default=default("evaluation.perplexity.text_field"),
                   help="JSONL field of the jsonl_file perplexity target")
    p.add_argument("--calibration-texts", default=None, help="calibration JSONL whose docs perplexity text excludes")
    p.add_argument("--batch-size", type=int, default=default("search.batch_size"))
    p.add_argument("--device", default=default("device"))
    p.add_argument("--no-cache", action="store_true", help="full forwards for every candidate (the published cost)")
    p.add_argument("--cache-max-mb", type=float, default=default("search.cache_max_mb"),
                   help="bound on the cached block inputs")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eigen-summary", help="energy-vs-rank summary of all blocks' eigenvalues")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_eigen_summary)

    # figures and tables from cached results (no model, no GPU; `spectra` reads a few weights on the CPU)
    p = sub.add_parser("spectra", help="energy kept vs rank, feature space and weight space, of some eigen blocks")
    p.add_argument("--model-dir", required=True, help="the dense model (weights for the singular values of W)")
    p.add_argument("--points", type=int, default=default("figures.spectra_points"), help="ranks sampled per curve")
    p.add_argument("--out", required=True, help="spectra.parquet")
    p.add_argument("eigen", nargs="+", help="results/<model>/eigen/block_NNN.safetensors files")
    p.set_defaults(func=cmd_spectra)

    def figure_parser(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--out-png", required=True)
        p.add_argument("--out-svg", required=True)
        p.add_argument("--dpi", type=int, default=default("figures.dpi"), help="PNG resolution")
        p.add_argument("--title", default="")
        p.set_defaults(func=func)
        return p

    p = figure_parser("figure-spectra", cmd_figure_spectra, "feature- vs weight-space spectra (PNG + SVG)")
    p.add_argument("--spectra", required=True, help="spectra.parquet of the spectra subcommand")
    p = figure_parser("figure-search-curves", cmd_figure_search_curves,
                      "test metric against parameters along surgical searches (PNG + SVG)")
    p.add_argument("--tasks", default="", help="task panels, in order (then 'average' and perplexity sources)")
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("evaluation.metric"), help=METRIC_HELP)
    p.add_argument("--results", default=None, help="results.parquet: uniform-budget models as points")
    p.add_argument("curves", nargs="+", help="search/<search>/curve.parquet files (the folder names the search)")
    p = figure_parser("figure-layer-budgets", cmd_figure_layer_budgets,
                      "final parameter budget per layer after surgical searches, heat map (PNG + SVG)")
    p.add_argument("--annotate", action="store_true", help="write the %% into every cell")
    p.add_argument("logs", nargs="+", help="search/<search>/log.jsonl files (the folder names the search)")

    p = figure_parser("figure-allocations", cmd_figure_allocations,
                      "test average and perplexity against parameters, per method and allocation (PNG + SVG)")
    p.add_argument("--results", required=True, help="results.parquet of the model")
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("evaluation.metric"), help=METRIC_HELP)

    p = sub.add_parser("methods-table", help="methods x budgets (params, average metric, ppl) as Markdown and CSV")
    p.add_argument("--results", required=True)
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("evaluation.metric"), help=METRIC_HELP)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.set_defaults(func=cmd_methods_table)

    # LASER study: grid, one point, choice on the search split, combined results, figure, table
    p = sub.add_parser("laser-grid", help="the points of a LASER sweep for one model (JSON)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--settings", required=True,
                   help="JSON {lnums, lnames, rates, interventions, full_grid} (sfsd.laser_study.build_grid)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_laser_grid)

    p = sub.add_parser("laser-point", help="one LASER/Vendi intervention scored on one split (rows + per-item)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--task-source", choices=["local", "hub"], default=default("evaluation.source"),
                   help="evaluation.source: exported local tasks or lm-eval's hub tasks")
    p.add_argument("--tasks-dir", default=None, help="export-tasks folder (task source local)")
    p.add_argument("--splits", required=True, help="splits.json of the splits subcommand")
    p.add_argument("--task", required=True)
    p.add_argument("--split", choices=["search", "test"], required=True)
    p.add_argument("--intervention", required=True, help="none (with lname dont), laser, vendi, vendi-quality, ...")
    p.add_argument("--lname", required=True, help="LASER layer type: fc_in, fc_up, fc_out, q_proj, ..., dont")
    p.add_argument("--lnum", required=True, help="block number, or all / -1 for every block")
    p.add_argument("--rate", required=True, help="rho = 1 - 0.1 rate, rate in [0, 10]")
    p.add_argument("--limit", type=_optional(int), default=default("laser.limit"), help="first N docs of the split (none: all)")
    p.add_argument("--batch-size", type=int, default=default("laser.batch_size"))
    p.add_argument("--device", default=default("device"))
    p.add_argument("--vendi-bandwidth", type=_optional(float), default=default("laser.vendi.bandwidth"),
                   help="RBF bandwidth (none: median distance)")
    p.add_argument("--vendi-exact", action="store_true", help="greedy on the exact order-1 Vendi score (small matrices)")
    p.add_argument("--out-scores", required=True)
    p.add_argument("--out-items", required=True)
    p.set_defaults(func=cmd_laser_point)

    p = sub.add_parser("laser-choose", help="the best LASER point of one task on the search split (JSON)")
    p.add_argument("--task", required=True)
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("laser.metric"), help=METRIC_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+", help="search-split scores.parquet of every point")
    p.set_defaults(func=cmd_laser_choose)

    p = sub.add_parser("laser-results", help="all LASER points in one results Parquet, chosen points flagged")
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--items", nargs="+", required=True, help="items.parquet of the reported points")
    p.add_argument("--chosen", nargs="+", required=True, help="chosen JSON of every task")
    p.add_argument("--out-results", required=True)
    p.add_argument("--out-items", required=True)
    p.set_defaults(func=cmd_laser_results)

    p = sub.add_parser("laser-figure", help="accuracy change against rate, per layer type (PNG + SVG)")
    p.add_argument("--results", required=True)
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("laser.metric"), help=METRIC_HELP)
    p.add_argument("--out-png", required=True)
    p.add_argument("--out-svg", required=True)
    p.set_defaults(func=cmd_laser_figure)

    p = sub.add_parser("laser-table", help="best LASER intervention per task, validation and test (MD + CSV)")
    p.add_argument("--results", required=True)
    p.add_argument("--metric", choices=METRIC_CHOICES, default=default("laser.metric"), help=METRIC_HELP)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.set_defaults(func=cmd_laser_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        args.func(args)
    except SfsdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
