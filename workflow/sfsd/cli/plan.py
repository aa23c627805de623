"""`python -m sfsd plan-resources`: the resource planner's table (`sfsd.resources`), per configured model
and stage: the mode, peak GPU and host memory, disk written, GPUs, jobs and whether it fits; like
`accelerate estimate-memory`, from shapes only (no weights are read)."""

from __future__ import annotations

import argparse

from sfsd.defaults import choices, default

# options that mirror settings: (option, config key); unset, the config file's value (or the schema's default)
MIRRORED = (("--device", "device"), ("--dtype", "dtype"), ("--streamed", "streamed"),
            ("--staging", "collection.staging"), ("--collect-batch-size", "collection.batch_size"),
            ("--eval-batch-size", "evaluation.batch_size"), ("--num-samples", "calibration.num_samples"),
            ("--seq-len", "calibration.seq_len"))


def add_parsers(sub) -> None:
    """This module's subcommand, on the subparsers of `sfsd.cli.main.build_parser`."""
    p = sub.add_parser("plan-resources", help="predicted peak GPU memory, host memory and disk of every stage and "
                                              "the mode each runs in, from the model's shapes (no weights read)")
    p.add_argument("--config", default="config.yaml", help="the workflow config (its models and settings)")
    p.add_argument("--model-dir", help="plan this model folder instead of the config's models: config.json and the "
                                       "safetensors headers suffice (no weights are read)")
    p.add_argument("--device-memory-gb", type=float,
                   help="memory of one GPU to plan for (default: gpu_memory_gb, where the GPU stages run on a GPU)")
    p.add_argument("--host-memory-gb", type=float,
                   help="host memory to plan for (default: host_memory_gb, else what this machine has available)")
    p.add_argument("--gpus", type=int, help="GPUs of one node (default: this machine's, else 8)")
    p.add_argument("--root", default=".", help="the working folder holding results/ (its free disk is checked)")
    for option, key in MIRRORED:
        kind = type(default(key))
        try:
            allowed = choices(key)
        except KeyError:
            allowed = None
        p.add_argument(option, type=kind, choices=allowed, default=None,
                       help=f"the setting {key} (default: the config's; the schema's is {default(key)})")
    p.set_defaults(func=cmd_plan_resources)


def _set(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def cmd_plan_resources(args: argparse.Namespace) -> None:
    from pathlib import Path

    import yaml

    from sfsd.config import validate
    from sfsd.errors import ConfigError
    from sfsd.resources.plan import machine_of, plan_rows

    path = Path(args.config)
    if not path.is_file() and args.config != "config.yaml":
        raise ConfigError(f"--config {args.config}: no such file")
    config = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    if args.model_dir:
        folder = Path(args.model_dir).resolve()
        config["models"] = {folder.name.replace(" ", "_") or "model": {"source": "local", "path": str(folder)}}
    for option, key in MIRRORED:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(config, key, value)
    validate(config)
    machine = machine_of(config, args.root, gpu_gb=args.device_memory_gb, host_gb=args.host_memory_gb, gpus=args.gpus)
    gpu = (f"{machine.gpus} GPU{'s' if machine.gpus > 1 else ''} of {machine.gpu_bytes / 1e9:g} GB"
           if machine.gpu_bytes else "no GPU (the GPU stages on the CPU)")
    disk = f", {machine.disk_bytes / 1e9:.0f} GB free disk" if machine.disk_bytes is not None else ""
    print(f"planned for {gpu}, {machine.host_bytes / 1e9:.1f} GB host memory{disk} "
          "(a prediction from shapes, not a measurement)")
    for name in config["models"]:
        print()
        print(format_model(name, *plan_rows(config, name, args.root, machine)))


def format_model(name: str, heading: str, rows: list) -> str:
    """The table of one model: `rows` of (StageNeed, chosen, fits); * marks the mode a stage runs in."""
    lines = [f"model {name}: {heading}"]
    if rows:
        lines.append(f"  {'stage':<18} {'mode':<24} {'GPU GB':>7} {'host GB':>8} {'disk GB':>8} {'GPUs':>4} "
                     f"{'jobs':>5}  verdict")
    for need, chosen, fits in rows:
        verdict = "fits" if fits else "does not fit" + (f": set {need.fix}" if need.fix else "")
        gpu = f"{need.device_bytes / 1e9:>7.1f}" if need.gpus else f"{'-':>7}"
        lines.append(f"{'*' if chosen else ' '} {need.stage:<18} {need.mode:<24} {gpu} "
                     f"{need.host_bytes / 1e9:>8.1f} {need.disk_total / 1e9:>8.1f} {need.gpus:>4} {need.jobs:>5}  "
                     f"{verdict}")
    return "\n".join(lines)
