"""Tables built from the combined results Parquet alone (no model, no GPU)."""

from __future__ import annotations

import csv
import os
from collections import defaultdict

import pyarrow.parquet as pq

from .errors import DataError
from .io import atomic_path
from .tasks import TASKS

METHOD_ORDER = {"baseline": 0, "feature": 1, "weight": 2, "whitened": 3, "laser": 4, "vendi": 5}
METHOD_LABEL = {"baseline": "Baseline", "feature": "Feature space (SFSD)", "weight": "Weight space (SVD)",
                "whitened": "Whitened SVD (SVD-LLM)", "laser": "LASER", "vendi": "Vendi"}


def complete_variants(by_variant: dict) -> dict:
    """The variants scored on every task the baseline (else the most complete variant) was scored on: a
    model scored on fewer tasks, e.g. a LASER point chosen for one task (results/<model>/laser/ rows share
    the results file), would show an average over other tasks; those belong to their own tables."""
    bases = [v for (method, _), v in by_variant.items() if method == "baseline"] or list(by_variant.values())
    wanted = max((set(v["scores"]) for v in bases), key=len)  # LASER's own baseline point is one task
    return {k: v for k, v in by_variant.items() if wanted <= set(v["scores"])}


def paper_table_rows(rows: list[dict], metric: str = "acc_norm", split: str = "test") -> tuple[list[dict], dict]:
    """One row per evaluated model variant: parameters, MACs, the six task scores (x100), their average,
    and perplexity; plus notes (docs per task, limit, scorer, versions) for the caption."""
    by_variant: dict[tuple[str, str], dict] = {}
    notes: dict[str, set] = defaultdict(set)
    for r in rows:
        key = (r["method"], r["plan"])
        v = by_variant.setdefault(key, {"method": r["method"], "plan": r["plan"], "scores": {}, "ppl": None})
        v.update({k: r.get(k) for k in ("params_model", "params_model_fraction", "params_decoder_linear_fraction",
                                          "macs_per_token")})
        if r["metric"] == "ppl":
            v["ppl"] = (r["value"], r["task"], r.get("window"))
        elif r["split"] == split and r["metric"] == metric and r["task"] in TASKS:
            v["scores"][r["task"]] = 100.0 * r["value"]
            notes["n"].add(f"{r['task']} {r['n']}")
            notes["scorer"].add(str(r.get("scorer")))
            notes["limit"].add(str(r.get("limit")))
            notes["lm_eval"].add(str(r.get("lm_eval_version")))
    if not by_variant:
        raise DataError("the results hold no rows; run the evaluation rules first")
    by_variant = complete_variants(by_variant)
    table = []
    for (method, plan), v in sorted(by_variant.items(), key=lambda kv: (
            kv[0][0] != "baseline", -(kv[1]["params_model"] or 0), METHOD_ORDER.get(kv[0][0], 9), kv[0][1])):
        tasks = [t for t in TASKS if t in v["scores"]]
        row = {
            "method": METHOD_LABEL.get(method, method), "plan": plan,
            "params_M": round((v["params_model"] or 0) / 1e6, 2),
            "params_%": round(100 * (v["params_model_fraction"] or 0), 1),
            "decoder_linear_%": round(100 * (v["params_decoder_linear_fraction"] or 0), 1),
            "MACs_per_token_M": round((v["macs_per_token"] or 0) / 1e6, 1),
            **{t: round(v["scores"][t], 2) for t in tasks},
            "average": round(sum(v["scores"][t] for t in tasks) / len(tasks), 2) if tasks else None,
        }
        if v["ppl"] is not None:
            row[f"ppl_{v['ppl'][1]}_{v['ppl'][2]}"] = round(v["ppl"][0], 2)
        table.append(row)
    return table, {k: sorted(s) for k, s in notes.items()}


def paper_table(results: str | os.PathLike, metric: str, out_md: str | os.PathLike, out_csv: str | os.PathLike) -> None:
    """Write the SFSD paper's Table 1 analogue as Markdown (with its caption) and CSV."""
    table, notes = paper_table_rows(pq.read_table(results).to_pylist(), metric)
    write_table(table, out_md, out_csv,
                caption=f"Zero-shot {metric} (x100) on the test split; params over the whole model (embeddings and "
                "lm_head included, as in the SFSD paper) and over decoder Linear layers (as in SVD-LLM); MACs per "
                "token of the Linear layers (lm_head included).",
                footer=f"Docs per task: {', '.join(notes.get('n', []))}. Limit per task: "
                f"{', '.join(notes.get('limit', []))}. Scorer: {', '.join(notes.get('scorer', []))} "
                f"(lm-eval {', '.join(notes.get('lm_eval', []))}).")


def _cell(value) -> str:
    return "" if value is None else str(value)


def write_table(rows: list[dict], out_md: str | os.PathLike, out_csv: str | os.PathLike, caption: str,
                footer: str | None = None, cell=_cell) -> None:
    """Write rows as CSV and as a Markdown table between a caption line and an optional footer, atomically.
    Columns: every key in first-seen order; `cell` formats a Markdown cell."""
    if not rows:
        raise DataError(f"no rows for the table {out_md}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    if footer:
        lines += ["", footer]
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
