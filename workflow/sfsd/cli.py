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

from .errors import ConfigError, SfsdError


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
    from .calibration import tokenize, tokens_digest
    from .io import save_tensors
    from .models import load_tokenizer

    with open(args.texts, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    tokens = tokenize([d["text"] for d in docs], load_tokenizer(args.model_dir), args.seq_len)
    digest = tokens_digest(tokens)
    save_tensors(
        args.out,
        tokens,
        {"digest": digest, "seq_len": args.seq_len, "tokens": int(tokens["attention_mask"].sum()),
         "sequences": int(tokens["input_ids"].shape[0])},
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
    from .compress import cached_statistics, save_factor_cache
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

    shapes = model_shapes(args.model_dir)
    spec = get_arch(shapes.architecture)
    first = args.first_block
    if not 0 <= first < shapes.n_blocks:
        raise ConfigError(f"first_block {first} is out of range: the model has blocks 0..{shapes.n_blocks - 1}")
    plan = budget_plan(
        spec, shapes, select_linears(spec, _csv(args.layers)), args.params_fraction, args.method,
        blocks=range(first, shapes.n_blocks), convention=args.convention, model=args.model_name,
        model_digest=model_digest(args.model_dir), architecture=shapes.architecture,
        bias_compensation=args.bias_compensation,
    )
    plan["notes"]["counts"] = count_params(shapes, plan)
    write_json(args.out, plan)
    logging.info("plan %s: %.4f of the %s parameters", args.out, plan["notes"]["params_fraction"], args.convention)


def cmd_compress(args: argparse.Namespace) -> None:
    from .arch import architecture_of, get_arch
    from .compress import apply_cached_plan, save_compressed
    from .io import model_digest, read_json
    from .models import load_model

    model, tokenizer = load_model(args.model_dir, device="cpu")
    spec = get_arch(architecture_of(model.config))
    plan = read_json(args.plan)
    applied = apply_cached_plan(model, spec, plan, args.factors, model_digest=model_digest(args.model_dir))
    save_compressed(model, applied["plan"], args.out, tokenizer=tokenizer)
    logging.info("compressed %d layers into %s", len(applied["layers"]), args.out)


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
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--flush-every", type=int, default=1, help="batches summed in float32 before the float64 reduce")
    p.add_argument("--out", required=True, help="output folder (block_XXX.safetensors + manifest.json)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("eigen", help="stage 2: eigendecomposition of one block's output covariances")
    p.add_argument("--features", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--layers", required=True, help="comma-separated short Linear names")
    p.add_argument("--save-dtype", default="float32")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_eigen)

    p = sub.add_parser("factor-cache", help="full-rank factors of one method, from which any plan is cut")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--results", required=True, help="results/<model> (holds eigen/ and features/)")
    p.add_argument("--method", choices=["feature", "weight", "whitened"], required=True)
    p.add_argument("--layers", required=True)
    p.add_argument("--jitter", type=float, default=1e-6, help="relative Cholesky jitter (whitened)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_factor_cache)

    p = sub.add_parser("make-plan", help="a uniform rank plan reaching a parameter budget")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--method", choices=["feature", "weight", "whitened"], required=True)
    p.add_argument("--params-fraction", type=float, required=True, help="target fraction of parameters kept")
    p.add_argument("--first-block", type=int, default=0, help="compress blocks first_block..last only")
    p.add_argument("--layers", required=True)
    p.add_argument("--convention", choices=["model", "decoder_linear"], default="model")
    p.add_argument("--bias-compensation", choices=["intended", "none"], default="intended")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_plan)

    p = sub.add_parser("compress", help="apply a rank plan (cut from the factor cache) and save the model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--factors", required=True, help="folder holding <method>/block_NNN.safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eigen-summary", help="energy-vs-rank summary of all blocks' eigenvalues")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_eigen_summary)
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
