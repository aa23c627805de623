"""Surgical rank search: candidates, bisection against the linear scan, the block-input cache, resume
after kill -9, and the delta = 0 guarantee, on the tiny random Llama."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sfsd.defaults import default
from sfsd.errors import ConfigError
from sfsd.evaluate.rows import mean_metric
from sfsd.evaluate.scoring import score_multiple_choice
from sfsd.io import model_digest
from sfsd.model.registry import LINEAR_ORDER, SEARCH_ORDER, linear_order
from sfsd.model.shapes import model_shapes
from sfsd.search.algorithm import SearchRecord, candidate_ranks, choose_rank, search_order, surgical_search
from sfsd.search.block_cache import BlockCache
from sfsd.search.objectives import AccuracyObjective
from sfsd.search.run import FactorCache

from helpers import (
    LINEARS,
    LLAMA,
    REPO,
    LogitAgreement,
    RankBudget,
    fresh_model,
    random_batches,
    search_settings,
)



# ---------------------------------------------------------------- pure pieces


def test_candidate_ranks_follow_the_paper():
    assert candidate_ranks(100) == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # kappa itself = dense
    assert candidate_ranks(7) == [1, 2, 3, 4, 5, 6]  # floor(0.3 * 7) = 2 ... duplicates merged
    assert candidate_ranks(1) == []
    assert candidate_ranks(30, (0.5,)) == [1, 15]


def test_search_order_is_reverse_with_the_paper_order_inside_a_block():
    order = search_order(LLAMA, 3, LINEARS, first_block=1)
    assert order[:7] == [(2, n) for n in ("down_proj", "up_proj", "gate_proj", "o_proj", "v_proj", "k_proj", "q_proj")]
    assert order[-1] == (1, "q_proj") and len(order) == 14
    assert search_order(LLAMA, 3, ["q_proj", "down_proj"], 0, 0) == [(0, "down_proj"), (0, "q_proj")]
    assert search_order(LLAMA, 3, LINEARS, first_block=-2) == order  # the top two blocks
    with pytest.raises(ConfigError, match="out of range"):
        search_order(LLAMA, 3, LINEARS, first_block=3)
    with pytest.raises(ConfigError, match="lacks"):
        search_order(LLAMA, 3, LINEARS, 0, order=("down_proj",))


def test_default_order_is_the_registry_forward_order_reversed():
    """The order inside a block comes from the architecture registry; the config schema's search.order
    default (and so the CLI's --order) spells the same."""
    import yaml

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert search_settings().order == SEARCH_ORDER == linear_order(LLAMA, reverse=True) == LINEAR_ORDER[::-1]
    assert tuple(schema["properties"]["search"]["properties"]["order"]["default"]) == SEARCH_ORDER
    assert search_order(LLAMA, 1, LINEARS, 0) == [(0, n) for n in SEARCH_ORDER]


@pytest.mark.parametrize("threshold", [0, 1, 5, 9, 10, 17, 30, 99, 100, 101])
def test_bisection_equals_linear_scan_on_monotone_scores(threshold):
    candidates = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90]

    def score(r):  # monotone in rank
        return float(r), r >= threshold

    linear, lt = choose_rank(candidates, score, "linear")
    bisect, bt = choose_rank(candidates, score, "bisect")
    assert linear == bisect
    assert len(bt) <= math.ceil(math.log2(len(candidates) + 1))
    tried = {t.rank: t.accepted for t in bt}
    if bisect is not None:
        assert tried[bisect] is True  # the chosen rank was evaluated ...
        i = candidates.index(bisect)
        if i > 0:
            assert tried[candidates[i - 1]] is False  # ... and its smaller neighbour confirmed to fail


def test_bisection_can_differ_only_where_acceptance_is_not_monotone():
    candidates = [1, 2, 3, 4, 5, 6, 7]
    ok = {1: False, 2: True, 3: False, 4: False, 5: True, 6: True, 7: True}  # 2 passes by noise
    linear, _ = choose_rank(candidates, lambda r: (0.0, ok[r]), "linear")
    bisect, _ = choose_rank(candidates, lambda r: (0.0, ok[r]), "bisect")
    assert (linear, bisect) == (2, 5)


# ---------------------------------------------------------------- on the tiny model


def test_cached_block_inputs_equal_a_full_forward(tiny4):
    folder, _, _, _ = tiny4
    model = fresh_model(folder)
    batches = random_batches()
    captured = {}
    def capture(module, args, kwargs):
        captured[len(captured)] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = model.model.layers[2].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        full = [model(b, use_cache=False).logits for b in batches]
    handle.remove()
    cache = BlockCache(model, LLAMA)
    try:
        assert cache.record(2, lambda: [model(b, use_cache=False) for b in batches])
        assert cache.forwards["inputs"] == 2 * 4 * len(batches)  # blocks 0 and 1 only
        recorded = list(cache.states.values())
        for i in range(len(batches)):
            assert torch.equal(recorded[i], captured[i])
        with cache.cached(), torch.no_grad():
            fed = [model(b, use_cache=False).logits for b in batches]
        assert cache.forwards["search"] == 2 * 4 * len(batches)  # blocks 2 and 3 only
        for a, b in zip(full, fed):
            assert torch.equal(a, b)
        # the baseline pass records while running the whole model, and returns its result
        logits = cache.record(3, lambda: [model(b, use_cache=False).logits for b in batches], complete=True)
        assert all(torch.equal(a, b) for a, b in zip(full, logits)) and len(cache.states) == len(batches)
        with cache.cached(), torch.no_grad():
            assert all(torch.equal(model(b, use_cache=False).logits, f) for b, f in zip(batches, full))
    finally:
        cache.close()


def _held_bytes_probe(model, cache):
    """The most bytes the cache's recorded inputs took at the end of any batch (a pre-hook on the final
    norm, which runs once per batch after every block), counted from the tensors it holds."""
    peak = [0]

    def probe(module, args):
        peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in cache.states.values()))

    return peak, model.model.norm.register_forward_pre_hook(probe)


@pytest.mark.parametrize("complete", [False, True])
def test_block_cache_never_holds_more_than_its_bound(tiny4, complete):
    """Three batches of 4 x 12 x 32 float32 block inputs (6144 bytes each): a bound of 2.5 batches keeps
    none of them (they would not fit) and never held more than the bound on the way; the bound of all
    three (equal) keeps them all, and feeds the model exactly."""
    folder, _, _, _ = tiny4
    model = fresh_model(folder)
    batches = random_batches()
    one = 4 * 12 * model.config.hidden_size * 4
    with torch.no_grad():
        full = [model(b, use_cache=False).logits for b in batches]
    run = lambda: [model(b, use_cache=False).logits for b in batches]  # noqa: E731
    for bound, fits in ((2.5 * one, False), (3 * one, True)):
        cache = BlockCache(model, LLAMA, max_bytes=bound)
        peak, handle = _held_bytes_probe(model, cache)
        try:
            cache.record(2, run, complete=complete)
            assert peak[0] <= bound and cache.held <= bound
            if complete:
                assert peak[0] == (3 if fits else 2) * one  # the third batch is sized before it is kept
            assert (cache.block == 2, cache.exceeded, cache.held, len(cache.states)) == (
                (True, False, 3 * one, 3) if fits else (False, True, 0, 0))
            with cache.cached(), torch.no_grad():  # fed the recorded inputs, or full forwards
                assert all(torch.equal(model(b, use_cache=False).logits, f) for b, f in zip(batches, full))
        finally:
            handle.remove()
            cache.close()


def test_search_results_equal_with_without_and_past_the_cache_bound(tiny4, monkeypatch):
    """The same plan and scores without the cache, with it, and with a bound below the block inputs of the
    two batches (the cache then never holds more than the bound, tries to record only once, in the baseline
    pass, and costs what full forwards cost)."""
    from sfsd.search import block_cache

    folder, _, _, factors = tiny4
    held = [0]
    store = block_cache.BlockCache._store

    def counted(self, hidden):
        store(self, hidden)
        held[0] = max(held[0], sum(t.numel() * t.element_size() for t in self.states.values()))

    monkeypatch.setattr(block_cache.BlockCache, "_store", counted)
    runs = {}
    one = 4 * 12 * 32 * 4  # one batch's block input
    for name, cache, bound in (("none", False, 4 * 2**30), ("cache", True, 4 * 2**30), ("bound", True, 1.5 * one)):
        model, held[0] = fresh_model(folder), 0
        res = surgical_search(model, LLAMA, model_shapes(model), ["o_proj", "down_proj"],
                              FactorCache(factors, "weight", model_digest(folder)),
                              LogitAgreement(model, 1e-5, random_batches(1, n=2)), search_settings(),
                              SearchRecord(), cache=cache, cache_max_bytes=bound, progress=False)
        runs[name] = (res.plan["layers"], [t for r in res.layers for t in r["tried"]], res.summary)
        if name == "bound":
            assert 0 < held[0] <= bound
    assert runs["none"][:2] == runs["cache"][:2] == runs["bound"][:2]
    assert {e["method"] for e in runs["none"][0].values()} == {"weight", "dense"}  # some layers cut, some kept
    none, cached, bounded = (runs[k][2] for k in ("none", "cache", "bound"))
    assert bounded["search_block_forwards"] == none["search_block_forwards"] > cached["search_block_forwards"]
    # blocks 3 and 2: block 2's inputs are not recorded once block 3's (the same size) did not fit
    assert bounded["forwards"] == none["forwards"] and cached["forwards"]["inputs"] > 0
    assert bounded["cache_peak_mb"] == 0


def test_bisection_with_cache_picks_the_linear_scan_ranks(tiny4, tmp_path):
    folder, _, _, factors = tiny4
    results = {}
    for strategy, cache in (("linear", False), ("bisect", True)):
        model = fresh_model(folder)
        objective = RankBudget(model, 0.0, random_batches())
        objective.threshold = lambda baseline, step: -10.0 * (step // 2)  # step 1 allows none: dense
        objective.passes = lambda s, t: s >= t
        res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, FactorCache(factors, "weight", model_digest(folder)),
                              objective, search_settings(strategy=strategy), SearchRecord(),
                              cache=cache, progress=False)
        results[strategy] = res
    lin, bis = results["linear"], results["bisect"]
    assert lin.plan["layers"] == bis.plan["layers"]
    assert any(e["method"] == "weight" for e in bis.plan["layers"].values())
    assert any(e["method"] == "dense" for e in bis.plan["layers"].values())
    assert bis.summary["search_block_forwards"] < lin.summary["search_block_forwards"]
    assert bis.summary["evaluations"] < lin.summary["evaluations"]


def test_real_logits_objective_same_plan_with_and_without_cache(tiny4, tmp_path):
    folder, _, _, factors = tiny4
    plans = []
    for cache in (False, True):
        model = fresh_model(folder)
        res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, FactorCache(factors, "weight", model_digest(folder)),
                              LogitAgreement(model, 2e-4, random_batches(1)), search_settings(), SearchRecord(),
                              cache=cache, progress=False)
        plans.append((res.plan["layers"], [t for r in res.layers for t in r["tried"]]))
    assert plans[0] == plans[1]  # identical scores, bit for bit: the cache is exact


def test_delta_zero_never_lowers_the_search_score(tiny4, arc_requests, tmp_path):
    folder, _, tok, factors = tiny4
    _, _, enc = arc_requests
    model = fresh_model(folder)
    objective = AccuracyObjective(tok, enc, "acc_norm", delta=0.0, batch_size=8)
    res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, FactorCache(factors, "weight", model_digest(folder)), objective,
                          search_settings(first_block=3), SearchRecord(), progress=False)
    baseline = res.summary["baseline"]
    for r in res.layers:
        for t in r["tried"]:
            assert t["accepted"] == (t["score"] >= baseline)
    final = mean_metric(score_multiple_choice(model, tok, enc, 8), "acc_norm")
    assert final >= baseline
    assert res.layers[-1]["params_model_fraction"] <= 1.0


def test_budget_stop_and_checkpoints(tiny4, tmp_path):
    folder, _, _, factors = tiny4
    model = fresh_model(folder)
    objective = RankBudget(model, 0.0, random_batches())
    objective.passes = lambda s, t: True  # accept rank 1 everywhere: parameters fall fastest
    res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, FactorCache(factors, "weight", model_digest(folder)), objective,
                          search_settings(first_block=0, stop_at=0.97, checkpoints=(0.99, 0.98)), SearchRecord(),
                          progress=False)
    assert res.summary["stopped_at_budget"]
    assert res.layers[-1]["params_model_fraction"] <= 0.97 < res.layers[-2]["params_model_fraction"]
    assert set(res.checkpoints) == {"p99", "p98"}
    assert len(res.checkpoints["p99"]["layers"]) <= len(res.checkpoints["p98"]["layers"]) <= len(res.layers)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="search.delta"):
        search_settings(delta=1.5).check()
    with pytest.raises(ConfigError, match="search.methods"):
        search_settings(method="laser").check()
    with pytest.raises(ConfigError, match="search.stop_at"):
        search_settings(stop_at=1.0).check()
    with pytest.raises(ConfigError, match="search.metric 'f1' is unknown"):
        search_settings(metric="f1").check()
    assert search_settings().metric == default("search.metric") == "paper"


def test_accuracy_objective_uses_each_tasks_paper_metric(tiny4, arc_requests):
    _, model, tok, _ = tiny4
    _, _, enc = arc_requests
    scores = score_multiple_choice(model, tok, enc, 8)
    objective = AccuracyObjective(tok, enc, batch_size=8)  # default "paper": acc_norm for ARC-Easy
    assert objective.metric == "paper"
    assert objective.score(model) == mean_metric(scores, "acc_norm") == mean_metric(scores, "paper")
    assert AccuracyObjective(tok, enc, "acc", batch_size=8).score(model) == mean_metric(scores, "acc")


def test_search_metric_undefined_for_a_target_fails_before_scoring(tiny4, arc_requests, tmp_path, capsys):
    from sfsd.cli.main import main

    out = tmp_path / "s" / "weight-accuracy-boolq"
    args = _cli(tiny4, arc_requests, out)[3:]  # without `python -m sfsd`
    args[args.index("--target") + 1] = args[args.index("--tasks") + 1] = "boolq"
    code = main([*args, "--metric", "acc_norm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: search.metric: lm-eval defines no acc_norm for boolq"), err[-3:]
    assert not out.exists()


# ---------------------------------------------------------------- resume after kill -9 (real CLI)


def _cli(tiny4, arc_requests, out, extra=()):
    folder, _, _, factors = tiny4
    task_dir, ids, _ = arc_requests
    splits = out.parent / "splits.json"
    if not splits.exists():
        splits.parent.mkdir(parents=True, exist_ok=True)
        splits.write_text(json.dumps({"tasks": ids}))
    return [sys.executable, "-m", "sfsd", "--threads", "1", "search", "--model-dir", str(folder),
            "--model-name", "tiny", "--factors", str(factors), "--method", "weight", "--mode", "accuracy", "--target", "arc_easy",
            "--first-block", "0", "--layers", ",".join(LINEARS), "--tasks-dir", str(task_dir), "--splits", str(splits),
            "--tasks", "arc_easy", "--search-limit", "12", "--curve-limit", "4", "--device", "cpu",
            "--delta", "0.05", "--ppl-search-fraction", "0.2", "--out", str(out), *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "workflow")}


@pytest.mark.slow  # a search killed and resumed, in subprocesses
def test_resume_after_kill_gives_the_uninterrupted_plan(tiny4, arc_requests, tmp_path):
    whole = tmp_path / "a" / "feature-accuracy-arc_easy"
    subprocess.run(_cli(tiny4, arc_requests, whole), check=True, env=_env(), capture_output=True)
    killed = tmp_path / "b" / "feature-accuracy-arc_easy"
    state = killed.with_name(killed.name + ".state.jsonl")
    proc = subprocess.Popen(_cli(tiny4, arc_requests, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and state.read_text().count('"type": "layer"') >= 9:
            os.kill(proc.pid, signal.SIGKILL)  # mid-search, after 9 of 28 layers
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before it could be killed"
    assert not killed.exists() and state.exists()
    done = proc and state.read_text().count('"type": "layer"')
    second = subprocess.run(_cli(tiny4, arc_requests, killed), check=True, env=_env(), capture_output=True,
                            text=True)
    assert f"{done} layers done" in second.stderr
    plan_a = json.loads((whole / "plan.json").read_text())
    plan_b = json.loads((killed / "plan.json").read_text())
    assert plan_a["layers"] == plan_b["layers"]
    log_a = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [(r["layer"], r["rank"], r["tried"]) for r in log_a] == [(r["layer"], r["rank"], r["tried"]) for r in log_b]
    import pyarrow.parquet as pq

    curve_a = pq.read_table(whole / "curve.parquet").to_pylist()
    curve_b = pq.read_table(killed / "curve.parquet").to_pylist()
    assert [(r["layers_done"], r["task"], r["metric"], r["value"]) for r in curve_a] == \
        [(r["layers_done"], r["task"], r["metric"], r["value"]) for r in curve_b]
    assert not state.exists()
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["layers_searched"] == 28 and summary["search_block_forwards"] > 0


@pytest.mark.slow  # a search and an evaluation through the CLI
def test_evaluated_documents_are_disjoint_from_those_any_search_scored(tiny4, arc_requests, tmp_path):
    """What the evaluate stage scores for every variant (task docs and perplexity text, as recorded in its
    per-item file) shares no document with what an accuracy or a perplexity search decided on (recorded in
    their summaries), so no table number is measured on text a search was tuned on."""
    import pyarrow.parquet as pq

    folder, _, _, _ = tiny4
    task_dir, _, _ = arc_requests
    ppl = ["--ppl-window", "32", "--ppl-max-docs", "30"]
    runs = {}
    for mode, target in (("accuracy", "arc_easy"), ("perplexity", "lambada")):
        out = tmp_path / "search" / f"weight-{mode}-{target}"
        subprocess.run(_cli(tiny4, arc_requests, out, ("--mode", mode, "--target", target, *ppl)), check=True,
                       env=_env(), capture_output=True)
        runs[mode] = json.loads((out / "summary.json").read_text())["search_docs"]
    items = tmp_path / "eval" / "base.docs.parquet"
    subprocess.run([sys.executable, "-m", "sfsd", "--threads", "1", "evaluate", "--model-dir", str(folder),
                    "--model-name", "tiny", "--variant", "base", "--tasks-dir", str(task_dir), "--tasks", "arc_easy",
                    "--splits", str(tmp_path / "search" / "splits.json"), "--device", "cpu", "--ppl-source", "lambada",
                    *ppl, "--ppl-search-fraction", "0.2", "--out", str(tmp_path / "eval" / "base.parquet"),
                    "--items-out", str(items)], check=True, env=_env(), capture_output=True)
    table = pq.read_table(items)
    evaluated_ppl = json.loads(table.schema.metadata[b"ppl_doc_ids"])
    evaluated_docs = {r["item"] for r in table.to_pylist() if r["unit"] == "doc" and r["task"] == "arc_easy"}
    searched_ppl, searched_docs = runs["perplexity"], set(runs["accuracy"]["arc_easy"]["search"])
    assert len(searched_ppl) == 6 and len(evaluated_ppl) == 24  # 20% / 80% of the 30 documents
    assert not set(searched_ppl) & set(evaluated_ppl)
    assert searched_docs and evaluated_docs and not searched_docs & evaluated_docs
    windows = [r for r in table.to_pylist() if r["unit"] == "window"]
    assert windows and all(r["nll"] > 0 and r["tokens"] == 31 for r in windows)
