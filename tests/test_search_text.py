"""Perplexity-driven rank searches on any text: a local file (search.targets.perplexity text_file /
jsonl_file, the file of evaluation.perplexity) or WikiText-2. The search tunes on the leading
splits.search_fraction of the file's documents and the evaluate stage scores the rest, both without the
calibration documents; a file target without that evaluation source is a one-line config error."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from helpers import CORPUS, build_tiny_model, copy_workflow, planned_jobs, snakemake
from sfsd.decompose.factor_cache import save_factor_cache
from sfsd.evaluate.items import PPL_DOC_IDS
from sfsd.evaluate.perplexity import search_text_conflict
from sfsd.features.calibration import CalibrationSettings, sample_texts, tokenize
from sfsd.features.collect import collect_input_moments
from sfsd.io import model_digest
from sfsd.model.registry import get_arch, groups_for
from sfsd.tasks.lmeval import export_local_tasks
from sfsd.tasks.splits import split_doc_ids

LLAMA = get_arch("LlamaForCausalLM")
LINEARS = list(LLAMA.linears)
FRACTION = 0.2


def ppl_text(path, n=12):
    """n distinct paragraphs (the text_file source's documents "<name>/<i>")."""
    path.write_text("\n\n".join(f"Paragraph {i}. {CORPUS[i % 5]} {CORPUS[(i + 2) % 5]}" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A 2-block tiny Llama with a weight-space factor cache, one exported task, its splits, a perplexity
    text file of 12 paragraphs and calibration texts drawn from that same file (so exclusion by doc id
    matters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("search_text")
    folder = build_tiny_model(root / "model", n_layers=2, seed=5)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # the input moments the features stage would cache (the weight-space cache records its spectrum in them)
    tokens = tokenize(CORPUS[:5], AutoTokenizer.from_pretrained(folder), seq_len=24)
    moments = collect_input_moments(model, LLAMA, groups_for(LLAMA, LINEARS), tokens["input_ids"],
                                    tokens["attention_mask"], batch_size=5, progress=False)
    features = {b: {k: v for g, acc in per_block.items() for k, v in (
        (f"{g}.xxt", acc.xxt), (f"{g}.xsum", acc.xsum), (f"{g}.count", torch.tensor(acc.count)))}
        for b, per_block in enumerate(moments)}
    factors = root / "factors"
    save_factor_cache(model, LLAMA, "weight", LINEARS, factors / "weight", feature_blocks=features,
                      model_digest=model_digest(folder))
    tasks = root / "tasks"
    export_local_tasks(tasks, ["arc_easy"], metrics=("acc", "acc_norm"))
    splits = root / "splits.json"
    splits.write_text(json.dumps({"tasks": {"arc_easy": split_doc_ids("arc_easy", None, 1234, 0.1, FRACTION,
                                                                      limit=8)}}))
    text = ppl_text(root / "ppl.txt")
    calibration = root / "texts.jsonl"
    drawn = sample_texts(CalibrationSettings(source="text_file", path=str(text), num_samples=2, seed=1))
    calibration.write_text("".join(json.dumps(d) + "\n" for d in drawn))
    return {"folder": folder, "factors": factors, "tasks": tasks, "splits": splits, "text": text,
            "calibration": calibration, "drawn": [d["doc_id"] for d in drawn]}


def test_text_file_search_tunes_on_the_leading_documents_the_evaluation_never_scores(tiny_search, tmp_path):
    """`python -m sfsd search --mode perplexity --target text_file --ppl-path F` writes a plan; its
    summary's search_docs are the leading splits.search_fraction of F's documents (calibration documents
    removed) and the evaluate stage, given the same file, fraction and calibration texts (as the rules give
    them), scores exactly the other documents (the per-item file's perplexity doc ids)."""
    import pyarrow.parquet as pq

    from sfsd.cli.main import main

    t = tiny_search
    ppl = ["--ppl-window", "16", "--ppl-search-fraction", str(FRACTION), "--ppl-path", str(t["text"]),
           "--calibration-texts", str(t["calibration"])]
    common = ["--model-dir", str(t["folder"]), "--model-name", "tiny", "--tasks-dir", str(t["tasks"]),
              "--tasks", "arc_easy", "--splits", str(t["splits"]), "--device", "cpu", *ppl]
    out = tmp_path / "search" / "weight-perplexity-text_file"
    assert main(["search", *common, "--factors", str(t["factors"]), "--method", "weight", "--mode", "perplexity",
                 "--target", "text_file", "--layers", ",".join(LINEARS), "--curve-limit", "2", "--curve-every", "2",
                 "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) == 2 * len(LINEARS)
    summary = json.loads((out / "summary.json").read_text())
    name = t["text"].name
    kept = [f"{name}/{i}" for i in range(12) if f"{name}/{i}" not in t["drawn"]]
    assert len(t["drawn"]) == 2 and len(kept) == 10
    searched = summary["search_docs"]
    assert searched == kept[:int(len(kept) * FRACTION)] == kept[:2]  # the leading documents
    curve = pq.read_table(out / "curve.parquet").to_pylist()
    assert {r["task"] for r in curve if r["metric"] == "ppl"} == {"text_file"}

    items = tmp_path / "eval" / "base.docs.parquet"
    assert main(["evaluate", *common, "--variant", "base", "--ppl-source", "text_file",
                 "--out", str(tmp_path / "eval" / "base.parquet"), "--items-out", str(items)]) == 0
    evaluated = json.loads(pq.read_table(items).schema.metadata[PPL_DOC_IDS.encode()])
    assert evaluated == kept[2:]  # the rest, in order
    assert not set(searched) & set(evaluated)
    assert not set(t["drawn"]) & (set(searched) | set(evaluated))  # calibration text in neither
    row = next(r for r in pq.read_table(tmp_path / "eval" / "base.parquet").to_pylist() if r["metric"] == "ppl")
    assert row["task"] == "text_file" and row["ppl_docs"] == len(evaluated)


def test_wikitext2_search_tunes_on_its_leading_rows(tiny_search, tmp_path, monkeypatch):
    """search.targets.perplexity wikitext2 (the paper's search text) needs no path: the search reads the
    hub's WikiText-2 test rows (a stand-in here, offline) and tunes on the leading fraction of them."""
    import datasets

    from sfsd.cli.main import main

    from sfsd.evaluate.perplexity import WIKITEXT2

    rows, hub = [f"{CORPUS[i % 5]} ({i})" for i in range(10)], datasets.load_dataset

    def load_dataset(path, *args, **kwargs):  # the curve's local tasks still load as usual
        return datasets.Dataset.from_dict({"text": rows}) if path == WIKITEXT2["path"] else hub(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    t = tiny_search
    out = tmp_path / "weight-perplexity-wikitext2"
    assert main(["search", "--model-dir", str(t["folder"]), "--model-name", "tiny", "--factors", str(t["factors"]),
                 "--method", "weight", "--mode", "perplexity", "--target", "wikitext2", "--layers", ",".join(LINEARS),
                 "--tasks-dir", str(t["tasks"]), "--tasks", "arc_easy", "--splits", str(t["splits"]),
                 "--curve-limit", "2", "--curve-every", "2", "--device", "cpu", "--ppl-window", "16",
                 "--ppl-search-fraction", str(FRACTION), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["search_docs"] == ["wikitext2/test/0", "wikitext2/test/1"]


def test_search_text_conflicts():
    """The rule behind check_search_text: a file target needs evaluation.perplexity of that source with
    a path; shipped and hub targets need nothing of it; WikiText-2 must not be the calibration text."""
    ev = {"source": "text_file", "path": "a.txt", "text_field": "text"}
    assert search_text_conflict("text_file", ev, {}) is None
    assert search_text_conflict("lambada", {"source": "none"}, {}) is None
    assert search_text_conflict("wikitext2", {"source": "lambada"}, {"source": "text_file"}) is None
    for target, bad in (("text_file", {**ev, "source": "lambada"}), ("text_file", {**ev, "path": None}),
                        ("jsonl_file", ev)):
        msg = search_text_conflict(target, bad, {})
        assert msg.startswith(f"search.targets.perplexity {target} ") and "\n" not in msg
        assert f"evaluation.perplexity.source to {target}" in msg and "evaluation.perplexity.path" in msg
    cal = {"source": "hub", "hub_dataset": "Salesforce/wikitext", "hub_config": "wikitext-2-raw-v1",
           "hub_split": "test"}
    assert "search.targets.perplexity wikitext2" in search_text_conflict("wikitext2", {"source": "lambada"}, cal)


# ---------------------------------------------------------------- the rules (dry runs of the real Snakefile)


def _workflow(tmp_path, tiny_llama, calibration_text_file, evaluation_ppl: dict, target="text_file"):

    snakefile = copy_workflow(tmp_path / "repo")
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 8, "seq_len": 32},
        "device": "cpu",
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0},
        "evaluation": {"tasks": ["arc_easy"], "perplexity": evaluation_ppl},
        "search": {"enabled": True, "modes": ["perplexity"], "targets": {"perplexity": [target]}},
        "figures": {"enabled": False},
        "laser": {"enabled": False},
    }
    proc = snakemake(snakefile, workdir, config, "-n", "-p", check=False)
    return proc, proc.stdout + proc.stderr, workdir


def _command(out: str, rule: str, marker: str) -> list[str]:
    """The shell command of the dry run's first `rule` job whose command contains `marker`, as words."""
    for block in out.split(f"rule {rule}:")[1:]:
        line = next(x for x in block.splitlines() if x.startswith("Shell command: "))
        if marker in line:
            return shlex.split(line.removeprefix("Shell command: ").split(" > ")[0])
    raise AssertionError(f"no {rule} job with {marker!r} in the dry run:\n{out[-3000:]}")


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_workflow_searches_and_evaluates_one_text_file(tmp_path, tiny_llama, calibration_text_file):
    """With search.targets.perplexity [text_file] and evaluation.perplexity {source: text_file, path}, the
    workflow plans the search on that file and the evaluation of the searched model on the same file, with
    the same fraction, max_docs and calibration texts: the split of the first test is the one they make."""

    text = ppl_text(tmp_path / "my text.txt")  # a space: the path is quoted in both commands
    proc, out, _ = _workflow(tmp_path, tiny_llama, calibration_text_file,
                             {"source": "text_file", "path": str(text), "window": 16, "max_docs": 40})
    assert proc.returncode == 0, out[-3000:]
    assert planned_jobs(proc)["search"] == 1
    search = _command(out, "search", "--target text_file")
    assert _option(search, "--mode") == "perplexity" and _option(search, "--ppl-path") == str(text)
    assert _option(search, "--ppl-text-field") == "text"
    # every variant's evaluation takes the same perplexity arguments (the base model's job is listed; the
    # searched model's comes after the features checkpoint)
    evaluate = _command(out, "evaluate_model", "--ppl-source")
    assert _option(evaluate, "--ppl-source") == "text_file" and _option(evaluate, "--ppl-path") == str(text)
    for key in ("--ppl-search-fraction", "--ppl-max-docs", "--ppl-window", "--calibration-texts"):
        assert _option(search, key) == _option(evaluate, key), key


def test_text_file_target_without_that_evaluation_source_is_a_config_error(tmp_path, tiny_llama,
                                                                             calibration_text_file):
    proc, out, workdir = _workflow(tmp_path, tiny_llama, calibration_text_file, {"source": "lambada"})
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("config error:")]
    assert errors == ["config error: search.targets.perplexity text_file searches on the file of "
                      "evaluation.perplexity (its leading documents; the evaluation scores the rest): set "
                      "evaluation.perplexity.source to text_file and evaluation.perplexity.path to the file "
                      "(now source 'lambada', path None)"], out[-2000:]
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_workflow_runs_a_perplexity_search_on_a_text_file(tmp_path, tiny_llama, calibration_text_file):
    """The search rule itself, run by Snakemake on a text file (and what it needs: calibration, collection,
    eigen, the factor cache): its summary names the leading documents of the file, the plan cut at the
    budget is made from it, and editing the text file reruns the search."""
    import json


    snakefile = copy_workflow(tmp_path / "repo")
    workdir = tmp_path / "run"
    workdir.mkdir()
    text = ppl_text(tmp_path / "my text.txt")
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 8, "seq_len": 32},
        "device": "cpu",
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0, "methods": ["feature"]},
        "evaluation": {"tasks": ["arc_easy"], "perplexity": {"source": "text_file", "path": str(text), "window": 16,
                                                             "max_docs": 40}},
        "search": {"enabled": True, "modes": ["perplexity"], "targets": {"perplexity": ["text_file"]},
                   "search_limit": 4, "curve_limit": 2},
        "figures": {"enabled": False},
        "laser": {"enabled": False},
    }
    search = "results/tiny/search/feature-perplexity-text_file/summary.json"
    plan = "results/tiny/plans/search-feature-perplexity-text_file-b80.json"
    snakemake(snakefile, workdir, config, search, plan)
    summary = json.loads((workdir / search).read_text())
    assert summary["search_docs"] and all(d.startswith("my text.txt/") for d in summary["search_docs"])
    assert json.loads((workdir / plan).read_text())["notes"]["builder"] == "searched"
    text.write_text(text.read_text() + "\n\nOne more paragraph of the text, added after the search.\n")
    assert planned_jobs(snakemake(snakefile, workdir, config, "--dry-run", search)).get("search") == 1
