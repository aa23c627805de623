"""Thin entry points that the Snakemake rules call (`python -m sfsd <stage> ...`).

Each stage also runs on its own outside Snakemake. Errors a user can fix print as one line
("error: ...") with exit status 2; outputs are written atomically, so a failed stage leaves none.
The subcommands live by stage in `cli/stages.py` (model to compressed model), `cli/evaluate.py` (scoring
and the search), `cli/report.py` (figures, tables and the LASER study) and `cli/plan.py` (the resource
planner's table); `sfsd.provenance.command_modules`
finds a subcommand's code there.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sfsd.cli import evaluate, plan, report, stages
from sfsd.errors import SfsdError

COMMAND_MODULES = (stages, evaluate, report, plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfsd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (the job's share of cores; unset lets MKL/OpenMP oversubscribe, which on "
             "small machines makes eigh/SVD several times slower)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
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
    log_gpu_peak()
    log_host_peak()
    return 0


def log_host_peak(status: str = "/proc/self/status") -> None:
    """Log the command's peak resident memory (Linux's VmHWM), so the job's log says what the stage held on
    the host (Snakemake's benchmark files sample it, every 30 s once a job has run 30 s, and can miss a
    peak; workflow/benchmarks/paper_scale.py reads this line); nothing where the kernel does not report it."""
    try:
        with open(status) as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return
    logging.getLogger("sfsd").info("peak host memory: %.3f GB", kb * 1024 / 1e9)


def log_gpu_peak() -> None:
    """Log the command's peak CUDA allocation over every GPU it used (the job's log then says what the
    stage held on the device; workflow/benchmarks/paper_scale.py reads it); nothing where no GPU was used."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    logging.getLogger("sfsd").info("peak GPU memory: %.3f GB", peak / 1e9)
