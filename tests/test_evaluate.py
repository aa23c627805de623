"""Evaluation: local lm-eval tasks offline, the native scorer against lm-eval, splits, perplexity, Parquet."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers import REPO
from sfsd.errors import ConfigError
from sfsd.evaluate.harness import evaluate_lmeval_detailed
from sfsd.evaluate.perplexity import perplexity, perplexity_texts
from sfsd.evaluate.rows import combine, common_columns, mean_metric, perplexity_row, read_rows, summarize_scores, write_rows
from sfsd.evaluate.scoring import build_requests, check_against_lmeval, encode_pair, encode_requests, score_multiple_choice
from sfsd.tasks.lmeval import builtin_config, export_local_tasks, lmeval_name, load_tasks
from sfsd.tasks.registry import TASKS, load_local_docs
from sfsd.tasks.splits import EVAL_SPLITS, partition, split_doc_ids

SIX = list(TASKS)
MAX_LENGTH = 512  # the tiny model's config says 64 positions; RoPE has no hard limit, and 512 keeps
#                   every continuation inside the window while BoolQ passages still get truncated
LIMIT = 3
SPLIT = dict(seed=1234, calibration_fraction=0.1, search_fraction=0.2)


@pytest.fixture(scope="module", autouse=True)
def hf_caches(tmp_path_factory):
    """Keep every Hugging Face cache inside a temporary folder, offline."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("hf_home")
    mp.setenv("HF_HOME", str(root))
    mp.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second (busy-waiting) thread only slows a loaded machine
    yield root
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval_tasks")
    export_local_tasks(out, SIX)  # lm-eval's own metric lists: acc only for boolq and winogrande
    return out


@pytest.fixture(scope="module")
def model_tok(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def split_ids():
    return {t: split_doc_ids(t, None, limit=LIMIT, **SPLIT) for t in SIX}


@pytest.fixture(scope="module")
def lmeval_run(model_tok, task_dir, split_ids):
    model, tok = model_tok
    return evaluate_lmeval_detailed(model, tok, task_dir, SIX, split_ids, batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def native_run(model_tok, task_dir, split_ids):
    model, tok = model_tok
    requests = build_requests(task_dir, SIX, split_ids)
    enc = encode_requests(tok, requests, MAX_LENGTH)
    scores = {share: score_multiple_choice(model, tok, enc, batch_size=4, share_prefix=share) for share in (False, True)}
    return requests, scores


# ---------------------------------------------------------------- export and offline loading


def test_export_writes_docs_in_shipped_order_and_lmeval_layout(task_dir):
    manifest = json.loads((task_dir / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(SIX)
    for task in SIX:
        shipped = load_local_docs(task)
        lines = (task_dir / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(shipped) == manifest["tasks"][task]["n_docs"]
        for i in (0, len(shipped) // 2, len(shipped) - 1):
            row = json.loads(lines[i])
            if task == "boolq":  # super_glue layout: integer label, 1 = True
                assert row["label"] == int(shipped[i]["answer"]) and row["question"] == shipped[i]["question"]
            else:
                assert row == shipped[i]
        text = (task_dir / f"{lmeval_name(task)}.yaml").read_text()
        assert "dataset_path: json" in text and "test_split: train" in text
        assert str((task_dir / f"{task}.jsonl").resolve()) in text


def test_export_keeps_lmeval_prompts_and_metrics(tmp_path):
    import yaml

    export_local_tasks(tmp_path, ["boolq", "winogrande", "hellaswag"])
    for task in ("boolq", "winogrande", "hellaswag"):
        builtin, _ = builtin_config(task)

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
        local = yaml.load((tmp_path / f"{lmeval_name(task)}.yaml").read_text(), Loader=Loader)  # noqa: S506
        assert local["metric_list"] == builtin["metric_list"]  # default: lm-eval's own metric list
        assert local["output_type"] == "multiple_choice"
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"):
            if key not in builtin:
                continue
            if isinstance(builtin[key], (str, list)):
                assert local[key] == builtin[key]
            else:  # a !function: copied beside the YAML under a task-prefixed module name
                kind, ref = local[key]
                module, _, fn = ref.rpartition(".")
                assert kind == "function" and fn == builtin[key].function
                assert (tmp_path / f"{module}.py").read_text() == builtin[key].module_file.read_text()
    assert [m["metric"] for m in yaml.safe_load((tmp_path / "sfsd_boolq.yaml").read_text())["metric_list"]] == ["acc"]


def test_local_tasks_load_offline_with_lmeval_prompts(task_dir):
    tasks = load_tasks(task_dir, SIX)
    for name, task in tasks.items():
        assert len(task.eval_docs) == len(load_local_docs(name))
    piqa = tasks["piqa"].eval_docs[0]
    assert tasks["piqa"].doc_to_text(piqa) == f"Question: {piqa['goal']}\nAnswer:"
    hs = tasks["hellaswag"].eval_docs[0]  # lm-eval's own process_docs ran: query / choices / gold
    assert hs["query"].startswith(hs["activity_label"] + ": ") and len(hs["choices"]) == 4
    wg = tasks["winogrande"].eval_docs[0]
    assert tasks["winogrande"].doc_to_choice(wg)[0].endswith(wg["option1"])  # partial scoring
    assert tasks["boolq"].doc_to_choice(tasks["boolq"].eval_docs[0]) == ["no", "yes"]


def test_unknown_or_missing_task_is_a_config_error(task_dir, tmp_path):
    with pytest.raises(ConfigError):
        export_local_tasks(tmp_path, ["mmlu"])
    with pytest.raises(ConfigError):
        split_doc_ids("squad", 100, **SPLIT)


# ---------------------------------------------------------------- splits


def test_split_ids_disjoint_stable_and_exclude_calibration():
    for task in ("piqa", "arc_challenge"):
        n = len(load_local_docs(task))
        a = split_doc_ids(task, n, **SPLIT)
        b = split_doc_ids(task, None, **SPLIT)
        assert a == b and set(a) == set(EVAL_SPLITS)
        parts = partition(n, task, SPLIT["seed"], SPLIT["calibration_fraction"], SPLIT["search_fraction"])
        assert not set(a["search"]) & set(a["test"])
        assert not (set(a["search"]) | set(a["test"])) & set(parts["calibration"])
        assert len(a["search"]) + len(a["test"]) + len(parts["calibration"]) == n
        assert a["search"] == sorted(a["search"]) and a["test"] == sorted(a["test"])
        limited = split_doc_ids(task, n, limit=5, **SPLIT)
        assert limited == {s: a[s][:5] for s in EVAL_SPLITS}
    assert split_doc_ids("piqa", 1838, seed=1, calibration_fraction=0.1, search_fraction=0.2) != a


def test_calibration_split_is_never_evaluated(model_tok, task_dir):
    with pytest.raises(ConfigError):
        build_requests(task_dir, ["piqa"], {"piqa": {"calibration": [0, 1]}})


# ---------------------------------------------------------------- lm-eval and the native scorer


def test_lmeval_scores_the_tiny_model_on_all_six_tasks(lmeval_run, split_ids):
    rows, docs = lmeval_run
    got = {(r["task"], r["split"], r["metric"]): r for r in rows}
    assert {(t, m) for t, _, m in got} == {(t, m) for t in SIX for m in TASKS[t].metrics}  # lm-eval's own
    assert not {t for t, _, m in got if m == "acc_norm"} & {"boolq", "winogrande"}
    for task in SIX:
        for split in EVAL_SPLITS:
            for metric in TASKS[task].metrics:
                r = got[(task, split, metric)]
                assert r["n"] == LIMIT and 0.0 <= r["value"] <= 1.0 and r["scorer"] == "lm_eval"
            ids = sorted(d["doc_id"] for d in docs if d["task"] == task and d["split"] == split)
            assert ids == split_ids[task][split]  # exactly the requested docs, no others


def test_native_tokenization_equals_hflm(model_tok, native_run):
    from lm_eval.models.huggingface import HFLM

    model, tok = model_tok
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=MAX_LENGTH)
    requests, _ = native_run
    pairs = [p for doc in requests for p in doc.pairs]
    pairs += [("Question: a b \n", "c"), ("x   ", " y z")]  # trailing whitespace moves to the continuation
    for context, continuation in pairs:
        assert encode_pair(tok, context, continuation) == lm._encode_pair(context, continuation)


@pytest.mark.parametrize("share_prefix", [False, True], ids=["batched", "shared-prefix"])
@pytest.mark.parametrize("task", SIX)
def test_native_scorer_equals_lmeval(task, share_prefix, lmeval_run, native_run):
    rows, docs = lmeval_run
    scores = native_run[1][share_prefix]
    reference = {(d["split"], d["doc_id"]): d for d in docs if d["task"] == task}
    requests = {(r.split, r.doc_id): r for r in native_run[0] if r.task == task}
    for key, ref in reference.items():  # the same prompts and continuations as lm-eval built
        assert list(requests[key].pairs) == ref["pairs"]
    mine = [s for s in scores if s["task"] == task]
    assert len(mine) == len(reference) == 2 * LIMIT
    for s in mine:
        ref = reference[(s["split"], s["doc_id"])]
        np.testing.assert_allclose(s["lls"], ref["lls"], rtol=1e-5, atol=1e-4)
        assert s["greedy"] == ref["greedy"]
        assert all(s[m] == ref[m] for m in TASKS[task].metrics)  # lm-eval logs only its task's metrics
    summary = {(r["split"], r["metric"]): r for r in summarize_scores(mine)}
    assert set(summary) == {(r["split"], r["metric"]) for r in rows if r["task"] == task}  # the same rows
    for r in rows:
        if r["task"] == task:
            assert summary[(r["split"], r["metric"])]["value"] == pytest.approx(r["value"])
            assert summary[(r["split"], r["metric"])]["stderr"] == pytest.approx(r["stderr"])


def test_shared_prefix_path_runs_and_does_less_work(model_tok, native_run, monkeypatch):
    """The default scorer really takes the KV-cache path (a silent fall-back to the plain path would still
    pass the equality tests) on every document of the six tasks, and computes less than lm-eval."""
    import sfsd.evaluate.scoring as E

    model, tok = model_tok
    requests, scores = native_run
    calls = []
    real = E._shared_batch

    def counted(model_, enc_, scorer_, groups, *rest):
        calls.append(len(groups))
        return real(model_, enc_, scorer_, groups, *rest)

    monkeypatch.setattr(E, "_shared_batch", counted)
    enc = encode_requests(tok, requests, MAX_LENGTH)
    again = score_multiple_choice(model, tok, enc, batch_size=4)
    assert sum(calls) == len(requests)  # every document went through the shared path
    for a, b in zip(scores[False], again, strict=True):
        np.testing.assert_allclose(a["lls"], b["lls"], rtol=1e-5, atol=1e-4)
    work = E.forward_work(enc, model)
    assert work["native"] < work["lm_eval"]


def test_check_against_lmeval_reports_every_kind_of_difference():
    def doc(doc_id, lls, acc, acc_norm=None, task="piqa"):
        return {"task": task, "split": "test", "doc_id": doc_id, "lls": lls, "acc": acc,
                **({} if acc_norm is None else {"acc_norm": acc_norm})}

    reference = [doc(1, [-1.0, -2.0], 1.0, 1.0), doc(2, [-3.0, -2.5], 0.0, 0.0), doc(3, [-1.0, -1.5], 1.0, 1.0),
                 doc(5, [-2.0, -1.0], 1.0, task="boolq")]
    native = [doc(1, [-1.00005, -2.0], 1.0, 1.0),  # within 1e-4: agrees
              doc(2, [-2.0, -2.5], 1.0, 0.0),  # a log-likelihood 1.0 off and acc flipped
              doc(4, [-1.0, -1.2], 1.0, 1.0),  # scored natively only (doc 3: by lm-eval only)
              doc(5, [-2.0, -1.0], 1.0, 0.0, task="boolq")]  # lm-eval has no acc_norm for boolq: not compared
    report = check_against_lmeval(native, reference)
    found = sorted((m["task"], m["doc_id"], m["what"].split(" ")[0]) for m in report["mismatches"])
    assert found == [("piqa", 2, "acc"), ("piqa", 2, "log-likelihood"), ("piqa", 3, "scored"), ("piqa", 4, "scored")]
    assert report["max_abs_diff"] == pytest.approx(1.0) and report["docs"] == 4
    assert check_against_lmeval(native[:1], reference[:1])["mismatches"] == []


def test_encoded_requests_rescore_identically_and_dedupe(model_tok, native_run):
    model, tok = model_tok
    requests, scores = native_run
    scores = scores[False]
    enc = encode_requests(tok, requests, MAX_LENGTH)
    assert len(enc.inputs) <= len(enc.input_of)  # equal model inputs are run once
    again = score_multiple_choice(model, tok, requests, batch_size=7, max_length=MAX_LENGTH)
    for a, b in zip(scores, again, strict=True):
        np.testing.assert_allclose(a["lls"], b["lls"], rtol=1e-5, atol=1e-4)
    value = mean_metric(again)  # "paper": acc for boolq and winogrande, acc_norm for the others
    per_task = [np.mean([s[TASKS[t].paper_metric] for s in again if s["task"] == t]) for t in SIX]
    assert value == pytest.approx(np.mean(per_task))
    assert mean_metric(again, "acc") == pytest.approx(np.mean([np.mean([s["acc"] for s in again if s["task"] == t])
                                                               for t in SIX]))
    with pytest.raises(ConfigError, match="no acc_norm for boolq"):
        mean_metric(again, "acc_norm")
    assert mean_metric(again, "acc_norm", tasks=["piqa", "arc_easy"]) == pytest.approx(
        np.mean([np.mean([s["acc_norm"] for s in again if s["task"] == t]) for t in ("piqa", "arc_easy")]))


# ---------------------------------------------------------------- perplexity


def test_perplexity_one_window_equals_direct_computation(model_tok):
    model, tok = model_tok
    text = "The quick brown fox jumps over the lazy dog. Once upon a time there lived a little white kitten."
    ids = tok(text)["input_ids"]
    window = 24
    assert len(ids) >= window
    res = perplexity(model, tok, [text], window=window)
    assert res["windows"] == len(ids) // window and res["tokens"] == res["windows"] * (window - 1)
    first = torch.tensor([ids[:window]])
    with torch.no_grad():
        loss = model(input_ids=first, labels=first).loss  # mean NLL of tokens 1..window-1
    one = perplexity(model, tok, [text], window=window, max_windows=1)
    assert one["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # by hand: exp(mean NLL) over every full window
    nll = []
    with torch.no_grad():
        for s in range(0, len(ids) - window + 1, window):
            logits = model(input_ids=torch.tensor([ids[s:s + window]])).logits[0]
            lp = torch.log_softmax(logits[:-1].double(), -1)
            nll += (-lp.gather(-1, torch.tensor(ids[s + 1:s + window]).unsqueeze(-1))).squeeze(-1).tolist()
    assert res["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_perplexity_sliding_windows_score_each_token_once(model_tok):
    model, tok = model_tok
    texts = [{"doc_id": "a", "text": "A man is sitting on a roof."}, "He starts pulling up roofing on a roof."]
    n = len(tok("\n\n".join(t if isinstance(t, str) else t["text"] for t in texts))["input_ids"])
    res = perplexity(model, tok, texts, window=16, stride=4, batch_size=3)
    n_windows = (n - 16) // 4 + 1
    assert res["windows"] == n_windows and res["tokens"] == 15 + 4 * (n_windows - 1)
    assert res["ppl"] > 1.0
    with pytest.raises(ConfigError):
        perplexity(model, tok, texts, window=16, stride=17)


def test_perplexity_texts_exclude_calibration_ids(calibration_text_file):
    docs = perplexity_texts("text_file", path=str(calibration_text_file))
    drop = {docs[0]["doc_id"], docs[3]["doc_id"]}
    kept = perplexity_texts("text_file", path=str(calibration_text_file), exclude_ids=drop)
    assert len(kept) == len(docs) - 2 and not drop & {d["doc_id"] for d in kept}
    lam = perplexity_texts("lambada", max_docs=5)
    assert len(lam) == 5 and all(d["doc_id"].startswith("lambada/") for d in lam)
    with pytest.raises(ConfigError):
        perplexity_texts("wikitext")


# ---------------------------------------------------------------- results as Parquet


def test_parquet_round_trip_and_combine(tmp_path):
    counts = {"model": {"dense": 1000, "compressed": 800, "fraction": 0.8},
              "decoder_linear": {"dense": 600, "compressed": 400, "fraction": 400 / 600},
              "macs_per_token": {"dense": 700, "compressed": 500, "fraction": 500 / 700},
              "decoder_linear_macs_per_token": {"dense": 600, "compressed": 400, "fraction": 400 / 600}}
    common = common_columns("tiny", "feature", "budget-0.8", counts, device="cpu", dtype="float32", seed=3)
    rows = [{"task": "piqa", "split": "test", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10},
            {"task": "piqa", "split": "test", "metric": "acc_norm", "value": 0.6, "stderr": None, "n": 10,
             "limit": 10}]
    a = write_rows(tmp_path / "a.parquet", rows, common)
    table = read_rows(a)
    assert table.num_rows == 2
    got = table.to_pylist()
    assert got[0]["value"] == 0.5 and got[1]["stderr"] is None and got[1]["limit"] == 10
    assert got[0]["params_model"] == 800 and got[0]["params_decoder_linear_dense"] == 600
    assert got[0]["lm_eval_version"] and got[0]["torch_version"]
    assert got[0]["seed"] == 3 and got[0]["model"] == "tiny"
    ppl = {"ppl": 44.0, "nll": math.log(44.0), "tokens": 1016, "windows": 8, "window": 128, "stride": 128,
           "bos": "first_window", "window_nll": [127 * math.log(44.0)] * 8, "window_tokens": [127] * 8}
    row = perplexity_row(ppl, "lambada", docs=[{"doc_id": "lambada/1"}, {"doc_id": "lambada/2"}])
    # windows of equal NLL: no spread, so the interval is the point itself
    assert row["ci_low"] == pytest.approx(44.0) and row["ci_high"] == pytest.approx(44.0)
    assert row["ppl_docs"] == 2 and len(row["ppl_docs_digest"]) == 16 and row["ppl_bos"] == "first_window"
    b = write_rows(tmp_path / "b.parquet", [row], {"model": "tiny", "method": "dense"})
    both = combine([a, b])
    assert both.num_rows == 3 and both.column("window").to_pylist() == [None, None, 128]
    assert both.column("seed").to_pylist() == [3, 3, None]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_tables_leave_out_models_scored_on_fewer_tasks():
    from sfsd.report.tables import paper_table_rows

    def row(method, plan, task, value):
        return {"method": method, "plan": plan, "task": task, "split": "test", "metric": "acc_norm", "value": value,
                "n": 10, "params_model": 100, "params_model_fraction": 1.0, "params_decoder_linear_fraction": 1.0,
                "macs_per_token": 10}

    rows = [row("baseline", "base", "piqa", 0.6), row("baseline", "base", "arc_easy", 0.4),
            row("feature", "feature-p54", "piqa", 0.5), row("feature", "feature-p54", "arc_easy", 0.3),
            # a LASER point chosen for one task, and the sweep's own baseline point: not Table 1 rows
            row("laser", "laser/fc_in/L24/r5", "arc_easy", 0.5), row("baseline", "none/dont/Lall/r0", "arc_easy", 0.4)]
    table, _ = paper_table_rows(rows)
    assert [r["plan"] for r in table] == ["base", "feature-p54"]
    assert table[0]["average"] == 50.0


def test_native_rows_carry_each_tasks_lmeval_metrics():
    scores = [{"task": t, "split": "test", "doc_id": i, "acc": float(i % 2), "acc_norm": float(i % 3 == 0)}
              for t in ("boolq", "piqa", "custom") for i in range(4)]
    got = {(r["task"], r["metric"]) for r in summarize_scores(scores)}
    assert got == {("boolq", "acc"), ("piqa", "acc"), ("piqa", "acc_norm"), ("custom", "acc"), ("custom", "acc_norm")}
    assert {r["metric"] for r in summarize_scores(scores, ["acc_norm"])} == {"acc_norm"}  # explicit: every task


def test_paper_table_names_each_tasks_metric_and_shows_95_intervals(tmp_path):
    from sfsd.report.tables import paper_table, paper_table_rows

    common = {"split": "test", "n": 200, "params_model": 100, "params_model_fraction": 1.0,
              "params_decoder_linear_fraction": 1.0, "macs_per_token": 10}

    def rows_of(method, plan, boolq, piqa, stderr, ppl):
        out = [{**common, "method": method, "plan": plan, "task": "boolq", "metric": "acc", "value": boolq,
                "stderr": 0.035 if stderr else None},
               {**common, "method": method, "plan": plan, "task": "boolq", "metric": "acc_norm", "value": 0.1,
                "stderr": 0.01},  # an old export's meaningless acc_norm: never shown under "paper"
               {**common, "method": method, "plan": plan, "task": "piqa", "metric": "acc", "value": 0.3,
                "stderr": 0.03 if stderr else None},
               {**common, "method": method, "plan": plan, "task": "piqa", "metric": "acc_norm", "value": piqa,
                "stderr": 0.025 if stderr else None}]
        return out + [{**common, "method": method, "plan": plan, "task": "lambada", "metric": "ppl", "value": ppl[0],
                       "stderr": None, "n": 3000, "window": 128, "ci_low": ppl[1], "ci_high": ppl[2]}]

    rows = rows_of("baseline", "base", 0.56, 0.62, True, (40.0, 38.5, 41.7)) + \
        rows_of("feature", "feature-b80", 0.5, 0.5, False, (60.0, None, None))
    write_rows(tmp_path / "results.parquet", rows)
    table, notes = paper_table_rows(rows)
    assert notes["metrics"] == {"boolq": "acc", "piqa": "acc_norm"}
    base, feat = table
    assert (base["boolq_acc"], base["boolq_acc_ci95"]) == (56.0, pytest.approx(1.96 * 3.5))
    assert (base["piqa_acc_norm"], base["piqa_acc_norm_ci95"]) == (62.0, pytest.approx(1.96 * 2.5))
    assert base["average"] == 59.0
    assert base["average_ci95"] == pytest.approx(1.96 * 100 * math.hypot(0.035, 0.025) / 2, abs=0.005)
    assert feat["boolq_acc_ci95"] is None and feat["average_ci95"] is None
    assert "boolq_acc_norm" not in base and "boolq" not in base
    paper_table(tmp_path / "results.parquet", "paper", tmp_path / "t.md", tmp_path / "t.csv")
    csv_header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert csv_header[6:] == ["boolq_acc", "boolq_acc_ci95", "piqa_acc_norm", "piqa_acc_norm_ci95", "average",
                              "average_ci95", "informative_average", "informative_average_ci95", "ppl_lambada_128",
                              "ppl_lambada_128_ci_low", "ppl_lambada_128_ci_high"]
    md = (tmp_path / "t.md").read_text()
    assert "| boolq acc | piqa acc_norm | average | informative_average | ppl_lambada_128 |" in md
    # these rows carry no majority-class rate: no task is known to be informative, and the footer says so
    assert "| 56.0 ± 6.9 | 62.0 ± 4.9 | 59.0 ± 4.2 |  | 40.0 [38.5, 41.7] |" in md
    assert "| 50.0 | 50.0 | 50.0 |  | 60.0 |" in md  # no stderr, no interval: the value alone
    assert "Informative average: none, the dense model is informative on no task" in md
    acc, _ = paper_table_rows(rows, "acc")
    assert (acc[0]["boolq_acc"], acc[0]["piqa_acc"]) == (56.0, 30.0)
    with pytest.raises(ConfigError, match="no acc_norm for boolq"):
        paper_table_rows(rows, "acc_norm")


@pytest.mark.slow  # an evaluation killed and rerun
def test_evaluation_killed_mid_run_leaves_no_output_and_reruns_to_the_same_rows(tiny_llama, task_dir, tmp_path):
    """kill -9 of the evaluate stage: no results file under its name; the rerun writes the same rows."""
    import signal
    import subprocess
    import sys
    import time


    ids = {t: split_doc_ids(t, None, limit=8, **SPLIT) for t in ("arc_easy", "hellaswag")}
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"tasks": ids}))
    out = tmp_path / "eval" / "base.parquet"
    cmd = [sys.executable, "-m", "sfsd", "--threads", "1", "evaluate", "--model-dir", str(tiny_llama),
           "--model-name", "tiny", "--variant", "base", "--tasks-dir", str(task_dir), "--tasks", "arc_easy,hellaswag",
           "--splits", str(splits), "--scorer", "native", "--batch-size", "1", "--device", "cpu",
           "--ppl-source", "lambada", "--ppl-window", "32", "--ppl-max-docs", "60", "--ppl-search-fraction", "0.2",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import threading

    err: list[str] = []
    threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    started = time.monotonic()
    while proc.poll() is None and not any("Loading weights" in e for e in err) and time.monotonic() - started < 120:
        time.sleep(0.01)
    time.sleep(0.3)  # the model is loaded: now scoring
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"
    assert not out.exists()  # whatever the moment of the kill, nothing under the final name
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = read_rows(out).to_pylist()
    again = tmp_path / "again.parquet"
    subprocess.run([*cmd[:-1], str(again)], env=env, check=True, capture_output=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "code_version"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(read_rows(again).to_pylist())
    assert {r["task"] for r in rows} == {"arc_easy", "hellaswag", "lambada"}
