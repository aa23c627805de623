"""Per-item scores of one evaluated model: the file that paired comparisons read.

Every variant of a model is scored on the same test documents and perplexity windows, so two variants
can be compared item by item (`sfsd.report.compare`). The evaluate stage writes, beside its summary rows,
`results/<model>/eval/<variant>.docs.parquet` with one row per scored item:

- unit "doc": a multiple-choice document (`item` = its doc id), with `acc` and `acc_norm` (null where
  lm-eval defines no acc_norm for the task: BoolQ, WinoGrande), its `gold` choice index (null for a
  document with several right answers) and its number of `choices`, from which the majority-class rate
  and chance of the documents scored follow (`sfsd.tasks.baselines`);
- unit "window": a perplexity window (`item` = its index), with its summed negative log-likelihood
  `nll` and scored `tokens`.

The file's metadata holds the format name, the ids of the perplexity documents (in order) and where BOS
went in the windows (`ppl_bos`), so two variants' windows are paired only when they come from the same text
under the same protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sfsd.errors import DataError
from sfsd.io import atomic_path
from sfsd.tasks.registry import lmeval_metrics

Z95 = 1.959964  # two-sided 95% normal quantile, for every interval computed from a standard error
DOCS_FORMAT = "sfsd-docs-1"
# column -> pyarrow type alias, in file order: the one description of the format (writer and reader)
DOCS_SCHEMA = {
    "model": "string", "method": "string", "plan": "string", "params_model_fraction": "float64",
    "task": "string", "split": "string", "unit": "string", "item": "int64",
    "acc": "float64", "acc_norm": "float64", "gold": "int64", "choices": "int64", "nll": "float64",
    "tokens": "int64",
}
DOCS_COLUMNS = tuple(DOCS_SCHEMA)
# the columns every row of one file shares (one file = one variant)
VARIANT_COLUMNS = ("model", "method", "plan", "params_model_fraction")
PPL_DOC_IDS = "ppl_doc_ids"  # metadata key: the perplexity documents' ids, in order
PPL_BOS = "ppl_bos"  # metadata key: the windows' BOS protocol (every_window, first_window)


def with_golds(doc_scores: Iterable[Mapping], requests: Iterable) -> list[dict]:
    """Each document's scores with its `gold` (the choice index, or a tuple of them) and its number of
    `choices`, from the requests it was scored on (`sfsd.evaluate.scoring.build_requests`: lm-eval's own gold);
    DataError for a scored document that no request describes."""
    by_doc = {(r.task, r.split, int(r.doc_id)): r for r in requests}
    out = []
    for d in doc_scores:
        request = by_doc.get((d["task"], d.get("split"), int(d["doc_id"])))
        if request is None:
            raise DataError(f"{d['task']} doc {d['doc_id']} ({d.get('split')}) was scored but not requested")
        out.append({**d, "gold": request.gold, "choices": len(request.pairs)})
    return out


def item_rows(doc_scores: Iterable[Mapping], ppl: Mapping | None = None, ppl_source: str | None = None,
              split: str = "test") -> list[dict]:
    """Rows of one evaluated model: a "doc" row per scored document ({task, split, doc_id, acc[,
    acc_norm], gold, choices}, from the native scorer or lm-eval's logged samples, `with_golds`) and a
    "window" row per perplexity window of `ppl` (a `sfsd.evaluate.perplexity.perplexity` result)."""
    out = []
    for d in doc_scores:
        norm = "acc_norm" in lmeval_metrics(d["task"]) and d.get("acc_norm") is not None
        gold = d.get("gold")
        out.append({"task": d["task"], "split": d.get("split") or split, "unit": "doc", "item": int(d["doc_id"]),
                    "acc": float(d["acc"]), "acc_norm": float(d["acc_norm"]) if norm else None,
                    "gold": None if gold is None or isinstance(gold, (tuple, list)) else int(gold),
                    "choices": d.get("choices"), "nll": None, "tokens": None})
    if ppl is not None:
        for w, (nll, tokens) in enumerate(zip(ppl["window_nll"], ppl["window_tokens"], strict=True)):
            out.append({"task": ppl_source, "split": "test", "unit": "window", "item": w, "acc": None,
                        "acc_norm": None, "nll": float(nll), "tokens": int(tokens)})
    return out


def write_items(path: str | os.PathLike, rows: Sequence[Mapping], common: Mapping,
                ppl_doc_ids: Sequence[str] = (), ppl_bos: str | None = None) -> Path:
    """Write `item_rows` (each with the VARIANT_COLUMNS of `common`) as the per-item Parquet file,
    atomically; `ppl_bos` is the perplexity result's `bos` (None without perplexity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise DataError(f"no per-item scores to write to {path}")
    schema = pa.schema([(c, pa.type_for_alias(t)) for c, t in DOCS_SCHEMA.items()],
                       metadata={"format": DOCS_FORMAT, PPL_DOC_IDS: json.dumps(list(ppl_doc_ids)),
                                 PPL_BOS: json.dumps(ppl_bos)})
    head = {k: common.get(k) for k in VARIANT_COLUMNS}
    table = pa.Table.from_pylist([{c: {**head, **r}.get(c) for c in DOCS_COLUMNS} for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
