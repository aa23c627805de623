"""Stage 2's eigen files keep the top min(in, out) eigenpairs of each Linear: on the tiny Llama, whose
gate/up projections widen (32 -> 48), everything read from them (factor cache, compressed weights, summary,
spectra) equals what the full out x out eigenvectors give, the stage before this change wrote."""

from __future__ import annotations

import copy

import pytest
import torch

from sfsd.decompose.compress import apply_plan, cached_statistics
from sfsd.decompose.factor_cache import apply_cached_plan, save_factor_cache
from sfsd.decompose.plan import new_plan, uniform_plan
from sfsd.features.collect import block_file, load_block_moments
from sfsd.features.eigen import run_eigen, summarize
from sfsd.features.stats import covariance_factor, output_eigen, output_mean
from sfsd.io import checkpoint_index, load_tensors, read_parameters, save_tensors
from sfsd.report.spectra import spectra_rows

from helpers import LINEARS, LLAMA

WIDENING = ("gate_proj", "up_proj")  # 32 -> 48 in the tiny Llama


@pytest.fixture(scope="module")
def eigen_files(tiny_stats, tmp_path_factory):
    """results/tiny/{features,eigen} as stages 1 and 2 write them, and beside them (full/eigen) the files
    with every eigenpair: the full out x out eigenvectors computed as before (the completion included)."""
    root = tmp_path_factory.mktemp("results") / "tiny"
    full = root.parent / "full"
    model_dir, digest = tiny_stats["dir"], tiny_stats["digest"]
    groups = sorted({LLAMA.group_of(lin) for lin in LINEARS})
    index = checkpoint_index(model_dir)
    for b in range(2):
        features = root / "features" / block_file(b)
        save_tensors(features, tiny_stats["features"][b], {"model_digest": digest, "block": b, "groups": groups,
                                                           "architecture": "LlamaForCausalLM", "model": "tiny"})
        run_eigen(features, model_dir, root / "eigen" / block_file(b), LINEARS)
        moments, _ = load_block_moments(features)
        weights = read_parameters(model_dir, [LLAMA.param_name(b, lin, "weight") for lin in LINEARS], index=index)
        tensors, meta = load_tensors(root / "eigen" / block_file(b))
        everything = {}
        for lin in LINEARS:
            weight = weights[LLAMA.param_name(b, lin, "weight")]
            acc = moments[LLAMA.group_of(lin)]
            factor = covariance_factor(acc.covariance())
            if lin in WIDENING:
                assert factor is not None  # the SVD path, whose completion the files used to hold
            eig = output_eigen(weight, acc.covariance(), factor)  # complete: out x out
            everything.update({f"{lin}.eigenvalues": eig.values, f"{lin}.eigenvectors": eig.vectors.float(),
                               f"{lin}.mean": output_mean(weight, None, acc.mean())})
        save_tensors(full / "eigen" / block_file(b), everything, meta)
    return root, full


def test_eigen_files_store_the_top_min_in_out_eigenpairs(eigen_files):
    root, full = eigen_files
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
              "gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}  # (out, in)
    for b in range(2):
        stored, meta = load_tensors(root / "eigen" / block_file(b))
        everything, _ = load_tensors(full / "eigen" / block_file(b))
        for lin, (out, inp) in shapes.items():
            keep = min(out, inp)
            assert stored[f"{lin}.eigenvectors"].shape == (out, keep)
            assert stored[f"{lin}.eigenvalues"].shape == (keep,)
            assert meta["layers"][lin]["dim"] == out and meta["layers"][lin]["stored"] == keep
            assert everything[f"{lin}.eigenvectors"].shape == (out, out)
            assert torch.equal(stored[f"{lin}.eigenvectors"], everything[f"{lin}.eigenvectors"][:, :keep])
            assert torch.equal(stored[f"{lin}.eigenvalues"], everything[f"{lin}.eigenvalues"][:keep])
            assert not everything[f"{lin}.eigenvalues"][keep:].any()  # what is left out is the zero completion
            torch.testing.assert_close(stored[f"{lin}.mean"], everything[f"{lin}.mean"], rtol=0, atol=0)


def test_readers_of_the_eigen_files_give_what_the_full_eigenvectors_give(eigen_files, tiny_stats, tmp_path):
    root, full = eigen_files
    model, digest = tiny_stats["model"], tiny_stats["digest"]
    # the factor cache: bit-identical tensors
    for where, source in (("stored", root), ("full", full)):
        save_factor_cache(model, LLAMA, "feature", LINEARS, tmp_path / where / "feature",
                          cached_statistics(source, digest)[0], model_digest=digest)
    for b in range(2):
        a, _ = load_tensors(tmp_path / "stored" / "feature" / block_file(b))
        c, _ = load_tensors(tmp_path / "full" / "feature" / block_file(b))
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), b
    # compressed weights, cut from the cache and computed directly, at kappa - 1 on the widening layers
    plan = uniform_plan(LLAMA, 2, LINEARS, tiny_stats["shapes"], 0.5, "feature")
    plan["layers"].update({"1.gate_proj": {"method": "feature", "rank": 18}, "0.up_proj": {"method": "feature", "rank": 18}})
    plan = new_plan(plan["layers"])
    weights = []
    for where, source in (("stored", root), ("full", full)):
        cut, direct = copy.deepcopy(model), copy.deepcopy(model)
        apply_cached_plan(cut, LLAMA, plan, tmp_path / where, model_digest=digest)
        apply_plan(direct, LLAMA, plan, *cached_statistics(source, digest))
        weights.append((cut.state_dict(), direct.state_dict()))
    (cut, direct), (cut_full, direct_full) = weights
    assert cut.keys() == cut_full.keys() and all(torch.equal(cut[k], cut_full[k]) for k in cut)
    assert direct.keys() == direct_full.keys() and all(torch.equal(direct[k], direct_full[k]) for k in direct)
    assert "model.layers.1.mlp.gate_proj.first.weight" in cut  # cut to rank 18 of the widening layer
    # the summary and the spectra figure's rows
    stored_paths = [root / "eigen" / block_file(b) for b in range(2)]
    full_paths = [full / "eigen" / block_file(b) for b in range(2)]
    assert summarize(stored_paths)["blocks"] == summarize(full_paths)["blocks"]
    assert spectra_rows(stored_paths, tiny_stats["dir"]) == spectra_rows(full_paths, tiny_stats["dir"])
