"""A compressed folder is a model standard tools load: `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` in an interpreter where the sfsd package cannot be imported gives logits
bit-identical to `load_compressed`, generate() works, transformers refuses the folder without the remote
code, and lm-eval's own command line scores it like lm-eval's Python API scores `load_compressed`'s model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import LLAMA, one_thread, python_without_sfsd
from sfsd.decompose.compress import load_compressed, save_compressed
from sfsd.decompose.factor_cache import apply_cached_plan, save_factor_cache
from sfsd.decompose.plan import new_plan

PLAN = {"0.q_proj": {"method": "feature", "rank": 3}, "0.down_proj": {"method": "weight", "rank": 5},
        "1.o_proj": {"method": "whitened", "rank": 4}, "1.gate_proj": {"method": "asvd", "rank": 6}}


@pytest.fixture(scope="module")
def folder(tiny_stats, tmp_path_factory):
    """The tiny model compressed with four methods (one Linear each) and saved with its tokenizer."""
    import copy

    root = tmp_path_factory.mktemp("hf-folder")
    model, digest = copy.deepcopy(tiny_stats["model"]), tiny_stats["digest"]
    factors = {}
    for method in ("feature", "weight", "whitened", "asvd"):
        save_factor_cache(model, LLAMA, method, list(LLAMA.linears), root / "factors" / method, tiny_stats["eigen"],
                          tiny_stats["features"], model_digest=digest)
    plan = new_plan(PLAN, model="tiny", model_digest=digest, architecture="LlamaForCausalLM")
    factors = apply_cached_plan(model, LLAMA, plan, root / "factors", model_digest=digest)
    return save_compressed(model, plan, root / "compressed", tokenizer=tiny_stats["tokenizer"], factors=factors)


def test_the_guard_blocks_sfsd():
    proc = python_without_sfsd("import sfsd.decompose.compress")
    assert proc.returncode != 0 and "sfsd is not importable here" in proc.stderr


def test_from_pretrained_without_sfsd_equals_load_compressed(folder, tmp_path):
    model, _ = load_compressed(folder)
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    with one_thread(), torch.no_grad():  # one thread on both sides: the same reduction order, bit for bit
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    proc = python_without_sfsd(f"""
        import torch
        torch.set_num_threads(1)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=False)
        except ValueError as err:
            print("refused:", "custom code" in str(err))
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
        print("identical:", torch.equal(logits, ref["logits"]))
        print("factored:", sorted(n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"))
        tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = model.generate(**tok(["a roof"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        print("generated:", out.shape[1] - len(tok("a roof")["input_ids"]))
        print("sfsd loaded:", any(m == "sfsd" or m.startswith("sfsd.") for m in __import__("sys").modules))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["refused"] == "True"
    assert lines["identical"] == "True"
    assert lines["factored"] == str(sorted(
        ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
         "model.layers.1.mlp.gate_proj"]))
    assert lines["generated"] == "4" and lines["sfsd loaded"] == "False"


def test_config_names_the_factored_layers_and_the_remote_code(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sfsd_llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_sfsd.SfsdConfig",
                                  "AutoModelForCausalLM": "modeling_sfsd.SfsdForCausalLM"}
    assert config["sfsd_low_rank"]["model.layers.0.self_attn.q_proj"] == [3, True]  # feature space: a bias
    assert config["sfsd_low_rank"]["model.layers.0.mlp.down_proj"] == [5, False]
    assert "BASE_ARCHITECTURE = 'LlamaForCausalLM'" in (folder / "modeling_sfsd.py").read_text()
    assert "import sfsd" not in (folder / "modeling_sfsd.py").read_text()


@pytest.mark.slow  # lm-eval's command line in a subprocess
def test_lm_eval_command_line_scores_the_folder(folder, tmp_path):
    """`lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True` on an exported local task,
    without sfsd importable: the same accuracy per document as lm-eval's Python API on load_compressed's
    model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from sfsd.tasks.lmeval import export_local_tasks, task_manager

    tasks = tmp_path / "tasks"
    export_local_tasks(tasks, ["arc_easy"])
    out = tmp_path / "lm_eval_out"
    proc = python_without_sfsd(f"""
        import sys
        from lm_eval.__main__ import cli_evaluate
        sys.argv = ["lm_eval", "--model", "hf", "--model_args", "pretrained={folder},trust_remote_code=True,dtype=float32",
                    "--tasks", "sfsd_arc_easy", "--include_path", {str(tasks)!r}, "--limit", "6", "--device", "cpu",
                    "--batch_size", "4", "--output_path", {str(out)!r}, "--log_samples"]
        cli_evaluate()
    """, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["sfsd_arc_easy"]
    model, _ = load_compressed(folder)
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=4, device="cpu")
    ours = simple_evaluate(model=lm, tasks=["sfsd_arc_easy"], limit=6, task_manager=task_manager(tasks))
    expected = ours["results"]["sfsd_arc_easy"]
    for metric in ("acc,none", "acc_norm,none"):
        assert results[metric] == expected[metric], (metric, results[metric], expected[metric])
