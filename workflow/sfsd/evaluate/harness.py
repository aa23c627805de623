"""lm-eval itself, as a library, on the six commonsense benchmarks: the reference scorer.

`evaluate_lmeval(model, tokenizer, task_dir, tasks, split_ids, batch_size, device)` runs HFLM on the
in-memory model (e.g. one from `sfsd.decompose.compress.load_compressed`) and `simple_evaluate(samples=...)` on
exactly those doc ids; `evaluate_lmeval_detailed` also returns lm-eval's per-document record.

The rest of evaluation lives in its own modules:

- `sfsd.tasks.lmeval`: the task sources (`evaluation.source`): `LocalTasks(task_dir)` (the shipped
  validation docs exported by `export_local_tasks`, loadable offline; the default) and `HubTasks()`
  (lm-eval's built-in tasks, data from the Hugging Face hub). Every function taking `task_dir` also takes
  a TaskSource or an lm-eval TaskManager there.
- `sfsd.tasks.splits`: the seeded, disjoint splits (`split_doc_ids`, `eval_splits`, `read_split_ids`).
- `sfsd.evaluate.scoring`: the native multiple-choice scorer (`build_requests`, `score_multiple_choice`,
  `check_against_lmeval`) and where it can differ from lm-eval.
- `sfsd.evaluate.perplexity`: perplexity over fixed token windows (`perplexity`, `perplexity_texts`).
- `sfsd.evaluate.rows`: results as Parquet rows (`summarize_scores`, `mean_metric`, `perplexity_row`,
  `common_columns`, `write_rows`, `combine`; the per-item scores behind them: `sfsd.evaluate.items`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch

from sfsd.errors import ConfigError, DataError
from sfsd.tasks.lmeval import TaskSource, task_source
from sfsd.tasks.registry import ACCURACY_METRICS
from sfsd.tasks.splits import _check_split_ids

log = logging.getLogger(__name__)


def _hflm(model, tokenizer, batch_size: int, device: str | torch.device | None, max_length: int | None):
    from lm_eval.models.huggingface import HFLM

    if device is not None and not getattr(model, "hf_device_map", None):  # a spread model stays as placed
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
            for metric in ACCURACY_METRICS:
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
                             **{m: float(s[m]) for m in ACCURACY_METRICS if m in s}})
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
