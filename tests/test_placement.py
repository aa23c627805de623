"""A model too large for one GPU spread over several (sfsd/model/placement.py). The device map is computed for
two GPUs of a given size; on a CPU the same map, every GPU replaced by the CPU, runs through accelerate's
hooks, and the scorer, lm-eval, the rank search with its block-input cache, LASER and the perplexity
give exactly what the model gives in one piece."""

from __future__ import annotations

import pytest
import torch

from helpers import LINEARS, LLAMA, LogitAgreement, fresh_model, random_batches, search_settings
from sfsd.decompose.compress import apply_plan
from sfsd.decompose.plan import new_plan
from sfsd.errors import ConfigError
from sfsd.evaluate.harness import evaluate_lmeval_detailed
from sfsd.evaluate.perplexity import perplexity
from sfsd.evaluate.scoring import score_multiple_choice
from sfsd.io import model_digest
from sfsd.model.placement import (
    HEADROOM,
    device_map_over,
    gpus_needed,
    input_device,
    place_model,
    placement,
    spread,
    weight_bytes,
)
from sfsd.model.shapes import model_shapes
from sfsd.search.algorithm import SearchRecord, surgical_search
from sfsd.search.run import FactorCache


def test_gpus_needed_counts_the_weights_at_the_headroom():
    assert gpus_needed(1e9, 80e9) == 1
    assert gpus_needed(64e9, 80e9) == 1  # exactly 80% of one
    assert gpus_needed(64.1e9, 80e9) == 2
    assert gpus_needed(280e9, 80e9) == 5  # 70B in float32: 280 GB over 64 GB usable each
    assert gpus_needed(140e9, 24e9, headroom=1.0) == 6
    with pytest.raises(ConfigError, match="positive"):
        gpus_needed(1e9, 0)


def _two_gpu_map(model) -> dict:
    """The device map of `model` over two GPUs that each hold about 60% of it."""
    size = weight_bytes(model)
    return device_map_over(model, {0: int(0.7 * size), 1: int(0.7 * size)})


def test_the_device_map_keeps_blocks_whole_and_uses_every_gpu(tiny4):
    folder = tiny4[0]
    model = fresh_model(folder)
    device_map = _two_gpu_map(model)
    assert set(device_map.values()) == {0, 1}
    blocks = [k for k in device_map if k.startswith("model.layers.")]
    assert all(k.count(".") == 2 for k in blocks)  # model.layers.N: never a part of a block
    assert device_map["model.embed_tokens"] == 0
    with pytest.raises(ConfigError, match="does not fit on the devices 0, 1") as err:
        device_map_over(model, {0: weight_bytes(model) // 4, 1: weight_bytes(model) // 4})
    assert "\n" not in str(err.value)


def _on_cpu(device_map: dict) -> dict:
    """Every GPU of the map replaced by the CPU, as a device: resident weights, as on GPUs (accelerate reads
    the string "cpu" as offloading instead)."""
    return {k: torch.device("cpu") for k in device_map}


def test_auto_spreads_over_the_gpus_only_when_the_first_is_too_small(tiny4, monkeypatch):
    import sfsd.model.placement as placement_module

    model = fresh_model(tiny4[0])
    size = weight_bytes(model)
    spreads = []
    monkeypatch.setattr(placement_module, "spread", lambda m, device_map: spreads.append(device_map) or m)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (size, 10 * size))  # 80% of it is too little
    place_model(model, "auto")
    assert len(spreads) == 1 and set(spreads[0].values()) == {0, 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(size / HEADROOM) + 1, 10 * size))
    assert place_model(model, "auto").device.type == "cpu" and len(spreads) == 1  # fits the first: not spread
    place_model(model, "cpu")
    assert len(spreads) == 1


def test_a_spread_model_scores_evaluates_and_measures_as_one_piece(tiny4, arc_requests):
    folder, _, tok, _ = tiny4
    task_dir, ids, enc = arc_requests
    whole = fresh_model(folder)
    parted = spread(fresh_model(folder), _on_cpu(_two_gpu_map(whole)))
    assert getattr(parted, "hf_device_map", None) and placement(parted) == "cpu"
    assert not any(p.is_meta for p in parted.parameters())
    assert input_device(parted).type == "cpu"
    batch = random_batches()[0]
    with torch.no_grad():
        assert torch.equal(whole(batch).logits, parted(batch).logits)
    assert score_multiple_choice(whole, tok, enc, 4) == score_multiple_choice(parted, tok, enc, 4)
    args = (task_dir, ["arc_easy"], ids)
    rows, docs = evaluate_lmeval_detailed(whole, tok, *args, batch_size=4, device="cpu", splits=["search"])
    rows_parted, docs_parted = evaluate_lmeval_detailed(parted, tok, *args, batch_size=4, device="cpu",
                                                        splits=["search"])
    assert docs == docs_parted and [r["value"] for r in rows] == [r["value"] for r in rows_parted]
    texts = [{"doc_id": 0, "text": "the cat sat on the mat and the dog ran in the park. " * 4}]
    assert perplexity(whole, tok, texts, 16) == perplexity(parted, tok, texts, 16)
    laser = new_plan({"3.down_proj": {"method": "laser", "rate": 0.5}})
    apply_plan(whole, LLAMA, laser)
    apply_plan(parted, LLAMA, laser)
    assert score_multiple_choice(whole, tok, enc, 4) == score_multiple_choice(parted, tok, enc, 4)


def test_the_rank_search_and_its_block_cache_run_on_a_spread_model(tiny4):
    folder, _, _, factors = tiny4
    results = []
    for parted in (False, True):
        model = fresh_model(folder)
        if parted:
            model = spread(model, _on_cpu(_two_gpu_map(model)))
        res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, FactorCache(factors, "weight",
                              model_digest(folder)), LogitAgreement(model, 2e-4, random_batches(1)),
                              search_settings(), SearchRecord(), cache=True, progress=False)
        results.append((res.plan["layers"], [t for r in res.layers for t in r["tried"]],
                        res.summary["search_block_forwards"]))
    assert results[0] == results[1]  # the same scores bit for bit, and the cache saved the same work
