"""Block-streamed stage 1 (sfsd/model/stream.py): the statistics equal the whole-model pass bit for bit on
every supported family of decoder, the stage writes the same files either way, and a model whose weights
exceed an imposed memory limit is collected under it (when `auto` streams: tests/test_resources.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import STAT_TEXTS, build_tiny_model, deep_llama, one_thread, run_capped
from sfsd.features.calibration import tokenize
from sfsd.features.collect import collect_input_moments, collect_streamed, run_collect
from sfsd.io import load_tensors, read_json, save_tensors
from sfsd.model.loading import load_model, load_tokenizer
from sfsd.model.registry import get_arch
from sfsd.model.stream import host_available
from sfsd.provenance import tokenizer_digest

FAMILIES = ["LlamaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM"]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        a[i].keys() == b[i].keys() and all(torch.equal(getattr(a[i][g], k), getattr(b[i][g], k))
                                           for g in a[i] for k in ("xxt", "xsum", "xabs")) and
        all(a[i][g].count == b[i][g].count for g in a[i]) for i in range(len(a)))


@pytest.mark.parametrize("architecture", FAMILIES)
def test_streamed_statistics_equal_the_whole_model_pass(architecture, tmp_path):
    """Gemma 2 hands alternate blocks other masks, GPT-J's blocks return tuples and read one input for
    attention and MLP, Phi-3 and GPT-NeoX fuse their projections: bit-identical moments on each."""
    folder = build_tiny_model(tmp_path / "model", architecture)
    model, tokenizer = load_model(folder, device="cpu")
    spec = get_arch(architecture)
    tokens = tokenize(STAT_TEXTS * 3, tokenizer, seq_len=40)
    groups = list(spec.input_groups)
    whole = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"], 4,
                                  progress=False)
    streamed = collect_streamed(folder, spec, groups, tokens["input_ids"], tokens["attention_mask"], 4,
                                progress=False)
    assert _equal(whole, streamed)
    assert sum(acc.count for acc in whole[0].values()) == len(groups) * int(tokens["attention_mask"].sum())


@pytest.mark.parametrize("staging", ["device", "host"])
def test_streamed_statistics_equal_the_whole_model_pass_at_each_staging(tiny_llama, staging):
    """flush_every 2 over 5 batches (the last flush at the end of each block's pass) and either staging:
    the streamed pass and the whole-model pass do the same arithmetic, bit-identical moments."""
    model, tokenizer = load_model(tiny_llama, device="cpu")
    spec = get_arch("LlamaForCausalLM")
    tokens = tokenize(STAT_TEXTS * 2, tokenizer, seq_len=40)  # 10 sequences: 5 batches of 2
    groups = list(spec.input_groups)
    whole = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"], 2,
                                  flush_every=2, progress=False, staging=staging)
    streamed = collect_streamed(tiny_llama, spec, groups, tokens["input_ids"], tokens["attention_mask"], 2,
                                flush_every=2, progress=False, staging=staging)
    assert _equal(whole, streamed)


def test_hidden_states_past_their_budgets_go_to_host_memory_then_disk(tiny_llama, caplog):
    """With room on the "device" for one batch's hidden states and in host memory for one more, the
    others go to disk, and the moments stay bit-identical; the temporary files are removed."""
    import logging
    import tempfile
    from pathlib import Path

    model, tokenizer = load_model(tiny_llama, device="cpu")
    spec = get_arch("LlamaForCausalLM")
    tokens = tokenize(STAT_TEXTS * 3, tokenizer, seq_len=40)
    groups = list(spec.input_groups)
    whole = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"], 4,
                                  progress=False)
    one_batch = 4 * 40 * model.config.hidden_size * 4
    before = set(Path(tempfile.gettempdir()).glob("sfsd-hidden-*"))
    with caplog.at_level(logging.INFO, logger="sfsd.model.stream"):
        spilled = collect_streamed(tiny_llama, spec, groups, tokens["input_ids"], tokens["attention_mask"], 4,
                                   progress=False, hidden_bytes=(one_batch, one_batch))
    assert _equal(whole, spilled)
    import re

    placed = re.search(r"([\d.e+-]+) GB on cpu, ([\d.e+-]+) GB in host memory, ([\d.e+-]+) GB on disk", caplog.text)
    assert placed and all(float(x) > 0 for x in placed.groups()), caplog.text
    assert set(Path(tempfile.gettempdir()).glob("sfsd-hidden-*")) == before


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_host_memory_is_what_the_cgroup_leaves(version, tmp_path, monkeypatch):
    """A SLURM job's --mem is a memory cgroup: its limit minus its use bounds what the job may take."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 100 * 2**30})())
    listing = tmp_path / "cgroup"
    if version == "v2":
        listing.write_text("0::/job_42/step_0\n")
        folder, names = tmp_path / "job_42" / "step_0", ("memory.max", "memory.current")
    else:
        listing.write_text("9:cpu,cpuacct:/slurm/job_42\n4:memory:/slurm/job_42\n0::/\n")
        folder, names = tmp_path / "memory" / "slurm" / "job_42", ("memory.limit_in_bytes", "memory.usage_in_bytes")
    folder.mkdir(parents=True)
    (folder / names[0]).write_text(str(8 * 2**30))
    (folder / names[1]).write_text(str(3 * 2**30))
    assert host_available(listing, tmp_path) == 5 * 2**30
    (folder / names[0]).write_text("max" if version == "v2" else str(2**63 - 4096))  # no limit
    assert host_available(listing, tmp_path) == 100 * 2**30


def test_an_address_space_limit_bounds_the_host_memory_available(monkeypatch, tmp_path):
    """Under `ulimit -v` (RLIMIT_AS) a job process can map no more than the limit, whatever the system has
    free: the planner's auto decisions and job sizes must count that."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 100 * 2**30})())
    listing = tmp_path / "cgroup"
    listing.write_text("0::/\n")
    assert host_available(listing, tmp_path, address_limit=3 * 2**30) == 3 * 2**30
    assert host_available(listing, tmp_path, address_limit=200 * 2**30) == 100 * 2**30


def test_the_stage_writes_the_same_files_streamed_or_not(tiny_llama, tmp_path):
    _, tokenizer = load_model(tiny_llama, device="cpu")
    tokens = tokenize(STAT_TEXTS * 3, tokenizer, seq_len=40)
    save_tensors(tmp_path / "tokens.safetensors", {k: tokens[k] for k in ("input_ids", "attention_mask")},
                 {"digest": "tokens", "tokenizer_digest": tokenizer_digest(tiny_llama)})
    runs = {}
    for mode in ("never", "always"):
        runs[mode] = run_collect(tiny_llama, tmp_path / "tokens.safetensors", tmp_path / mode, "tiny",
                                 ["q_proj", "o_proj", "up_proj", "down_proj"], device="cpu", batch_size=4,
                                 streamed=mode)
    assert runs["never"]["streamed"] is False and runs["always"]["streamed"] is True
    for b in range(runs["never"]["n_blocks"]):
        never, meta_never = load_tensors(tmp_path / "never" / f"block_{b:03d}.safetensors")
        always, meta_always = load_tensors(tmp_path / "always" / f"block_{b:03d}.safetensors")
        assert never.keys() == always.keys() and all(torch.equal(never[k], always[k]) for k in never)
        assert meta_never == meta_always  # the provenance does not depend on how the model ran
    assert read_json(tmp_path / "always" / "manifest.json")["groups"] == runs["never"]["groups"]


# In a fresh process: import and warm up everything, cap the address space at what is used now plus
# `budget` MB (helpers.CAP_MEMORY), then collect.
CAPPED = """
    import os
    from sfsd.model.registry import get_arch
    from sfsd.features.collect import collect_input_moments, collect_streamed
    from sfsd.model.loading import load_model
    from sfsd.model.stream import empty_model
    folder, mode, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tokens = torch.load(os.path.join(out, "tokens.pt"))
    spec = get_arch("LlamaForCausalLM")
    empty_model(folder, torch.float32)
    cap_memory(budget)
    groups = list(spec.input_groups)
    keep = lambda b, m: torch.save({g: (a.xxt, a.xsum, a.xabs) for g, a in m.items()}, os.path.join(out, f"b{b}.pt"))
    try:
        if mode == "streamed":
            collect_streamed(folder, spec, groups, tokens["input_ids"], tokens["attention_mask"], 4,
                             progress=False, on_block=keep)
        else:
            model, _ = load_model(folder, device="cpu")
            for b, m in enumerate(collect_input_moments(model, spec, groups, tokens["input_ids"],
                                                        tokens["attention_mask"], 4, progress=False)):
                keep(b, m)
    except (MemoryError, RuntimeError) as err:
        out_of_memory(err)
"""


@pytest.mark.slow  # writes a 450 MB model
def test_weights_above_the_memory_limit_are_collected_streamed(tmp_path):
    folder = tmp_path / "model"
    model, weights_mb = deep_llama(folder)
    tokens = tokenize(STAT_TEXTS * 4, load_tokenizer(folder), seq_len=40)
    torch.save({k: tokens[k] for k in ("input_ids", "attention_mask")}, tmp_path / "tokens.pt")
    budget = 340  # one block's weights and statistics need about 120 MB above the warmed-up process
    assert weights_mb > budget + 100  # the whole model cannot fit under the cap
    runs = {}
    for mode in ("whole", "streamed"):
        out = tmp_path / mode
        out.mkdir()
        (out / "tokens.pt").write_bytes((tmp_path / "tokens.pt").read_bytes())
        runs[mode] = run_capped(CAPPED, str(folder), mode, str(budget), str(out))
    assert runs["whole"].returncode == 3 and "out of memory" in runs["whole"].stdout  # the cap bites
    assert runs["streamed"].returncode == 0, runs["streamed"].stdout + runs["streamed"].stderr[-2000:]
    with one_thread():  # as in the capped process: the same kernels' reduction order
        reference = collect_input_moments(model, get_arch("LlamaForCausalLM"), ["attn_in", "attn_out", "mlp_in",
                                          "mlp_out"], tokens["input_ids"], tokens["attention_mask"], 4, progress=False)
    for b, per_block in enumerate(reference):
        capped = torch.load(tmp_path / "streamed" / f"b{b}.pt")
        for g, acc in per_block.items():
            assert all(torch.equal(x, y) for x, y in zip(capped[g], (acc.xxt, acc.xsum, acc.xabs))), (b, g)
