"""Every stage of the workflow on a random-weight decoder of a few billion parameters stored in bfloat16,
with the resource planner's predicted peak memory beside the measured one for each stage.

On the CPU the run can be held under an address-space cap (RLIMIT_AS on Snakemake, which every job
inherits) of the warmed-up interpreter plus `--cap-ratio` x the bf16 weights: at 1.5 that is the ratio of
an 8B bfloat16 model (16 GB) to a 24 GB GPU. On a CUDA machine (`--device cuda`) the same run is the GPU
check: each command logs its peak CUDA allocation (sfsd.cli.main) and the table puts it beside the
planner's device prediction.

    python workflow/benchmarks/paper_scale.py [--work-dir DIR] [--shape 2048,5632,40,16,4]
        [--cap-ratio 1.5 | 0] [--device cpu | cuda] [--cores 2]
        [--layers q_proj,k_proj,v_proj,o_proj,down_proj] [--budget 0.806] [--out-json FILE] [--resume]

The workflow runs as a user runs it: Snakemake on a config that points at the model folder (source local)
with the model's own dtype (bfloat16), small calibration and evaluation sizes (`RUN_CONFIG`), one method
at one budget, a search of the last block, and the inference-cost rules. The shape is
hidden,intermediate,layers,heads,kv_heads of a Llama (the default: 2.26B parameters, 4.5 GB in bf16).
`--layers` defaults to the Linear layers whose outputs are hidden-wide, so that the eigendecompositions
(cubic in a layer's output width) take minutes on a CPU, not hours; the planner is given the same layers.
Measured peaks: the peak resident memory (VmHWM) and the CUDA peak each command logs (sfsd.cli.main), the
largest over a rule's jobs.
Writes a JSON of the table and of the digests of the run's outputs (plans, factor caches, tables), so two
runs (capped and uncapped) can be compared file by file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GB = 1e9
# a small run of every stage: the numbers that matter here are memory peaks, not scores
RUN_CONFIG = {
    "calibration": {"num_samples": 32, "seq_len": 128},
    "evaluation": {"limit": 4, "check_docs": 2, "batch_size": 4, "perplexity": {"max_docs": 4}},
    "compression": {"methods": ["feature"], "budgets": {"p54": 0.806}, "allocations": ["uniform"], "first_block": 0},
    # the block-input cache at 512 MB, the fix the config check names under the cap (a cache never changes a result)
    "search": {"enabled": True, "methods": ["feature"], "modes": ["kl"], "first_block": -1, "search_limit": 2,
               "curve_limit": 2, "budgets": False, "cache_max_mb": 512},
    "laser": {"enabled": False},
    "figures": {"enabled": True},  # the search-curve figure is what asks for the search
    "speed": {"enabled": True, "allocations": ["uniform"], "prompt_tokens": 32, "decode_tokens": 4,
              "batch_sizes": [1], "repeats": 1},
}
# rule -> the planner's stage (rules not listed are not measured: they hold no model)
STAGES = {
    "collect_features": "collect_features", "eigendecompose": "eigendecompose", "factor_cache": "factor_cache:feature",
    "compress_model": "compress_model", "evaluate_model": "evaluate_model", "check_scorer": "check_scorer",
    "search": "search", "compress_searched": "compress_searched", "inference_speed": "inference_speed",
}
PEAK_LINE = re.compile(r"peak GPU memory: ([0-9.]+) GB")
HOST_PEAK_LINE = re.compile(r"peak host memory: ([0-9.]+) GB")
MODE_LINE = re.compile(r"\(streamed: auto\): (.+?), [0-9.]+ GB of host memory")  # sfsd.resources.decide's log


def baseline_address_space() -> int:
    """Address space of a warmed-up interpreter that has imported what a stage imports (bytes): the cap
    is set above it, so that it bounds the memory a stage allocates, not the code it maps."""
    code = ("import torch, transformers, lm_eval, sfsd.cli.main\n"
            "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmPeak:')))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=run_env()).stdout)


def run_env() -> dict:
    """The environment of the run: offline, and one malloc arena (glibc reserves 64 MB of address space per
    thread's arena otherwise, which an address-space cap counts though no memory is used)."""
    return {**os.environ, "MALLOC_ARENA_MAX": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "ARROW_DEFAULT_MEMORY_POOL": "system"}


def run_config(model_dir: Path, layers: list[str], device: str, budget: float) -> dict:
    compression = {**RUN_CONFIG["compression"], "budgets": {"keep": budget}}
    return {**RUN_CONFIG, "compression": compression, "models": {"bench": {"source": "local", "path": str(model_dir)}},
            "layers": layers, "device": device, "dtype": "auto"}


def run_workflow(workdir: Path, config: dict, cores: int, cap: int | None, resume: bool = False) -> float:
    """Snakemake from an empty results/ in `workdir` (`resume`: the jobs whose outputs are missing, as
    `--rerun-triggers mtime` decides), under the address-space cap; its wall time."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bench-config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "bench-config.yaml"), "--cores", str(cores), "--retries", "0"]
    if resume:
        cmd += ["--rerun-triggers", "mtime"]
    if cap:
        cmd = ["prlimit", f"--as={cap}", "--", *cmd]
    env = run_env()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (workdir / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"the workflow failed (exit {proc.returncode}); see {workdir / 'snakemake.log'}:\n"
                 f"{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def measured(workdir: Path) -> dict[str, dict]:
    """{rule: {"host": max over its jobs of max_rss (bytes), "device": max CUDA peak logged, "seconds": sum of
    its jobs' wall times, "jobs": count}} from results/benchmarks and results/logs."""
    out: dict[str, dict] = {}
    for rule in STAGES:
        rows = [r for f in sorted((workdir / "results" / "benchmarks" / rule).rglob("*.tsv"))
                for r in csv.DictReader(f.open(), delimiter="\t")]
        logs = [f.read_text() for f in (workdir / "results" / "logs" / rule).rglob("*.log")]
        peaks = [float(m.group(1)) * GB for text in logs for m in PEAK_LINE.finditer(text)]
        # the peak each command logs (VmHWM), else Snakemake's sampled max_rss (which can miss a short peak)
        host = [float(m.group(1)) * GB for text in logs for m in HOST_PEAK_LINE.finditer(text)] or [
            float(r["max_rss"]) * 2**20 for r in rows if r["max_rss"] not in ("-", "NA")]
        if rows or peaks:
            out[rule] = {"host": max(host, default=None), "device": max(peaks, default=None),
                         "seconds": sum(float(r["s"]) for r in rows), "jobs": len(rows)}
    return out


def logged_mode(workdir: Path, rule: str) -> str | None:
    """The mode a rule's jobs logged choosing (`streamed: auto`), where they all chose the same one."""
    modes = {m.group(1) for f in (workdir / "results" / "logs" / rule).rglob("*.log")
             for m in MODE_LINE.finditer(f.read_text())}
    return modes.pop() if len(modes) == 1 else None


def predicted(workdir: Path, config: dict, host_bytes: float | None) -> dict[str, dict]:
    """The planner's StageNeed of each measured rule's stage, for the model as run, on this machine with
    its host memory set to the cap (when there is one), in the mode the stage ran in (as its jobs logged
    it; the planner's choice now where they logged none)."""
    from sfsd.config import validate
    from sfsd.resources.plan import machine_of, plan_config, plan_rows

    full = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in config.items():
        full[key] = {**full[key], **value} if isinstance(value, dict) and isinstance(full.get(key), dict) else value
    validate(full)  # the schema's check, which fills in its defaults
    machine = machine_of(full, workdir)
    if host_bytes:
        machine = dataclasses.replace(machine, host_bytes=host_bytes)
    needs = plan_config(full, "bench", workdir, machine)
    _, rows = plan_rows(full, "bench", workdir, machine)
    out = {}
    for rule, stage in STAGES.items():
        if stage in needs:
            need, ran = needs[stage], logged_mode(workdir, rule)
            out[rule] = next((n for n, _, _ in rows if n.stage == need.stage and n.mode == ran), need)
    return out


def digests(workdir: Path) -> dict[str, str]:
    """sha256 of every plan, statistics, eigen and factor-cache file, table and search plan of the run (the
    outputs two runs must share; compressed weights are covered by their plans and factors), less the
    recorded `code_version` (a digest of the package's sources, which a rerun of one stage on newer code
    changes): safetensors by their tensors and other metadata, JSON by its content."""
    results = workdir / "results"
    patterns = ("bench/plans/*.json", "bench/factors/*/*.safetensors", "bench/features/*.safetensors",
                "bench/eigen/*.safetensors", "bench/search/*/plan.json", "tables/bench/*.csv")
    return {str(p.relative_to(results)): _digest(p) for pattern in patterns for p in sorted(results.glob(pattern))}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.get("__metadata__", {}).pop("code_version", None)
            h.update(json.dumps(header, sort_keys=True).encode())
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    elif path.suffix == ".json":
        h.update(json.dumps(_without_code_version(json.loads(path.read_text())), sort_keys=True).encode())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _without_code_version(value):
    if isinstance(value, dict):
        return {k: _without_code_version(v) for k, v in value.items() if k != "code_version"}
    if isinstance(value, list):
        return [_without_code_version(v) for v in value]
    return value


def table(meas: dict, pred: dict, device: str) -> str:
    where = "device" if device == "cuda" else "host"
    lines = [f"| stage | mode | predicted {where} GB | measured {where} GB | measured / predicted | jobs | wall s |",
             "|---|---|---|---|---|---|---|"]
    for rule, m in meas.items():
        need = pred.get(rule)
        want = None if need is None else (need.device_bytes if where == "device" else need.host_bytes)
        got = m[where]
        ratio = f"{got / want:.2f}" if got and want else "-"
        lines.append(f"| {rule} | {need.mode if need else '-'} | {want / GB if want else float('nan'):.2f} | "
                     f"{got / GB if got else float('nan'):.2f} | {ratio} | {m['jobs']} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sfsd-paper-scale")
    parser.add_argument("--shape", default="2048,5632,40,16,4", help="hidden,intermediate,layers,heads,kv_heads")
    parser.add_argument("--cap-ratio", type=float, default=1.5,
                        help="address space above the warmed-up interpreter, in bf16 weights (0: no cap)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--layers", default="q_proj,k_proj,v_proj,o_proj,down_proj")
    parser.add_argument("--budget", type=float, default=0.806, help="fraction of the parameters kept (a tiny model's "
                        "embedding may need more)")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--no-run", action="store_true",
                        help="no workflow run: the table and digests of the finished run in the work folder")
    parser.add_argument("--resume", action="store_true",
                        help="keep the work folder's results/ and run only the jobs whose outputs are missing "
                             "(a stage that failed under the cap, once fixed); wall time is then that of the rest")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import build_weights, embedded_model_dir, llama_config

    embedded = embedded_model_dir(None)
    vocab = json.loads((embedded / "config.json").read_text())["vocab_size"]
    config = llama_config(args.shape, vocab)
    folder = args.work_dir / ("llama-" + args.shape.replace(",", "-"))
    build_weights(config, folder, embedded, args.seed, args.shard_mb)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    cap = int(baseline_address_space() + args.cap_ratio * weights) if args.cap_ratio > 0 and args.device == "cpu" else None
    label = f"cap{args.cap_ratio:g}" if cap else "uncapped"
    workdir = args.work_dir / f"run-{args.device}-{label}"
    print(f"model {folder.name}: {weights / GB:.2f} GB of bf16 weights; cap "
          f"{'none' if cap is None else f'{cap / GB:.2f} GB of address space'}", flush=True)
    cfg = run_config(folder, args.layers.split(","), args.device, args.budget)
    if args.no_run:
        wall = float("nan")
    else:
        if (workdir / "results").exists() and not args.resume:
            import shutil

            shutil.rmtree(workdir / "results")
        wall = run_workflow(workdir, cfg, args.cores, cap, args.resume)
    meas, pred = measured(workdir), predicted(workdir, cfg, cap)
    text = table(meas, pred, args.device)
    print(f"\n{label}, {args.device}, {args.cores} cores: {wall:.0f} s in all\n{text}")
    report = {"shape": args.shape, "weights_bytes": weights, "cap_bytes": cap, "device": args.device,
              "wall_s": wall, "table": text, "measured": meas,
              "predicted": {r: {"mode": n.mode, "host": n.host_bytes, "device": n.device_bytes} for r, n in pred.items()},
              "digests": digests(workdir)}
    out = args.out_json or workdir / "paper_scale.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
