"""`python -m sfsd` subcommands that read cached results only: spectra, figures, the methods table,
and the LASER study (grid, points, choice, results, figure, table)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sfsd.cli.options import METRIC_HELP, add_dtype, csv_list, optional
from sfsd.defaults import default
from sfsd.tasks.registry import METRIC_CHOICES


def add_parsers(sub) -> None:
    """This module's subcommands, on the subparsers of `sfsd.cli.main.build_parser`."""
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

    p = sub.add_parser("speed-table", help="inference-speed results of a model's variants as ratios to the dense "
                       "model (MD + CSV)")
    p.add_argument("--dense", default="base", help="the variant the ratios refer to")
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("inputs", nargs="+", help="inference-speed JSON files")
    p.set_defaults(func=cmd_speed_table)

    # LASER study: grid, one point, choice on the search split, combined results, figure, table
    p = sub.add_parser("laser-grid", help="the points of a LASER sweep for one model (JSON)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--settings", required=True,
                   help="JSON {lnums, lnames, rates, interventions, full_grid} (sfsd.laser.study.build_grid)")
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
    p.add_argument("--limit", type=optional(int), default=default("laser.limit"), help="first N docs of the split (none: all)")
    p.add_argument("--batch-size", type=int, default=default("laser.batch_size"))
    p.add_argument("--device", default=default("device"))
    add_dtype(p)
    p.add_argument("--vendi-bandwidth", type=optional(float), default=default("laser.vendi.bandwidth"),
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


def _search_inputs(paths: list[str], reader) -> dict:
    """{search name: content} of search outputs given as results/<model>/search/<search>/<file> paths."""
    return {Path(p).parent.name: reader(p) for p in paths}


def cmd_spectra(args: argparse.Namespace) -> None:
    from sfsd.report.spectra import spectra_rows, write_spectra

    rows = spectra_rows(args.eigen, args.model_dir, args.points)
    write_spectra(rows, args.out)
    logging.info("spectra of %d blocks: %d rows", len(args.eigen), len(rows))


def cmd_figure_spectra(args: argparse.Namespace) -> None:
    from sfsd.report.tables import read_parquet_rows
    from sfsd.report.spectra import plot_spectra

    plot_spectra(read_parquet_rows(args.spectra, "spectra"), args.out_png, args.out_svg, title=args.title, dpi=args.dpi)


def cmd_figure_search_curves(args: argparse.Namespace) -> None:
    from sfsd.report.figures import plot_search_curves, read_curve
    from sfsd.report.tables import read_parquet_rows

    results = read_parquet_rows(args.results, "combined results") if args.results else None
    panels = plot_search_curves(_search_inputs(args.curves, read_curve), args.out_png, args.out_svg,
                                tasks=csv_list(args.tasks), metric=args.metric, results=results, title=args.title,
                                dpi=args.dpi)
    logging.info("search curves: %d panels from %d searches", len(panels), len(args.curves))


def cmd_figure_layer_budgets(args: argparse.Namespace) -> None:
    from sfsd.report.figures import plot_layer_budgets, read_search_log

    plot_layer_budgets(_search_inputs(args.logs, read_search_log), args.out_png, args.out_svg, title=args.title,
                       dpi=args.dpi, annotate=args.annotate)


def cmd_figure_allocations(args: argparse.Namespace) -> None:
    from sfsd.report.allocations import plot_allocations
    from sfsd.report.tables import read_parquet_rows
    from sfsd.report.tables import methods_table_rows

    table = methods_table_rows(read_parquet_rows(args.results, "combined results"), args.metric)
    plot_allocations(table, args.out_png, args.out_svg, title=args.title, dpi=args.dpi)


def cmd_methods_table(args: argparse.Namespace) -> None:
    from sfsd.report.tables import methods_table

    methods_table(args.results, args.metric, args.out_md, args.out_csv)


def cmd_speed_table(args: argparse.Namespace) -> None:
    import csv

    from sfsd.io import atomic_path, read_json
    from sfsd.evaluate.speed import speed_rows, speed_table

    measured = {}
    for path in args.inputs:
        row = read_json(path)
        measured[row["variant"]] = row
    rows = speed_rows(measured, args.dense)
    with atomic_path(args.out_md) as tmp:
        Path(tmp).write_text(speed_table(rows))
    columns = [k for k in rows[0] if k not in ("batch_sizes",)]
    with atomic_path(args.out_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- LASER study (sfsd.laser.study)


def cmd_laser_grid(args: argparse.Namespace) -> None:
    from sfsd.model.registry import get_arch
    from sfsd.io import write_json
    from sfsd.laser.study import build_grid
    from sfsd.model.shapes import model_shapes

    settings = json.loads(args.settings)
    shapes = model_shapes(args.model_dir)
    grid = build_grid(get_arch(shapes.architecture), shapes, **settings)
    write_json(args.out, {**grid, "settings": settings})
    logging.info("LASER grid: %d points (%d skipped)", len(grid["points"]), len(grid["skipped"]))


def cmd_laser_point(args: argparse.Namespace) -> None:
    from sfsd.io import model_digest
    from sfsd.laser.study import GridPoint, run_point
    from sfsd.tasks.lmeval import source_by_name
    from sfsd.model.loading import load_model
    from sfsd.evaluate.rows import write_rows
    from sfsd.evaluate.scoring import build_requests, encode_requests, lmeval_max_length
    from sfsd.tasks.splits import read_split_ids

    point = GridPoint.parse(args.intervention, args.lname, args.lnum, args.rate)
    ids, n_docs = read_split_ids(args.splits, [args.task], args.split, args.limit, args.task_source)
    model, tokenizer = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    requests = build_requests(source_by_name(args.task_source, args.tasks_dir), [args.task], ids, n_docs=n_docs)
    enc = encode_requests(tokenizer, requests, lmeval_max_length(model, tokenizer))
    rows, items, common = run_point(model, tokenizer, point, enc, model_name=args.model_name,
                                    batch_size=args.batch_size, bandwidth=args.vendi_bandwidth,
                                    exact=args.vendi_exact, limit=args.limit,
                                    model_digest=model_digest(args.model_dir))
    write_rows(args.out_items, items, common)
    write_rows(args.out_scores, rows, common)


def cmd_laser_choose(args: argparse.Namespace) -> None:
    from sfsd.laser.study import choose_file

    choose_file(args.inputs, args.task, args.metric, args.out)


def cmd_laser_results(args: argparse.Namespace) -> None:
    from sfsd.laser.study import combine_study

    n_rows, n_items = combine_study(args.scores, args.items, args.chosen, args.out_results, args.out_items)
    logging.info("LASER results: %d rows, %d item records", n_rows, n_items)


def cmd_laser_figure(args: argparse.Namespace) -> None:
    from sfsd.laser.report import sweep_figure

    sweep_figure(args.results, args.metric, args.out_png, args.out_svg)


def cmd_laser_table(args: argparse.Namespace) -> None:
    from sfsd.laser.report import best_table

    best_table(args.results, args.metric, args.out_md, args.out_csv)
