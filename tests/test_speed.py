"""Inference cost: weight bytes and the ratio arithmetic on hand-made cases, the decode loop's forward
count, the resident-memory sampler, and the CLI from a tiny dense model and a compressed folder to the
table."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from helpers import LLAMA, run_cli
from sfsd.decompose.compress import save_compressed
from sfsd.decompose.factor_cache import apply_cached_plan, save_factor_cache
from sfsd.decompose.plan import new_plan
from sfsd.errors import DataError
from sfsd.evaluate.speed import SpeedSettings, _decode, measure, speed_rows, speed_table
from sfsd.model.placement import weight_bytes


def test_weight_bytes_counts_a_tied_tensor_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head, "extra": nn.Linear(4, 3, bias=True)})
    model.register_buffer("scale", torch.ones(5, dtype=torch.float64))
    assert weight_bytes(model) == (10 * 4 + 4 * 3 + 3) * 4 + 5 * 8


def test_ratios_refer_to_the_dense_model():
    results = {"base": {"prefill_tok_s": 100.0, "decode_tok_s_b1": 10.0, "decode_tok_s_bmax": 40.0, "weight_mb": 8.0,
                        "peak_mb": 16.0},
               "feature-p34": {"prefill_tok_s": 150.0, "decode_tok_s_b1": 16.0, "decode_tok_s_bmax": 50.0,
                               "weight_mb": 4.0, "peak_mb": None}}
    rows = speed_rows(results)
    assert [r["variant"] for r in rows] == ["base", "feature-p34"]
    assert rows[0]["decode_tok_s_b1_ratio"] == 1.0
    assert rows[1]["prefill_tok_s_ratio"] == 1.5 and rows[1]["decode_tok_s_b1_ratio"] == 1.6
    assert rows[1]["weight_mb_ratio"] == 0.5 and rows[1]["peak_mb_ratio"] is None
    with pytest.raises(DataError, match="no measurement of the dense model 'base'"):
        speed_rows({"feature-p34": results["feature-p34"]})


def test_decode_runs_one_forward_per_token(tiny_stats):
    model = tiny_stats["model"]
    calls = []
    handle = model.register_forward_hook(lambda m, a, k, out: calls.append(k["input_ids"].shape), with_kwargs=True)
    try:
        with torch.inference_mode():
            _decode(model, torch.randint(3, 300, (2, 9)), steps=5)
    finally:
        handle.remove()
    assert calls == [torch.Size([2, 9])] + [torch.Size([2, 1])] * 5


def test_rss_peak_sees_an_allocation():
    """In a fresh interpreter (a long-lived one may hand the block pages it already holds): a 64 MiB
    block touched and freed inside the `with` raises the sampled peak by about that much."""
    code = textwrap.dedent("""
        import torch
        from sfsd.evaluate.speed import RssPeak
        with RssPeak() as rss:
            start = rss.peak
            block = torch.ones(64 * 2**20 // 8, dtype=torch.float64)
            block.add_(1)
            del block
        print(rss.peak - start)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) > 48


def test_measure_on_the_tiny_model(tiny_stats):
    settings = SpeedSettings(prompt_tokens=8, decode_tokens=3, batch_sizes=(1, 2), repeats=1)
    row = measure(tiny_stats["model"], settings, torch.device("cpu"), tiny_stats["model"].config.vocab_size,
                  rss_before=0.0)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0
    assert row["decode_tok_s_bmax"] == row["decode_tok_s_b2"] and row["peak_mb"] > 0
    assert row["weight_mb"] == weight_bytes(tiny_stats["model"]) / 2**20


@pytest.mark.slow  # three commands in subprocesses
def test_cli_from_models_to_table(tiny_stats, tmp_path):
    import copy

    model, digest = copy.deepcopy(tiny_stats["model"]), tiny_stats["digest"]
    save_factor_cache(model, LLAMA, "weight", list(LLAMA.linears), tmp_path / "factors" / "weight",
                      model_digest=digest)
    plan = new_plan({f"{b}.{n}": {"method": "weight", "rank": 4} for b in range(2) for n in LLAMA.linears},
                    model="tiny", model_digest=digest, architecture="LlamaForCausalLM")
    factors = apply_cached_plan(model, LLAMA, plan, tmp_path / "factors", model_digest=digest)
    folder = save_compressed(model, plan, tmp_path / "weight-r4", tokenizer=tiny_stats["tokenizer"], factors=factors)
    common = ["--model-dir", str(tiny_stats["dir"]), "--device", "cpu", "--prompt-tokens", "8", "--decode-tokens", "3",
              "--batch-sizes", "1,2", "--repeats", "1"]
    for variant, extra in (("base", []), ("weight-r4", ["--compressed", str(folder)])):
        proc = run_cli("inference-speed", *common, "--variant", variant, *extra, "--out", str(tmp_path / f"{variant}.json"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    small = json.loads((tmp_path / "weight-r4.json").read_text())
    assert small["params_fraction"] < 1 and small["weight_mb"] < json.loads((tmp_path / "base.json").read_text())["weight_mb"]
    proc = run_cli("speed-table", "--out-md", str(tmp_path / "speed.md"), "--out-csv", str(tmp_path / "speed.csv"),
                   str(tmp_path / "base.json"), str(tmp_path / "weight-r4.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "speed.md").read_text()
    assert "| base | 100.0 |" in table and "(1.00x)" in table and "| weight-r4 |" in table
    assert (tmp_path / "speed.csv").read_text().splitlines()[0].startswith("variant,")


def test_table_states_what_was_measured():
    rows = speed_rows({"base": {"prefill_tok_s": 100.0, "decode_tok_s_b1": 10.0, "decode_tok_s_bmax": 40.0,
                                "weight_mb": 8.0, "peak_mb": 16.0, "params_fraction": 1.0, "device": "cpu",
                                "threads": 2, "prompt_tokens": 128, "decode_tokens": 32, "repeats": 3,
                                "batch_sizes": [1, 8]}})
    text = speed_table(rows)
    assert "cpu, 2 threads" in text and "batch 8" in text and "medians of 3 runs" in text
