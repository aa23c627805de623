"""What a compressed model costs when it runs: prefill and decode throughput, weight bytes and peak memory,
measured on the same prompts for the dense model and each compressed variant.

- `measure(model, settings, device)`: one model in memory. Prompts are seeded random token ids (the
  throughput of a forward pass does not depend on which tokens it reads): prefill = one forward over
  `batch x prompt_tokens` tokens, the lm_head on the last position only (as generate() runs it); decode = `decode_tokens` single-token forwards with the KV cache after
  that prefill, greedy, at each batch size of `batch_sizes`. Each timing is the median of `repeats` runs
  after one warm-up run. On CUDA every timing synchronises the GPUs first and last.
- Memory: weight bytes (`placement.weight_bytes`); peak memory is the GPUs' peak allocations summed
  (several for a model spread over them), and on the CPU the peak resident set sampled while the model runs (`RssPeak`)
  minus the resident set before the model was loaded (so each variant runs in its own process: the CLI's
  `inference-speed` measures one folder per call, which the rule and the benchmark script do).
- `speed_rows(results)` / `speed_table`: every variant's numbers as a ratio to the dense model's.

Pure measurement and arithmetic on tensors and dicts; the reading and writing of files is the CLI's.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sfsd.defaults import default
from sfsd.errors import DataError
from sfsd.model.placement import devices_of, weight_bytes

RATIO_KEYS = ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_bmax", "weight_mb", "peak_mb")


@dataclass(frozen=True)
class SpeedSettings:
    """What is measured (the `speed:` config section)."""

    prompt_tokens: int = default("speed.prompt_tokens")
    decode_tokens: int = default("speed.decode_tokens")
    batch_sizes: tuple[int, ...] = tuple(default("speed.batch_sizes"))
    repeats: int = default("speed.repeats")
    seed: int = 0


def rss_mb() -> float:
    """This process's resident set now, in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssPeak:
    """The largest resident set (MB) seen while the `with` block runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def _timed(run: Callable[[], None], gpus: Sequence[torch.device], repeats: int) -> float:
    """Median wall time (s) of `run` over `repeats` calls, after one warm-up call (every GPU the model is
    on synchronised before and after)."""
    def sync() -> None:
        for gpu in gpus:
            torch.cuda.synchronize(gpu)

    run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _last_logits_only(model: nn.Module) -> dict:
    """`logits_to_keep=1` where the model takes it: the lm_head on the last position only, as generate()
    runs it (a 49k-word vocabulary at every prompt position would dominate a small model's prefill)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _prefill(model: nn.Module, prompt: torch.Tensor):
    return model(input_ids=prompt, use_cache=True, **_last_logits_only(model))


def _decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> None:
    """Greedy decoding of `steps` tokens after the prompt, one token per forward with the KV cache."""
    out = _prefill(model, prompt)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)


def measure(model: nn.Module, settings: SpeedSettings, device: torch.device, vocab_size: int,
            rss_before: float | None = None) -> dict:
    """Throughput of one model (in eval mode, on `device`): prefill tokens/s at the largest batch, decode
    tokens/s at each batch size (decode time = the prefill-plus-decode time minus the prefill's), and
    memory. `rss_before`: the resident set (MB) before the model was loaded (CPU peak memory)."""
    g = torch.Generator().manual_seed(settings.seed)
    largest = max(settings.batch_sizes)
    prompts = torch.randint(0, vocab_size, (largest, settings.prompt_tokens), generator=g).to(device)
    gpus = [d for d in devices_of(model) if d.type == "cuda"]  # several for a spread model
    row: dict = {"device": device.type, "threads": torch.get_num_threads(), **settings.__dict__,
                 "batch_sizes": list(settings.batch_sizes)}
    with torch.inference_mode(), RssPeak() as rss:
        prefill = _timed(lambda: _prefill(model, prompts), gpus, settings.repeats)
        row["prefill_tok_s"] = prompts.numel() / prefill
        for batch in settings.batch_sizes:
            prompt = prompts[:batch]
            first = _timed(lambda: _prefill(model, prompt), gpus, settings.repeats)
            both = _timed(lambda: _decode(model, prompt, settings.decode_tokens), gpus, settings.repeats)
            row[f"decode_tok_s_b{batch}"] = batch * settings.decode_tokens / max(both - first, 1e-9)
    row.setdefault("decode_tok_s_b1", None)
    row["decode_tok_s_bmax"] = row[f"decode_tok_s_b{largest}"]
    row["weight_mb"] = weight_bytes(model) / 2**20
    if gpus:
        row["peak_mb"] = sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) / 2**20
    elif rss_before is not None:
        row["peak_mb"] = rss.peak - rss_before
    return row


def speed_rows(results: Mapping[str, Mapping], dense: str = "base") -> list[dict]:
    """One row per variant (the dense one first): its numbers and each as a ratio to the dense model's."""
    if dense not in results:
        raise DataError(f"no measurement of the dense model {dense!r} among {sorted(results)}; measure it too")
    base = results[dense]
    rows = []
    for name in [dense, *sorted(n for n in results if n != dense)]:
        r = dict(results[name])
        for key in RATIO_KEYS:
            value, reference = r.get(key), base.get(key)
            r[f"{key}_ratio"] = value / reference if value is not None and reference else None
        rows.append({"variant": name, **r})
    return rows


def _cell(value, ratio=None) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def speed_table(rows: Sequence[Mapping]) -> str:
    """Markdown: per variant its parameters, weight and peak memory, prefill and decode throughput, each
    with its ratio to the dense model."""
    first = rows[0]
    bmax = max(first["batch_sizes"])
    lines = [f"| variant | params % | weights MB | peak MB | prefill tok/s (batch {bmax}) | decode tok/s, batch 1 "
             f"| decode tok/s, batch {bmax} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        params = f"{100 * r['params_fraction']:.1f}" if r.get("params_fraction") is not None else "-"
        lines.append(f"| {r['variant']} | {params} | {_cell(r['weight_mb'], r['weight_mb_ratio'])} "
                     f"| {_cell(r.get('peak_mb'), r.get('peak_mb_ratio'))} "
                     f"| {_cell(r['prefill_tok_s'], r['prefill_tok_s_ratio'])} "
                     f"| {_cell(r['decode_tok_s_b1'], r['decode_tok_s_b1_ratio'])} "
                     f"| {_cell(r['decode_tok_s_bmax'], r['decode_tok_s_bmax_ratio'])} |")
    lines.append("")
    lines.append(f"{first['device']}, {first['threads']} threads; prompts of {first['prompt_tokens']} tokens, "
                 f"{first['decode_tokens']} decoded tokens; medians of {first['repeats']} runs; ratios to the "
                 "dense model (peak: resident memory above the process's before loading on CPU, allocated "
                 "memory on CUDA).")
    return "\n".join(lines) + "\n"
