"""`python -m sfsd` subcommands of stages 0-3: the model, calibration text and tokens, statistics
(collect), eigendecompositions, factor caches, rank plans and compressed models."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sfsd.cli.options import METHOD_CHOICES, add_dtype, csv_list
from sfsd.defaults import block_range, choices, default, resolve_completion
from sfsd.errors import ConfigError


def add_parsers(sub) -> None:
    """This module's subcommands, on the subparsers of `sfsd.cli.main.build_parser`."""
    p = sub.add_parser("prepare-model", help="convert the embedded model or download a hub model")
    p.add_argument("--source", choices=["embedded", "hub"], required=True)
    p.add_argument("--name", required=True, help="embedded model name or hub repo id")
    p.add_argument("--revision", default="main")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("calibration-texts", help="sample calibration documents (seeded, no replacement)")
    p.add_argument("--settings", required=True, help="JSON object of sfsd.features.calibration.CalibrationSettings fields")
    p.add_argument("--out", required=True, help="JSONL output")
    p.set_defaults(func=cmd_calibration_texts)

    p = sub.add_parser("architectures", help="supported decoders: blocks, Linear layers, input groups, LASER names")
    p.add_argument("names", nargs="*", help="HF architecture names to inspect (default: the supported ones)")
    p.set_defaults(func=cmd_architectures)

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
    add_dtype(p, "collection.dtype")  # the rule passes collection.dtype, or dtype where that is auto
    p.add_argument("--device", default=default("device"))
    p.add_argument("--batch-size", type=int, default=default("collection.batch_size"))
    p.add_argument("--flush-every", type=int, default=default("collection.flush_every"),
                   help="batches summed in float32 before the float64 reduce")
    p.add_argument("--staging", choices=choices("collection.staging"), default=default("collection.staging"),
                   help="float32 staging of every block on the device, or each batch reduced at once (host); "
                        "auto: device when it takes at most half the free device memory")
    add_streamed(p, "the device")
    p.add_argument("--out", required=True, help="output folder (block_XXX.safetensors + manifest.json)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("gradients", help="beside stage 1: per Linear E[g g^T] of the LM loss's gradient at its output")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--layers", required=True, help="comma-separated layer keywords")
    p.add_argument("--full", choices=["auto", "true", "false"], default=str(default("gradients.full")).lower(),
                   help="the whole G per Linear, its diagonal, or auto: the whole G when it fits the host memory")
    p.add_argument("--dtype", choices=choices("gradients.dtype"), default=default("gradients.dtype"))
    p.add_argument("--device", default=default("device"))
    p.add_argument("--batch-size", type=int, default=default("gradients.batch_size"))
    p.add_argument("--labels", choices=choices("gradients.labels"), default=default("gradients.labels"),
                   help="the tokens the NLL scores: the text's (empirical Fisher) or sampled from the model (true Fisher)")
    p.add_argument("--seed", type=int, default=default("gradients.seed"), help="seed of the sampled labels")
    p.add_argument("--pack", action="store_true", help="pack the calibration texts end to end into full rows for this "
                   "pass (gradients.pack)")
    p.add_argument("--compressed", help="a compressed folder of the model of --model-dir: the gradients of that "
                   "model (a shot of the loss allocation, compression.loss_shots); the files are stamped with the "
                   "dense model's digest and the folder's plan")
    add_streamed(p, "the device; this stage then refuses it")
    p.add_argument("--out", required=True, help="output folder (block_XXX.safetensors + manifest.json)")
    p.set_defaults(func=cmd_gradients)

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
    add_dtype(p)
    add_streamed(p, "the memory")
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
    p.add_argument("--allocation", choices=["uniform", "spectral", "loss", "searched"], default="uniform",
                   help="uniform: one keep ratio; spectral: ranks from the cached spectra (sfsd.decompose.allocate); loss: "
                        "ranks from the predicted loss increase (sfsd.decompose.criteria); searched: "
                        "a search's plan at the budget, the layers it did not decide allocated by --complete")
    p.add_argument("--complete", choices=choices("search.complete"), default=default("search.complete"),
                   help="searched: allocate the layers the search did not decide spectrally (needs --factors) or "
                        "by the loss (needs --loss); auto: loss where --loss is given, else spectral")
    p.add_argument("--factors", help="factor cache root (results/<model>/factors): spectral, searched spectral")
    p.add_argument("--loss", help="loss criterion root (results/<model>/loss, command loss-spectra): loss, searched loss")
    p.add_argument("--search", help="search output folder: searched")
    p.add_argument("--budget-label", help="the budget's name (e.g. p54): the search's checkpoint of that budget")
    p.add_argument("--spectral-groups", choices=("type", "global"), default=default("compression.spectral_groups"),
                   help="spectral: move rank across depth within each Linear type, or anywhere")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_plan)

    p = sub.add_parser("loss-spectra", help="the predicted loss increase of every rank of every layer (one factor method)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--results", required=True, help="results/<model> (holds features/ and gradients/)")
    p.add_argument("--gradients", help="the output gradients to weigh by (default: <results>/gradients)")
    p.add_argument("--factors", required=True, help="factor cache root (results/<model>/factors)")
    p.add_argument("--method", choices=METHOD_CHOICES, required=True)
    p.add_argument("--layers", required=True)
    p.add_argument("--bias-compensation", choices=["intended", "none"],
                   default=default("compression.bias_compensation"))
    p.add_argument("--out", required=True, help="output folder (block_NNN.safetensors with <linear>.loss)")
    p.set_defaults(func=cmd_loss_spectra)

    p = sub.add_parser("compress", help="apply a rank plan (cut from the factor cache) and save the model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--factors", required=True, help="folder holding <method>/block_NNN.safetensors")
    add_dtype(p)  # the compressed folder's weights are written in it
    add_streamed(p, "the memory")
    p.add_argument("--out", required=True, help="compressed folder (weights written shard by shard, one block at a time)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eigen-summary", help="energy-vs-rank summary of all blocks' eigenvalues")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_eigen_summary)


def add_streamed(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--streamed", choices=choices("streamed"), default=default("streamed"),
                   help=f"read the model one block at a time (auto: when the stage does not fit {where} whole, "
                        "as the resource planner counts it)")


def _streamed(stage: str, args: argparse.Namespace, layers: list[str] | None = None, method: str = "feature",
              kept: float = 1.0) -> str:
    """The --streamed option of a CPU stage decided: auto by the resource planner against host memory."""
    import torch

    from sfsd.model.loading import run_dtype
    from sfsd.resources.decide import decide_streamed

    return decide_streamed(stage, args.model_dir, args.streamed, dtype=run_dtype(args.model_dir, args.dtype),
                           device=torch.device("cpu"), layers=layers, method=method, kept=kept)


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from sfsd.model.loading import convert_embedded, download_hub_model

    if args.source == "embedded":
        convert_embedded(args.name, args.out)
    else:
        download_hub_model(args.name, args.revision, args.out)


def cmd_calibration_texts(args: argparse.Namespace) -> None:
    from sfsd.features.calibration import from_settings, sample_texts
    from sfsd.io import atomic_path

    docs = sample_texts(from_settings(json.loads(args.settings)))
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    logging.info("wrote %d calibration texts to %s", len(docs), args.out)


def cmd_architectures(args: argparse.Namespace) -> None:
    from sfsd.model.registry import REGISTRY, SUPPORTED, get_arch

    for name in args.names or SUPPORTED:
        spec = get_arch(name)
        print(f"{name} ({'registry' if name in REGISTRY else 'inspected'})")
        print(f"  blocks: {spec.blocks}  decoder: {spec.decoder}  lm_head: {spec.lm_head}")
        print("  linears: " + ", ".join(f"{short}={path}" for short, path in spec.linears.items()))
        print("  input groups: " + " | ".join(f"{g}: {' '.join(m)}" for g, m in spec.input_groups.items()))
        print("  laser: " + ", ".join(f"{t}={','.join(m) or '-'}" for t, m in spec.laser_types.items()))


def cmd_tokenize(args: argparse.Namespace) -> None:
    from sfsd.features.calibration import read_texts, tokenize, tokens_digest
    from sfsd.io import file_digest, model_digest, save_tensors
    from sfsd.model.loading import load_tokenizer
    from sfsd.provenance import stamp, tokenizer_digest

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
    from sfsd.features.collect import run_collect

    run_collect(
        args.model_dir, args.tokens, args.out, model_name=args.model_name, layers=csv_list(args.layers),
        dtype=args.dtype, device=args.device, batch_size=args.batch_size, flush_every=args.flush_every,
        streamed=args.streamed, staging=args.staging,
    )


def cmd_gradients(args: argparse.Namespace) -> None:
    from sfsd.features.gradients import run_gradients
    from sfsd.model.placement import resolve_device
    from sfsd.resources.decide import decide_gradient_dtype

    layers = csv_list(args.layers)
    dtype = decide_gradient_dtype(args.model_dir, args.dtype, device=resolve_device(args.device), layers=layers,
                                  tokens=args.tokens, batch_size=args.batch_size, full=args.full)
    compressed = None
    if args.compressed:  # a compressed model is smaller than the dense one the planner sized the pass for
        from sfsd.decompose.compress import load_compressed

        compressed = load_compressed(args.compressed, args.device, dtype)
    run_gradients(args.model_dir, args.tokens, args.out, model_name=args.model_name, layers=layers,
                  full=args.full, dtype=dtype, device=args.device, batch_size=args.batch_size,
                  streamed=args.streamed, compressed=compressed, labels=args.labels, seed=args.seed,
                  pack=args.pack)


def cmd_eigen(args: argparse.Namespace) -> None:
    from sfsd.features.eigen import run_eigen

    result = run_eigen(args.features, args.model_dir, args.out, csv_list(args.layers), args.save_dtype)
    logging.info("block %d: eigh %.2f s", result["block"], result["eigh_seconds"])


def cmd_eigen_summary(args: argparse.Namespace) -> None:
    from sfsd.features.eigen import summarize
    from sfsd.io import write_json

    write_json(args.out, summarize([Path(p) for p in args.inputs]))


def cmd_factor_cache(args: argparse.Namespace) -> None:
    from sfsd.model.registry import select_linears
    from sfsd.decompose.compress import cached_statistics
    from sfsd.decompose.factor_cache import save_factor_cache
    from sfsd.io import atomic_dir, model_digest
    from sfsd.model.stream import open_blocks

    digest = model_digest(args.model_dir)
    source = open_blocks(args.model_dir, _streamed("factor_cache", args, csv_list(args.layers), args.method),
                         args.dtype)
    spec = source.spec
    eigen, features = cached_statistics(args.results, model_digest=digest)
    with atomic_dir(args.out) as tmp:
        paths = save_factor_cache(source, spec, args.method, select_linears(spec, csv_list(args.layers)), tmp, eigen,
                                  features, model_digest=digest, jitter=args.jitter)
    logging.info("wrote %d blocks of %s factors at rank kappa-1", len(paths), args.method)


def cmd_make_plan(args: argparse.Namespace) -> None:
    from sfsd.model.registry import get_arch, select_linears
    from sfsd.io import model_digest, write_json
    from sfsd.decompose.plan import budget_plan, count_params
    from sfsd.model.shapes import model_shapes
    from sfsd.provenance import stamp

    shapes = model_shapes(args.model_dir)
    spec = get_arch(shapes.architecture)
    first = block_range(args.first_block, None, shapes.n_blocks, "--first-block").start
    linears = select_linears(spec, csv_list(args.layers))
    digest = model_digest(args.model_dir)
    header = dict(model=args.model_name, model_digest=digest, architecture=shapes.architecture,
                  bias_compensation=args.bias_compensation)
    settings = {"method": args.method, "params_fraction": args.params_fraction, "first_block": first,
                "layers": csv_list(args.layers), "convention": args.convention, "bias_compensation": args.bias_compensation,
                "allocation": args.allocation}
    calibration = None  # a uniform plan reads no statistics
    if args.allocation == "uniform":
        plan = budget_plan(spec, shapes, linears, args.params_fraction, args.method, blocks=range(first, shapes.n_blocks),
                           convention=args.convention, **header)
    else:
        plan, calibration, searched = _allocated_plan(args, spec, shapes, linears, range(first, shapes.n_blocks), header)
        settings.update(searched)
    plan["notes"]["counts"] = count_params(shapes, plan)
    plan["notes"]["provenance"] = stamp(digest, calibration, settings)
    write_json(args.out, plan)
    logging.info("%s plan %s: %.4f of the %s parameters", args.allocation, args.out, plan["notes"]["params_fraction"],
                 args.convention)


def _allocated_plan(args, spec, shapes, linears, blocks: range, header) -> tuple[dict, str | None, dict]:
    """(plan, calibration digest, settings for its provenance) of a spectral, loss or searched plan
    (`sfsd.decompose.allocated.allocated_plan`): a searched one allocates the layers its search did not
    decide by --complete (auto: loss where --loss is given, else spectral)."""
    from sfsd.decompose.allocated import allocated_plan

    allocation, search, settings = args.allocation, None, {}
    if allocation == "searched":
        if not args.search or not args.budget_label:
            raise ConfigError("make-plan --allocation searched needs --search (a search folder) and --budget-label")
        allocation, search = resolve_completion(args.complete, args.loss is not None), args.search
        settings = {"search": search, "complete": allocation}
    root = args.loss if allocation == "loss" else args.factors
    if not root:
        given = f"--allocation {args.allocation}" + (f" --complete {allocation}" if search else "")
        raise ConfigError(f"make-plan {given} needs " + ("--loss (the loss criterion root, command loss-spectra)"
                                                         if allocation == "loss" else "--factors (the factor cache root)"))
    plan, calibration = allocated_plan(spec, shapes, linears, args.params_fraction, args.method, blocks, allocation, root,
                                       convention=args.convention, groups=args.spectral_groups, search=search,
                                       budget_label=args.budget_label, **header)
    return plan, calibration, settings


def cmd_loss_spectra(args: argparse.Namespace) -> None:
    from sfsd.decompose.compress import BlockFile, cached_statistics
    from sfsd.decompose.criteria import save_loss_spectra
    from sfsd.features.collect import block_file
    from sfsd.io import atomic_dir, model_digest
    from sfsd.model.registry import select_linears
    from sfsd.model.stream import open_blocks

    digest = model_digest(args.model_dir)
    source = open_blocks(args.model_dir, "always")  # one block's weights at a time: all this stage reads
    _, features = cached_statistics(args.results, model_digest=digest)
    with atomic_dir(args.out) as tmp:
        paths = save_loss_spectra(
            source, source.spec, args.method, select_linears(source.spec, csv_list(args.layers)), tmp,
            lambda b: BlockFile(Path(args.factors) / args.method / block_file(b), digest), features,
            lambda b: BlockFile(Path(args.gradients or Path(args.results) / "gradients") / block_file(b), digest),
            model_digest=digest, bias_compensation=args.bias_compensation)
    logging.info("wrote the loss criterion of %d blocks of %s", len(paths), args.method)


def cmd_compress(args: argparse.Namespace) -> None:
    from sfsd.decompose.factor_cache import compress_from_cache
    from sfsd.io import model_digest, read_json, shard_bytes_of
    from sfsd.model.loading import load_tokenizer
    from sfsd.model.stream import open_blocks

    digest = model_digest(args.model_dir)
    plan = read_json(args.plan)
    # the share of the parameters the folder keeps, as the plan counted it (else sized as every parameter)
    kept = float(plan.get("notes", {}).get("counts", {}).get("model", {}).get("fraction", 1.0))
    source = open_blocks(args.model_dir, _streamed("compress_model", args, kept=kept), args.dtype)
    # sharded like the checkpoint it came from: whatever could open that checkpoint's files opens these
    applied = compress_from_cache(source, plan, args.factors, args.out, model_digest=digest,
                                  tokenizer=load_tokenizer(args.model_dir), shard_bytes=shard_bytes_of(args.model_dir))
    logging.info("compressed %d layers into %s", len(applied["layers"]), args.out)
