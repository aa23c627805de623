"""Evaluation data sources: lm-eval's own hub tasks beside the local copies (splits, disjointness from
calibration, the native scorer on any task source), WikiText-2 perplexity, and their config keys.

No network here: hub datasets are replaced by monkeypatched stand-ins, and the offline paths are checked
to fail with one line that names the fix."""

from __future__ import annotations

import random

import jsonschema
import pytest
import torch
import yaml

from helpers import REPO, copy_workflow, planned_jobs, snakemake
from sfsd.errors import ConfigError, DataError
from sfsd.evaluate.perplexity import WIKITEXT2, calibration_conflict, perplexity, perplexity_texts
from sfsd.evaluate.rows import perplexity_row
from sfsd.evaluate.scoring import build_requests
from sfsd.tasks import lmeval as lmeval_tasks
from sfsd.tasks.lmeval import (
    BUILTIN_YAML,
    HubTasks,
    builtin_config,
    doc_key,
    export_local_tasks,
    hub_task_manager,
    lm_eval_tasks_root,
    lmeval_docs,
)
from sfsd.tasks.registry import TASKS
from sfsd.tasks.splits import EVAL_SPLITS, eval_splits, local_calibration_keys, partition, split_doc_ids

SPLIT = dict(seed=1234, calibration_fraction=0.1, search_fraction=0.2)
SIX = list(TASKS)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Hugging Face caches in a temporary folder, offline (a download attempt fails at once)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


# ---------------------------------------------------------------- lm-eval's built-in (hub) tasks


def test_hub_tasks_are_lmevals_builtin_configs():
    """The hub source resolves each task name to lm-eval's own YAML (the file BUILTIN_YAML names), with
    lm-eval's dataset, eval split and metrics; offline, without downloading anything."""
    index = hub_task_manager().task_index
    root = lm_eval_tasks_root()
    expected_split = {"arc_easy": "test", "arc_challenge": "test"}  # lm-eval scores ARC on its test split
    for task in SIX:
        assert HubTasks().lmeval_name(task) == task
        assert index[task].yaml_path.resolve() == (root / BUILTIN_YAML[task]).resolve()
        cfg, _ = builtin_config(task)
        assert cfg["task"] == task and cfg["output_type"] == "multiple_choice"
        metrics = [m["metric"] for m in cfg["metric_list"]]
        assert metrics == (["acc"] if task in ("boolq", "winogrande") else ["acc", "acc_norm"])
        eval_split = cfg.get("test_split") or cfg["validation_split"]
        assert eval_split == expected_split.get(task, "validation")
    with pytest.raises(ConfigError):
        HubTasks().lmeval_name("mmlu")


def test_hub_tasks_offline_fail_with_one_line():
    with pytest.raises(DataError) as err:
        HubTasks().load(["piqa"])
    message = str(err.value)
    assert "\n" not in message and "Hugging Face hub" in message and "evaluation.source: local" in message
    with pytest.raises(DataError, match="evaluation.source: local"):  # the native scorer's path too
        build_requests(HubTasks(), ["piqa"], {"piqa": {"test": [0, 1]}})


def test_splits_cli_offline_hub_is_one_line_error(tmp_path, capsys):
    from sfsd.cli.main import main

    out = tmp_path / "splits.json"
    code = main(["splits", "--tasks", "piqa", "--seed", "1", "--calibration-fraction", "0.1",
                 "--search-fraction", "0.2", "--source", "hub", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: could not load") and not out.exists()


# ---------------------------------------------------------------- hub splits (monkeypatched eval docs)


def _fake_hub(monkeypatch, order: str, calls: list | None = None):
    """Stand-in for lmeval_tasks.hub_eval_docs: the shipped docs in lm-eval's layout, shuffled
    ("shuffled": the hub lists them in another order) or as shipped ("same"); ARC gets extra docs
    (lm-eval scores its larger test split)."""

    def hub_eval_docs(tasks):
        out = {}
        for t in tasks:
            docs = lmeval_docs(t)
            if order == "shuffled":
                random.Random(7).shuffle(docs)
            if t.startswith("arc"):
                extra = [dict(d, question=d["question"] + " (test copy)") for d in docs[:40]]
                out[t] = ("test", docs[:30] + extra)  # 30 validation docs mixed into a "test" split
            else:
                out[t] = ("validation", docs)
        if calls is not None:
            calls.append(list(tasks))
        return out

    monkeypatch.setattr(lmeval_tasks, "hub_eval_docs", hub_eval_docs)
    return hub_eval_docs


def test_hub_splits_seeded_disjoint_stable_and_never_calibration(monkeypatch, caplog):
    calls = []
    fake = _fake_hub(monkeypatch, "shuffled", calls)
    tasks = ["piqa", "arc_challenge"]
    a = eval_splits(tasks, source="hub", **SPLIT)
    b = eval_splits(tasks, source="hub", **SPLIT)
    assert a == b and calls == [tasks, tasks]  # stable; the docs come from the (patched) hub loader
    assert a["source"] == "hub" and a["eval_split"] == {"piqa": "validation", "arc_challenge": "test"}
    other = eval_splits(tasks, source="hub", seed=99, calibration_fraction=0.1, search_fraction=0.2)
    assert other["tasks"]["piqa"] != a["tasks"]["piqa"]  # seeded
    for t in tasks:
        _, docs = fake([t])[t]
        n = len(docs)
        assert a["n_docs"][t] == n
        ids = a["tasks"][t]
        assert set(ids) == set(EVAL_SPLITS) and all(ids[s] == sorted(ids[s]) for s in EVAL_SPLITS)
        assert not set(ids["search"]) & set(ids["test"])
        positional = set(partition(n, t, **SPLIT)["calibration"])
        evaluated = set(ids["search"]) | set(ids["test"])
        assert not evaluated & positional  # the calibration part rule holds for the hub ids too
        cal_keys = local_calibration_keys(t, **SPLIT)
        assert not {doc_key(t, docs[i]) for i in evaluated} & cal_keys  # nor any local calibration doc
        dropped = set(a["content_excluded"][t])
        assert dropped and not dropped & positional and not dropped & evaluated
        assert len(evaluated) + len(positional) + len(dropped) == n  # nothing else is lost
    assert a["local_overlap"]["piqa"] == 1.0 and a["local_overlap"]["arc_challenge"] == pytest.approx(30 / 70, abs=1e-4)
    # same order as shipped: the content check drops nothing and the ids are the local ones
    _fake_hub(monkeypatch, "same")
    same = eval_splits(["piqa"], source="hub", **SPLIT)
    assert same["content_excluded"]["piqa"] == []
    assert same["tasks"]["piqa"] == split_doc_ids("piqa", None, **SPLIT)
    assert eval_splits(["piqa"], source="local", **SPLIT)["tasks"] == same["tasks"]
    # a hub copy whose text differs from the shipped one cannot be matched: said, not silently trusted
    monkeypatch.setattr(lmeval_tasks, "hub_eval_docs", lambda tasks: {
        t: ("validation", [dict(d, goal=d["goal"] + " (edited)") for d in lmeval_docs(t)]) for t in tasks})
    with caplog.at_level("WARNING", logger="sfsd.tasks.splits"):
        edited = eval_splits(["piqa"], source="hub", **SPLIT)
    assert edited["local_overlap"]["piqa"] == 0.0 and "match the shipped copies" in caplog.text
    with pytest.raises(ConfigError):
        eval_splits(["piqa"], source="web", **SPLIT)


def test_doc_key_is_the_same_on_raw_and_lmeval_processed_docs(tmp_path):
    """HellaSwag's process_docs adds columns; the key reads columns it keeps, so a hub task's eval_docs
    (processed) match the raw shipped docs."""
    export_local_tasks(tmp_path, ["hellaswag"])
    processed = lmeval_tasks.LocalTasks(tmp_path).load(["hellaswag"])["hellaswag"].eval_docs
    raw = lmeval_docs("hellaswag")
    assert "query" in processed[0] and "query" not in raw[0]
    for i in (0, 17, len(raw) - 1):
        assert doc_key("hellaswag", processed[i]) == doc_key("hellaswag", raw[i])
    assert doc_key("hellaswag", raw[0]) != doc_key("hellaswag", raw[1])
    with pytest.raises(DataError):
        doc_key("piqa", {"goal": "x"})


# ---------------------------------------------------------------- the native scorer on a task source


def test_build_requests_takes_a_task_manager_and_checks_doc_counts(tmp_path):
    export_local_tasks(tmp_path, ["piqa"])
    ids = {"piqa": {"test": [3, 5, 8]}}
    by_dir = build_requests(tmp_path, ["piqa"], ids)
    manager = lmeval_tasks.task_manager(tmp_path)  # any lm-eval TaskManager: lm-eval's task names
    by_manager = build_requests(manager, ["sfsd_piqa"], {"sfsd_piqa": ids["piqa"]})
    assert [d.pairs for d in by_dir] == [d.pairs for d in by_manager] and len(by_dir) == 3
    assert [d.gold for d in by_dir] == [d.gold for d in by_manager]
    assert build_requests(tmp_path, ["piqa"], ids, n_docs={"piqa": 1838}) == by_dir
    with pytest.raises(DataError, match="rerun the eval_splits rule"):  # the hub data changed under the ids
        build_requests(tmp_path, ["piqa"], ids, n_docs={"piqa": 1900})
    with pytest.raises(ConfigError, match="outside"):
        build_requests(manager, ["sfsd_piqa"], {"sfsd_piqa": {"test": [5000]}})


def test_local_hub_and_native_rows_have_the_same_metric_columns(tmp_path, monkeypatch, tiny_llama):
    """One task of each kind (winogrande: lm-eval defines acc only; piqa: acc and acc_norm) scored three
    ways on the tiny model: lm-eval on the local export, lm-eval on its own built-in (hub) configs with the
    hub data replaced by a stand-in holding the same docs, and the native scorer. All three give the same
    (task, metric) rows, lm-eval's own (`TASKS[task].metrics`), so a table column never exists for one
    source only; and the same values."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfsd.evaluate.harness import evaluate_lmeval
    from sfsd.evaluate.rows import summarize_scores
    from sfsd.evaluate.scoring import encode_requests, score_multiple_choice

    tasks = ["winogrande", "piqa"]
    export_local_tasks(tmp_path / "tasks", tasks)
    ids = {t: {"test": split_doc_ids(t, None, limit=2, **SPLIT)["test"]} for t in tasks}
    by_path = {builtin_config(t)[0]["dataset_path"]: t for t in tasks}
    loaded, real_load = [], datasets.load_dataset

    def load_dataset(path=None, name=None, **kwargs):  # lm-eval's ConfigurableTask.download, offline
        if path not in by_path:  # the local export's JSON files
            return real_load(path=path, name=name, **kwargs)
        docs = lmeval_docs(by_path[path])
        loaded.append(by_path[path])
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(docs[:4]),
                                     "validation": datasets.Dataset.from_list(docs)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = evaluate_lmeval(model, tok, tmp_path / "tasks", tasks, ids, batch_size=4, max_length=512)
        hub = evaluate_lmeval(model, tok, HubTasks(), tasks, ids, batch_size=4, max_length=512)
        requests = build_requests(tmp_path / "tasks", tasks, ids)
        native = summarize_scores(score_multiple_choice(model, tok, encode_requests(tok, requests, 512), 4))
    finally:
        torch.set_num_threads(threads)
    assert sorted(loaded) == sorted(tasks)  # the hub rows really came through lm-eval's built-in configs
    expected = {("winogrande", "acc"), ("piqa", "acc"), ("piqa", "acc_norm")}
    assert expected == {(t, m) for t in tasks for m in TASKS[t].metrics}
    columns = {name: {(r["task"], r["metric"]) for r in rows}
               for name, rows in (("local", local), ("hub", hub), ("native", native))}
    assert columns == {"local": expected, "hub": expected, "native": expected}
    values = {name: {(r["task"], r["metric"]): r["value"] for r in rows}
              for name, rows in (("local", local), ("hub", hub), ("native", native))}
    assert values["hub"] == values["local"] and values["native"] == pytest.approx(values["local"])


# ---------------------------------------------------------------- WikiText-2 perplexity


ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjo no Valkyria 3 : Unrecorded Chronicles is a tactical "
        "role @-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n",
        "", " = = Gameplay = = \n", "", " As with previous games in the series , the player controls a squad of "
        "soldiers through battles fought in turn @-@ based and real @-@ time phases . \n", ""] * 3


@pytest.fixture()
def fake_wikitext(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": list(ROWS)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_wikitext2_joins_every_row_and_scores_windows(fake_wikitext, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = perplexity_texts("wikitext2", max_docs=None)
    assert fake_wikitext == [(WIKITEXT2["path"], "wikitext-2-raw-v1", "test")]
    assert [d["text"] for d in docs] == ROWS  # empty rows kept: the papers join all of them
    assert docs[3]["doc_id"] == "wikitext2/test/3"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        window = 16
        res = perplexity(model, tok, docs, window=window)
        joined = perplexity(model, tok, ["\n\n".join(ROWS)], window=window)  # SVD-LLM's string
    finally:
        torch.set_num_threads(threads)
    n_tokens = len(tok("\n\n".join(ROWS))["input_ids"])
    assert res == joined and res["total_tokens"] == n_tokens
    assert res["windows"] == n_tokens // window and res["tokens"] == res["windows"] * (window - 1)  # no overlap
    row = perplexity_row(res, "wikitext2")
    assert row["task"] == "wikitext2" and row["metric"] == "ppl" and row["n"] == res["tokens"]
    assert row["window"] == window and row["stride"] == window and row["value"] == pytest.approx(res["ppl"])
    assert len(perplexity_texts("wikitext2", max_docs=4)) == 4


def test_wikitext2_offline_is_one_line_error():
    with pytest.raises(DataError) as err:  # the real datasets.load_dataset, offline
        perplexity_texts("wikitext2")
    message = str(err.value)
    assert "\n" not in message and "go online" in message and "lambada" in message


def test_wikitext2_calibrated_on_its_own_test_split_is_refused():
    cal = {"source": "hub", "hub_dataset": "Salesforce/wikitext", "hub_config": "wikitext-2-raw-v1", "hub_split": "test"}
    assert "hub_split" in calibration_conflict("wikitext2", cal)
    assert calibration_conflict("wikitext2", {**cal, "hub_split": "train"}) is None
    assert calibration_conflict("lambada", cal) is None
    with pytest.raises(ConfigError, match="evaluation.perplexity.path"):
        perplexity_texts("text_file", path=None)


# ---------------------------------------------------------------- config keys


def _validate(config: dict) -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(config)


@pytest.mark.parametrize("evaluation, ok", [
    ({"source": "hub"}, True),
    ({"source": "local"}, True),
    ({"source": "web"}, False),
    ({"perplexity": {"source": "wikitext2", "window": 2048, "max_docs": None}}, True),
    ({"perplexity": {"source": "text_file", "path": "my.txt"}}, True),
    ({"perplexity": {"source": "wikitext"}}, False),
    ({"perplexity": {"source": "wikitext2", "max_docs": 0}}, False),
])
def test_schema_evaluation_sources(evaluation, ok):
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    config = {**base, "evaluation": {**base["evaluation"], **evaluation}}
    if ok:
        _validate(config)
    else:
        with pytest.raises(jsonschema.ValidationError):
            _validate(config)


def test_schema_documents_the_new_keys():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    ev = schema["properties"]["evaluation"]["properties"]
    assert ev["source"]["default"] == "local" and "disjoint" in ev["source"]["description"]
    for key, prop in ev["perplexity"]["properties"].items():
        assert prop.get("description") and "default" in prop, key


# ---------------------------------------------------------------- the rules (dry runs of the real Snakefile)


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory, tiny_llama, calibration_text_file):

    root = tmp_path_factory.mktemp("wf_sources")
    snakefile = copy_workflow(root)
    config = {
        "models": {"tiny": {"source": "local", "path": str(tiny_llama)}},
        "calibration": {"source": "text_file", "path": str(calibration_text_file), "num_samples": 8, "seq_len": 32},
        "device": "cpu",
        "compression": {"budgets": {"b80": 0.8}, "first_block": 0},
    }
    return snakefile, config


def _dry_run(workflow_copy, tmp_path, evaluation: dict, **extra):

    snakefile, config = workflow_copy
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = snakemake(snakefile, tmp_path, {**config, **extra, "evaluation": evaluation}, "-n", "-p",
                     "results/tiny/eval/base.parquet", check=False)
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow  # dry runs of the real Snakefile
def test_rules_hub_source_needs_no_export_and_local_keeps_it(workflow_copy, tmp_path):

    proc, out = _dry_run(workflow_copy, tmp_path / "hub", {
        "source": "hub", "perplexity": {"source": "wikitext2", "window": 256, "max_docs": None}})
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(proc)
    assert "export_tasks" not in jobs and jobs["eval_splits"] == 1 and jobs["evaluate_model"] == 1
    assert "--source hub" in out and "--task-source hub" in out and "--tasks-dir" not in out
    assert "--ppl-source wikitext2 --ppl-window 256" in out and "--ppl-max-docs None" in out
    proc, out = _dry_run(workflow_copy, tmp_path / "local", {"perplexity": {"source": "lambada", "max_docs": 30}})
    assert proc.returncode == 0, out[-3000:]
    assert planned_jobs(proc)["export_tasks"] == 1
    assert "--source local" in out and "--task-source local --tasks-dir results/tasks" in out
    assert "--ppl-max-docs 30" in out


def test_rules_refuse_wikitext2_calibrated_on_its_test_split(workflow_copy, tmp_path):
    cal = {"source": "hub", "hub_dataset": "Salesforce/wikitext", "hub_config": "wikitext-2-raw-v1",
           "hub_split": "test"}
    proc, out = _dry_run(workflow_copy, tmp_path, {"perplexity": {"source": "wikitext2"}}, calibration=cal)
    assert proc.returncode != 0 and "config error: calibration.hub_split is 'test' of WikiText-2" in out
    assert not (tmp_path / "results").exists()
