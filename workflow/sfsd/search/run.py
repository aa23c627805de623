"""The search stage: load the model, the factor cache and the search data, run `surgical_search`, and
write its outputs. All file access of the search lives here, the resumable state file included
(`SearchState`); `sfsd.search.algorithm` only sees tensors, callables and that state object.

Outputs (a folder per search, `results/<model>/search/<method>-<mode>-<target>/`):
- plan.json: the final rank plan (`sfsd.decompose.plan` format; layers the search kept dense appear as "dense");
- log.jsonl: one record per searched layer (candidates tried with scores, decision, parameters);
- curve.parquet: the test split along the search (layers_done, params, task, metric, value, n);
- checkpoints/pNN.json: the plan when the model first fell to NN% of its parameters;
- summary.json: baseline, block-forward counters, evaluations, cache size, time, settings.
The resumable state lives NEXT to the folder (`<folder>.state.jsonl`), not in it, because Snakemake
removes the outputs of a failed job; it is deleted once the outputs are complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from sfsd.decompose.compress import BlockFile
from sfsd.decompose.factor_cache import factor_entry
from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.io import atomic_dir, atomic_path, model_digest, write_json
from sfsd.model.placement import placement
from sfsd.model.registry import architecture_of, get_arch, select_linears
from sfsd.provenance import stamp, value_digest
from sfsd.search.algorithm import SearchRecord, search_order, surgical_search
from sfsd.search.objectives import AccuracyObjective, KLObjective, LoglikObjective, PerplexityObjective
from sfsd.search.settings import SearchSettings

log = logging.getLogger(__name__)

AVERAGE = "average"


def state_path(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    return out.with_name(out.name + ".state.jsonl")


class SearchState(SearchRecord):
    """The append-only JSON-lines file a search resumes from: a header (settings digest), the baseline,
    then one record per finished layer and per curve point, each flushed and fsync'd."""

    def __init__(self, path: str | os.PathLike, settings: SearchSettings) -> None:
        super().__init__()
        self.path = Path(path)
        self.digest = value_digest(asdict(settings))
        records = self._read()
        if records and records[0].get("type") == "header" and records[0].get("digest") == self.digest:
            for r in records[1:]:
                if r["type"] == "baseline":
                    self.baseline = r["score"]
                elif r["type"] == "layer":
                    self.layers.append(r["record"])
                elif r["type"] == "curve":
                    self.curve.extend(r["rows"])
            self._rewrite(records)  # drops a torn last line
            if self.layers or self.baseline is not None:
                log.info("resuming the search from %s: %d layers done", self.path, len(self.layers))
        else:
            if records:
                log.info("%s holds another search's state (settings changed): starting over", self.path)
            self._rewrite([{"type": "header", "digest": self.digest, "settings": asdict(settings)}])

    def __str__(self) -> str:
        return str(self.path)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is lost, and redone
        return out

    def _rewrite(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_baseline(self, score: float) -> None:
        super().add_baseline(score)
        self.append({"type": "baseline", "score": score})

    def add_layer(self, record: dict) -> None:
        super().add_layer(record)
        self.append({"type": "layer", "record": record})

    def add_curve(self, rows: list[dict]) -> None:
        super().add_curve(rows)
        self.append({"type": "curve", "rows": rows})


class FactorCache:
    """(block, linear) -> full-rank factor entry from `<factors>/<method>/block_NNN.safetensors`, the
    current block's file open at a time, digest-checked against the model."""

    def __init__(self, root: str | os.PathLike, method: str, digest: str | None) -> None:
        self.root, self.method, self.digest = Path(root), method, digest
        self.calibration_digest: str | None = None
        self._block: tuple[int, BlockFile] | None = None

    def check(self, blocks: Sequence[int]) -> None:
        """Fail before any scoring when a block file is missing, corrupt or of another model."""
        digests = {BlockFile(self.root / self.method / block_file(block), self.digest).metadata.get("calibration_digest")
                   for block in sorted(set(blocks))}
        if len(digests) > 1:
            raise DataError(f"the {self.method} factor cache in {self.root} mixes blocks of different calibration runs "
                            f"({sorted(map(str, digests))}); rerun the factor_cache rule")
        self.calibration_digest = digests.pop() if digests else None

    def __call__(self, block: int, linear: str) -> dict[str, torch.Tensor]:
        if self._block is None or self._block[0] != block:
            self._block = (block, BlockFile(self.root / self.method / block_file(block), self.digest))
        return factor_entry(self._block[1], linear)


def run_search(
    *,
    model_dir: str,
    model_name: str,
    factors_dir: str,
    out_dir: str,
    settings: SearchSettings,
    layers: Sequence[str],
    tasks_dir: str | None,
    splits_file: str,
    task_source: str = "local",
    tasks: Sequence[str],
    search_limit: int | None,
    curve_limit: int | None,
    curve_every: int = 1,
    ppl_window: int = 128,
    ppl_bos: str = "auto",
    ppl_max_docs: int | None = 300,
    ppl_search_fraction: float,
    ppl_path: str | None = None,
    ppl_text_field: str = "text",
    calibration_texts: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    cache: bool = True,
    cache_max_mb: float = 4096,
    progress: bool = True,
    with_curve: bool = True,
) -> dict:
    """Run the search of `settings` and write its outputs into `out_dir` (atomically); return the summary.
    A perplexity search reads the text of `sfsd.evaluate.perplexity.perplexity_texts(settings.target)`; the
    text_file / jsonl_file targets read `ppl_path` (its `ppl_text_field`), the file of evaluation.perplexity;
    its windows put BOS where `ppl_bos` (evaluation.perplexity.bos) says, as the evaluate stage's do."""
    from sfsd.features.calibration import read_texts
    from sfsd.tasks.lmeval import source_by_name
    from sfsd.model.loading import load_model
    from sfsd.model.registry import perplexity_bos
    from sfsd.evaluate.perplexity import perplexity, perplexity_texts, split_texts
    from sfsd.model.shapes import model_shapes
    from sfsd.evaluate.rows import summarize_scores
    from sfsd.evaluate.scoring import build_requests, encode_requests, lmeval_max_length, score_multiple_choice
    from sfsd.tasks.splits import read_split_ids
    from sfsd.tasks.registry import task_metrics

    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    shapes = model_shapes(model)
    spec = get_arch(architecture_of(model.config))
    linears = select_linears(spec, list(layers))
    digest = model_digest(model_dir)
    max_length = lmeval_max_length(model, tokenizer)
    source = source_by_name(task_source, tasks_dir)

    ppl_docs: tuple[list, list] | None = None
    if settings.mode == "perplexity":
        exclude = [d["doc_id"] for d in read_texts(calibration_texts)] if calibration_texts else []
        # the same documents, exclusions and cut as the evaluate stage's (`perplexity_args`), so its test part
        # is exactly what every variant is scored on
        docs = split_texts(perplexity_texts(settings.target, path=ppl_path, text_field=ppl_text_field,
                                            exclude_ids=exclude, max_docs=ppl_max_docs), ppl_search_fraction)
        # search on the first part, as SFSD does on WikiText-2; the curve scores (curve_limit of) the rest,
        # the text the evaluate stage scores for every variant
        ppl_docs = (docs["search"], docs["test"][:curve_limit] if curve_limit else docs["test"])
        ppl_bos = perplexity_bos(ppl_bos, model.config.model_type)  # the protocol, resolved once and recorded
        objective = PerplexityObjective(tokenizer, ppl_docs[0], ppl_window, settings.eps, batch_size, bos=ppl_bos)
        inputs = [d["doc_id"] for d in ppl_docs[0]]
    else:
        target_tasks = list(tasks) if settings.target == AVERAGE else [settings.target]
        unknown = [t for t in target_tasks if t not in tasks]
        if unknown:
            raise ConfigError(f"search target {settings.target!r} is not one of evaluation.tasks {list(tasks)} nor "
                              f"{AVERAGE!r}")
        try:  # before any scoring: a metric lm-eval does not define for a target task (acc_norm on boolq)
            task_metrics(target_tasks, settings.metric)
        except ConfigError as err:
            raise ConfigError(f"search.metric: {err}") from None
        ids, n_docs = read_split_ids(splits_file, target_tasks, "search", search_limit, task_source)
        enc = encode_requests(tokenizer, build_requests(source, target_tasks, ids, ["search"], n_docs=n_docs),
                              max_length)
        kind = {"accuracy": AccuracyObjective, "loglik": LoglikObjective, "kl": KLObjective}[settings.mode]
        objective = kind(tokenizer, enc, settings.metric, settings.tolerance(), batch_size)
        inputs = ids
    # a perplexity search's scores depend on its windows too: a resumed state must have been scored on the same
    scored_on = [digest, inputs, search_limit] + ([ppl_window, ppl_bos] if ppl_docs is not None else [])
    settings = SearchSettings(**{**asdict(settings), "inputs": value_digest(scored_on)})

    if with_curve:
        test_ids, n_docs = read_split_ids(splits_file, list(tasks), "test", curve_limit, task_source)
        test_enc = encode_requests(tokenizer, build_requests(source, list(tasks), test_ids, ["test"], n_docs=n_docs),
                                   max_length)

    def curve(m: torch.nn.Module) -> list[dict]:
        # whole inputs, as the objective (the block-forward counters count whole sequences)
        rows = summarize_scores(score_multiple_choice(m, tokenizer, test_enc, batch_size, share_prefix=False))
        if ppl_docs is not None:
            r = perplexity(m, tokenizer, ppl_docs[1], ppl_window, batch_size=batch_size, bos=ppl_bos)
            rows.append({"task": settings.target, "split": "test", "metric": "ppl", "value": r["ppl"],
                         "stderr": None, "n": r["tokens"], "scorer": "native"})
        return [{k: r[k] for k in ("task", "split", "metric", "value", "n")} for r in rows]

    factors = FactorCache(factors_dir, settings.method, digest)
    factors.check(b for b, _ in search_order(spec, shapes.n_blocks, linears, settings.first_block,
                                             settings.last_block, settings.order))
    settings.check()  # before the state file is touched
    state = SearchState(state_path(out_dir), settings)
    result = surgical_search(
        model, spec, shapes, linears, factors, objective, settings, state,
        curve=curve if with_curve else None, curve_every=curve_every, cache=cache, cache_max_bytes=cache_max_mb * 2**20,
        header={"model": model_name, "model_digest": digest, "architecture": architecture_of(model.config)},
        progress=progress)
    # what the plan was made from: model, the factor caches' calibration, the settings, the code
    result.plan["notes"]["provenance"] = stamp(digest, factors.calibration_digest, asdict(settings))
    name = Path(out_dir).name
    summary = {**result.summary, "model": model_name, "search": name, "settings": asdict(settings),
               "device": placement(model), "search_limit": search_limit,
               "curve_limit": curve_limit,
               **({"ppl_window": ppl_window, "ppl_bos": ppl_bos} if ppl_docs is not None else {}),
               # the documents every decision was made on (never scored by the evaluate stage)
               "search_docs": inputs}
    _write_outputs(out_dir, result, summary, model_name, name, settings)
    state.path.unlink(missing_ok=True)
    log.info("search %s: %d layers, %d evaluations, %d search block-forwards, params %.4f of the model",
             name, summary["layers_searched"], summary["evaluations"], summary["search_block_forwards"],
             summary.get("params_model_fraction", 1.0))
    return summary




def _write_outputs(out_dir, result, summary: dict, model_name: str, name: str, settings: SearchSettings) -> None:
    """Each file atomically, summary.json last (Snakemake deletes all outputs of a job that fails)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", result.plan)
    with atomic_path(out / "log.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in result.layers:
            f.write(json.dumps(r) + "\n")
    curve = [{"model": model_name, "method": settings.method, "search": name, "mode": settings.mode,
              "target": settings.target, **r} for r in result.curve]
    columns = ["model", "method", "search", "mode", "target", "layers_done", "block", "params_model",
               "params_model_fraction", "params_decoder_linear", "params_decoder_linear_fraction",
               "task", "split", "metric", "value", "n"]
    types = {"layers_done": pa.int64(), "block": pa.int64(), "params_model": pa.int64(),
             "params_decoder_linear": pa.int64(), "n": pa.int64(), "value": pa.float64(),
             "params_model_fraction": pa.float64(), "params_decoder_linear_fraction": pa.float64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    with atomic_path(out / "curve.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in curve], schema=schema), tmp)
    with atomic_dir(out / "checkpoints") as tmp:
        for label, plan in result.checkpoints.items():
            write_json(Path(tmp) / f"{label}.json", plan)
    write_json(out / "summary.json", summary)


__all__ = ["AVERAGE", "FactorCache", "SearchState", "run_search", "state_path"]
