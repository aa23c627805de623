"""The search's continuous objectives, its plans landed on parameter budgets, and the released procedure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sfsd.decompose.lowrank import cut_factors, from_factors, linear_path, replace_module
from sfsd.decompose.methods import Factors, max_rank
from sfsd.decompose.plan import count_params, layer_key
from sfsd.evaluate.rows import mean_metric
from sfsd.evaluate.scoring import encode_requests, score_multiple_choice
from sfsd.io import model_digest
from sfsd.model.shapes import model_shapes
from sfsd.search.algorithm import SearchRecord, candidate_ranks, released_rank, search_order, surgical_search
from sfsd.search.objectives import AccuracyObjective, KLObjective, LoglikObjective
from sfsd.search.run import FactorCache, SearchState

from helpers import LINEARS, LLAMA, RankBudget, fresh_model, random_batches, search_settings


def test_loglik_and_kl_objectives_known_values(tiny4, arc_requests):
    """loglik = the mean gold log-likelihood; kl = 0 for the reference model itself and the mean KL of the
    softmax over the choices' log-likelihoods for another model, both computed here by hand."""
    folder, _, tok, factors = tiny4
    _, _, enc = arc_requests
    model = fresh_model(folder)
    scores = score_multiple_choice(model, tok, enc, 8, share_prefix=False)
    golds = [d.gold for d in enc.docs]
    expected = sum(s["lls"][g] for s, g in zip(scores, golds)) / len(scores)  # one task: the mean over docs
    assert LoglikObjective(tok, enc).score(model) == pytest.approx(expected, abs=1e-9)
    kl = KLObjective(tok, enc, delta=0.01)
    assert kl.score(model) == pytest.approx(0.0, abs=1e-12)  # the first model scored is the reference
    entry = FactorCache(factors, "weight", model_digest(folder))(3, "down_proj")
    f = cut_factors(entry, "weight", 1)
    replace_module(model, linear_path(LLAMA, 3, "down_proj"), from_factors(Factors(*f.__dict__.values())))
    other = score_multiple_choice(model, tok, enc, 8, share_prefix=False)
    by_hand = 0.0
    for a, b in zip(scores, other):
        p = torch.log_softmax(torch.tensor(a["lls"], dtype=torch.float64), 0)
        q = torch.log_softmax(torch.tensor(b["lls"], dtype=torch.float64), 0)
        by_hand += float((p.exp() * (p - q)).sum())
    value = kl.score(model)
    assert value == pytest.approx(by_hand / len(scores), rel=1e-9) and value > 0
    assert kl.passes(0.0099, kl.threshold(0.0, 1)) and not kl.passes(0.0101, kl.threshold(0.0, 1))
    assert not kl.passes(math.nan, 1.0)


def test_plans_land_exactly_on_each_budget(tiny4, tmp_path):
    """With budgets, the plan at each budget has the decisions up to the layer that crossed it, and that
    layer's rank raised as far as the budget allows: at most the budget, above it by less than one rank
    step of that layer."""
    folder, _, _, factors = tiny4
    model = fresh_model(folder)
    shapes = model_shapes(model)
    objective = RankBudget(model, 0.0, random_batches())
    objective.passes = lambda s, t: True  # rank 1 everywhere: parameters fall fastest
    budgets = (("b97", 0.97), ("b95", 0.95), ("b10", 0.10))
    res = surgical_search(model, LLAMA, shapes, LINEARS, FactorCache(factors, "weight", model_digest(folder)), objective,
                          search_settings(first_block=0, budgets=budgets), SearchRecord(), progress=False)
    assert res.summary["budgets_reached"] == {"b97": True, "b95": True, "b10": False}
    total = count_params(shapes, {"layers": {}})["model"]["dense"]
    for label, fraction in budgets[:2]:
        plan = res.checkpoints[label]
        reached = count_params(shapes, plan)["model"]["fraction"]
        crossing = plan["notes"]["crossing_layer"]
        out_f, in_f = shapes.linears[crossing.split(".")[1]]
        assert fraction - (in_f + out_f) / total < reached <= fraction
        assert plan["notes"]["params_fraction"] == pytest.approx(reached)
        assert plan["notes"]["landed_rank"] is None or plan["notes"]["landed_rank"] >= plan["notes"]["accepted_rank"]
        order = [r["layer"] for r in res.layers]
        assert list(plan["layers"]) == order[:order.index(crossing) + 1]
        assert all(plan["layers"][k] == {"method": "weight", "rank": 1} for k in order[:order.index(crossing)])


def _released_transcription(model, tok, enc, entry_of, order, delta):
    """The released code's loop written out plainly (no cache, no bisection): baselines on the dense model
    per chunk and on the whole split; per layer a linear scan per chunk, the largest pick, a re-check."""
    def score(requests):
        return mean_metric(score_multiple_choice(model, tok, requests, 8, share_prefix=False), "paper")

    docs = enc.docs
    third = len(docs) // 3
    chunks = [encode_requests(tok, docs[i * third:(i + 1) * third], enc.max_length) for i in range(3)]
    with torch.no_grad():
        chunk_base = [score(c) for c in chunks]
        whole_base = score(enc)
    decisions = {}
    for block, linear in order:
        path = linear_path(LLAMA, block, linear)
        dense = model.get_submodule(path)
        kappa = max_rank(dense.in_features, dense.out_features)
        candidates = candidate_ranks(kappa) + [kappa]  # the released list ends at kappa itself

        def set_rank(r):
            if r == kappa:
                replace_module(model, path, dense)
            else:
                f = cut_factors(entry_of(block, linear), "weight", r)
                replace_module(model, path, from_factors(Factors(*f.__dict__.values())))

        picks = []
        for i in range(3):
            if picks and max(picks) == kappa:
                break
            pick = kappa
            for r in candidates:
                set_rank(r)
                with torch.no_grad():
                    if score(chunks[i]) >= chunk_base[i] - delta:
                        pick = r
                        break
            picks.append(pick)
        best = max(picks)
        set_rank(best)
        with torch.no_grad():
            keep = best != kappa and score(enc) >= whole_base - delta
        if not keep:
            set_rank(kappa)
        decisions[layer_key(block, linear)] = {"method": "weight", "rank": best} if keep else {"method": "dense"}
    return decisions


@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_released_procedure_matches_a_transcription_of_the_released_loop(tiny4, arc_requests, tmp_path, delta):
    folder, _, tok, factors = tiny4
    _, _, enc = arc_requests
    model = fresh_model(folder)
    cache = FactorCache(factors, "weight", model_digest(folder))
    objective = AccuracyObjective(tok, enc, "paper", delta=delta)
    settings = search_settings(first_block=2, strategy="released", delta=delta)
    res = surgical_search(model, LLAMA, model_shapes(model), LINEARS, cache, objective, settings,
                          SearchState(tmp_path / "s.jsonl", settings), progress=False)
    order = search_order(LLAMA, 4, LINEARS, 2)
    expected = _released_transcription(fresh_model(folder), tok, enc, cache, order, delta)
    assert res.plan["layers"] == expected
    methods = {e["method"] for e in expected.values()}
    tried = [t for r in res.layers for t in r["tried"]]
    assert {t["split"] for t in tried} >= {"chunk0", "search"}
    if delta > 0:  # a loose tolerance compresses: the comparison covers factored decisions too
        assert "weight" in methods


def test_released_rank_combines_chunks_as_the_released_code():
    """The largest chunk pick, re-checked; a chunk needing the dense layer ends it; a failed re-check keeps
    the layer dense without trying a larger rank."""
    cands = [1, 2, 4, 8]
    accept_from = {0: 2, 1: 4, 2: 1}
    chunk_tries = [lambda r, i=i: (float(r), r >= accept_from[i]) for i in range(3)]
    rank, trials = released_rank(cands, chunk_tries, lambda r: (1.0, True))
    assert rank == 4 and trials[-1].split == "search" and trials[-1].rank == 4
    assert [t.rank for t in trials if t.split == "chunk1"] == [1, 2, 4]
    rank, trials = released_rank(cands, chunk_tries, lambda r: (0.0, False))
    assert rank is None and [t.rank for t in trials if t.split == "search"] == [4]
    never = [lambda r: (0.0, False)] + chunk_tries[1:]
    rank, trials = released_rank(cands, never, lambda r: (1.0, True))
    assert rank is None and {t.split for t in trials} == {"chunk0"}


def test_kl_search_resumes_with_the_dense_reference(tiny4, arc_requests, tmp_path):
    """A kl search killed after two layers resumes to the plan of an uninterrupted run: the reference
    distributions come from the dense model, scored before the finished decisions are replayed."""
    folder, _, tok, factors = tiny4
    _, _, enc = arc_requests
    cache = FactorCache(factors, "weight", model_digest(folder))
    settings = search_settings(first_block=3, mode="kl", kl_max=1e-5)
    state = tmp_path / "s.jsonl"
    full = surgical_search(fresh_model(folder), LLAMA, model_shapes(fresh_model(folder)), LINEARS, cache,
                           KLObjective(tok, enc, delta=1e-5), settings, SearchState(state, settings), progress=False)
    lines = state.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["type"] in ("header", "baseline")]
    layers = [line for line in lines if json.loads(line)["type"] == "layer"][:2]
    state.write_text("\n".join(kept + layers) + "\n")
    resumed = surgical_search(fresh_model(folder), LLAMA, model_shapes(fresh_model(folder)), LINEARS, cache,
                              KLObjective(tok, enc, delta=1e-5), settings, SearchState(state, settings),
                              progress=False)
    assert resumed.summary["resumed_after_layers"] == 2
    assert resumed.plan["layers"] == full.plan["layers"]
    assert [r["tried"] for r in resumed.layers] == [r["tried"] for r in full.layers]
    assert len({e.get("rank") for e in full.plan["layers"].values()}) > 1  # not one decision everywhere


def test_released_chunks_need_three_documents_of_every_task(tiny4, arc_requests):
    """Every task is cut in three: a task with fewer search documents is a one-line error, not a task that
    silently drops out of the chunks; a kl chunk starts without the whole split's reference."""
    from sfsd.errors import ConfigError

    _, _, tok, _ = tiny4
    _, _, enc = arc_requests
    few = encode_requests(tok, enc.docs[:2], enc.max_length)
    with pytest.raises(ConfigError, match="arc_easy has fewer than 3 documents"):
        AccuracyObjective(tok, few).chunks()
    kl = KLObjective(tok, enc, reference=["stale"])
    assert all(c.reference is None and len(c.requests.docs) == len(enc.docs) // 3 for c in kl.chunks())
