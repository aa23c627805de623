"""The native multiple-choice scorer: lm-eval's zero-shot log-likelihoods, computed with less work.

- `build_requests` + `score_multiple_choice(model, tokenizer, requests, batch_size)`: the native scorer
  (the default of the evaluate stage and the scorer of the rank search): lm-eval's log-likelihoods with
  each document's shared context run once through a KV cache and the lm_head only on scored positions.
  The requests come from lm-eval's own Task objects (`Task.build_all_requests`), so prompts, choices,
  delimiter and gold are lm-eval's by construction. `check_against_lmeval` compares its per-document
  scores with lm-eval's (`sfsd.evaluate.harness.evaluate_lmeval_detailed`; the check_scorer rule);
  `forward_work` counts what each of the two computes.

Its per-document scores become result rows with `sfsd.evaluate.rows.summarize_scores` (and the paper's average
column with `sfsd.evaluate.rows.mean_metric`).

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
orders. The log-likelihoods agree to about 1e-6 relative in float32; in bfloat16 to a few of its rounding
steps (both HFLM and this scorer take and sum the log-softmax in the logits' dtype unless softmax_dtype is
set; `CHECK_TOLERANCE`), and acc / acc_norm can differ only for a document whose two picks are tied within it.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sfsd.errors import ConfigError, DataError
from sfsd.evaluate.harness import _loaded_tasks
from sfsd.model.placement import input_device
from sfsd.tasks.lmeval import task_source
from sfsd.tasks.registry import ACCURACY_METRICS
from sfsd.tasks.splits import _check_split_ids


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
    # the decoder's output lies where its last module runs (the last GPU of a spread model)
    logits = head(hidden[row_of.to(hidden.device), cols.to(hidden.device)])
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
    device = input_device(model)
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
    Aggregate with `sfsd.evaluate.rows.summarize_scores`."""
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
                    "greedy": [greedy[j] for j in js], "choice_chars": list(doc.choice_chars),
                    **_doc_metrics(doc_lls, doc.choice_chars, doc.gold)})
    return out


# (absolute, relative) tolerance of each choice's log-likelihood, by the model's dtype. In bfloat16 (8 significant
# bits) both scorers sum bfloat16 log-probabilities of bfloat16 logits, and logits of 10-30 are rounded to
# 0.06-0.125, differently in differently shaped matmuls: SmolLM2-135M on 60 documents differed by up to 0.14 on
# one-token answers of -3.3 and 0.5 on answers of -17 to -95 (4.2% at most); the bounds leave twice that.
# float16 has 3 more bits: the bfloat16 bounds / 8 (not measured). float32: 1e-4 (measured: about 1e-6 relative).
CHECK_TOLERANCE = {"float32": (1e-4, 0.0), "bfloat16": (0.25, 0.05), "float16": (0.03125, 0.00625)}


def check_against_lmeval(native: Sequence[Mapping], reference: Sequence[Mapping], tolerance: float = 1e-4,
                         rtol: float = 0.0) -> dict:
    """Compare the native scorer's per-document scores with lm-eval's on the same documents: every
    choice's log-likelihood within `tolerance` + `rtol` x |lm-eval's| (`CHECK_TOLERANCE` by dtype), and
    acc / acc_norm (where lm-eval reports them) identical, unless the two picks are tied within that bound
    (lm-eval prefers its pick by no more than the two choices' bounds; acc_norm: per character, where the
    native score records `choice_chars`). Returns {docs, choices, max_abs_diff, mismatches: [...]} (empty
    list: they agree)."""
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
        mine, theirs = np.asarray(s["lls"], dtype=float), np.asarray(d["lls"], dtype=float)
        bound = tolerance + rtol * np.abs(theirs)
        diff = float(np.max(np.abs(mine - theirs)))
        worst, choices = max(worst, diff), choices + len(s["lls"])
        if not np.all(np.abs(mine - theirs) <= bound):
            mismatches.append({"task": key[0], "doc_id": key[2], "what": f"log-likelihood differs by {diff:.2e}"})
        for m in ACCURACY_METRICS:
            tied = _tied(mine, theirs, bound, None) if m == "acc" else "choice_chars" in s and _tied(
                mine, theirs, bound, np.asarray(s["choice_chars"], dtype=float))
            if m in d and float(d[m]) != float(s[m]) and not tied:
                mismatches.append({"task": key[0], "doc_id": key[2], "what": f"{m} {s[m]} (native) vs {d[m]} (lm-eval)"})
    mismatches += [{"task": k[0], "doc_id": k[2], "what": "scored by lm-eval but not natively"} for k in ref]
    return {"docs": len(native), "choices": choices, "max_abs_diff": worst, "tolerance": tolerance, "rtol": rtol,
            "mismatches": mismatches}


def _tied(mine: np.ndarray, theirs: np.ndarray, bound: np.ndarray, chars: np.ndarray | None) -> bool:
    """Whether the scorers pick different choices (argmax, per character with `chars`) only by rounding:
    lm-eval's pick beats the native one by at most the two choices' bounds."""
    w = np.ones_like(theirs) if chars is None else 1.0 / chars
    a, b = int(np.argmax(mine * w)), int(np.argmax(theirs * w))
    return a != b and bool(w[b] * theirs[b] - w[a] * theirs[a] <= w[a] * bound[a] + w[b] * bound[b])