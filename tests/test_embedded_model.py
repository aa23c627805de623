"""The embedded SmolLM2-135M-Instruct (shipped on PyPI) through stages 1 and 2 and one compressed model
via the real Snakefile, on a small calibration set (about 3 minutes on 2 CPU cores). Deselect with
-m "not slow"."""

import pytest
import torch

from sfsd.io import load_tensors, read_json
from helpers import new_run, one_thread, planned_jobs, python_without_sfsd, snakemake


@pytest.mark.slow
def test_embedded_model_stages_1_and_2(tmp_path):
    snakefile, workdir = new_run(tmp_path)
    config = {"calibration": {"num_samples": 24}, "device": "cpu",
              "compression": {"methods": ["feature"], "budgets": {"p54": 0.806}, "allocations": ["uniform"]},
              "evaluation": {"tasks": ["arc_easy", "piqa"], "limit": 10, "perplexity": {"max_docs": 30}},
              "speed": {"prompt_tokens": 16, "decode_tokens": 4, "batch_sizes": [1, 2], "repeats": 1}}
    snakemake(snakefile, workdir, config)
    results = workdir / "results" / "smollm2-135m"
    manifest = read_json(results / "features" / "manifest.json")
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["n_blocks"] == 30
    assert manifest["tokens"] > 500
    eig, meta = load_tensors(results / "eigen" / "block_029.safetensors")
    assert meta["calibration_digest"] == manifest["calibration_digest"]
    dims = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536, "up_proj": 1536,
            "down_proj": 576}
    for linear, dim in dims.items():  # the top min(in, out) eigenvectors: gate/up read 576 inputs
        v = eig[f"{linear}.eigenvectors"].double()
        kept = min(dim, 576)
        assert v.shape == (dim, kept)
        torch.testing.assert_close(v.T @ v, torch.eye(kept, dtype=torch.float64), rtol=0, atol=1e-5)
    summary = read_json(results / "eigen" / "summary.json")
    assert len(summary["blocks"]) == 30
    # the feature space is low-rank: gate_proj keeps 90% of its output variance well below full rank
    assert summary["blocks"][15]["layers"]["gate_proj"]["rank_90"] < 1536 // 2
    plan = read_json(results / "plans" / "feature-p54.json")
    assert 0.79 < plan["notes"]["params_fraction"] <= 0.806
    assert all(key.split(".")[0] not in {"0", "1", "2", "3"} for key in plan["layers"])  # first_block 4
    assert (results / "compressed" / "feature-p54" / "plan.json").exists()
    # the compressed folder loads with transformers alone (no sfsd importable), the same model bit for bit
    from sfsd.decompose.compress import load_compressed

    folder = results / "compressed" / "feature-p54"
    model, _ = load_compressed(folder)
    ids = torch.randint(3, 40000, (2, 16), generator=torch.Generator().manual_seed(0))
    with one_thread(), torch.no_grad():  # one thread on both sides: the same reduction order, bit for bit
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    proc = python_without_sfsd(f"""
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            print("identical:", torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"]))
        print("tied:", model.lm_head.weight is model.model.embed_tokens.weight)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical: True" in proc.stdout and "tied: True" in proc.stdout, proc.stdout
    table = (workdir / "results" / "tables" / "smollm2-135m" / "table1.csv").read_text().splitlines()
    assert len(table) == 3 and table[1].startswith("Baseline") and table[2].startswith("Feature space")
    speed = (workdir / "results" / "tables" / "smollm2-135m" / "speed.md").read_text()
    assert "| base | 100.0 |" in speed and "| feature-p54 | 80.5 |" in speed
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run")) == {}
    # the native scorer's own check against lm-eval ran inside the workflow, before the table
    for variant in ("base", "feature-p54"):
        check = read_json(results / "eval" / "scorer_check" / f"{variant}.json")
        assert check["mismatches"] == [] and check["docs"] == 20 and check["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_native_scorer_equals_lmeval_on_the_embedded_model_on_all_six_tasks(tmp_path):
    """acc and acc_norm identical to lm-eval's on every document, every choice's log-likelihood within
    1e-4, on SmolLM2-135M (the real vocabulary, tokenizer and BOS handling) for each of the six tasks."""
    from sfsd.evaluate.harness import evaluate_lmeval_detailed
    from sfsd.tasks.lmeval import export_local_tasks
    from sfsd.evaluate.scoring import build_requests, check_against_lmeval, score_multiple_choice
    from sfsd.tasks.splits import split_doc_ids
    from sfsd.model.loading import convert_embedded, load_model
    from sfsd.tasks.registry import TASKS

    torch.set_num_threads(2)
    folder = tmp_path / "smollm2"
    convert_embedded("smollm2-135m-instruct", folder)
    model, tokenizer = load_model(folder, device="cpu")
    tasks = list(TASKS)
    export_local_tasks(tmp_path / "tasks", tasks)
    ids = {t: split_doc_ids(t, None, 1234, 0.1, 0.2, limit=8) for t in tasks}
    native = score_multiple_choice(model, tokenizer, build_requests(tmp_path / "tasks", tasks, ids, ["test"]))
    _, reference = evaluate_lmeval_detailed(model, tokenizer, tmp_path / "tasks", tasks, ids, splits=["test"])
    report = check_against_lmeval(native, reference, tolerance=1e-4)
    assert report["mismatches"] == [] and report["docs"] == 6 * 8
    assert {d["task"] for d in reference} == set(tasks)


@pytest.mark.slow
def test_embedded_model_is_planned_from_its_shapes_before_it_is_converted(tmp_path):
    """From an empty results/, the embedded model's jobs are sized by its own shapes (read from the GGUF
    file's config), the same as once it is converted: not by the 7B stand-in, which asked the whole
    machine's memory for every scoring job of the 135M model and ran them one at a time."""
    from sfsd.config import validate
    from sfsd.model.loading import convert_embedded
    from sfsd.resources.plan import PREPARED, job_needs, model_size_of

    config = {"models": {"smollm2-135m": {"source": "embedded", "id": "smollm2-135m-instruct"}}, "device": "cpu"}
    validate(config)
    before, source = model_size_of(config, "smollm2-135m", tmp_path)
    assert source == "shapes" and before.n_blocks == 30 and before.hidden == 576
    planned = job_needs(config, "smollm2-135m", tmp_path)
    assert planned["evaluate_model"].host_bytes < 3e9
    convert_embedded("smollm2-135m-instruct", tmp_path / PREPARED / "smollm2-135m")
    after, source = model_size_of(config, "smollm2-135m", tmp_path)
    assert source == "shapes" and after == before
    assert job_needs(config, "smollm2-135m", tmp_path) == planned
