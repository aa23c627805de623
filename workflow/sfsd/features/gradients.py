"""Output-gradient statistics, a cached stage beside stage 1: per targeted Linear, the second moment of
the gradient of the language-model loss with respect to the Linear's OUTPUT, which the loss criterion
(`sfsd.decompose.criteria`) weighs each layer's output error with.

The loss. L = sum over the calibration sequences and their predicted positions of the token negative
log-likelihood (nats; position t predicts token t + 1; a position is predicted when both tokens are real,
so padding never enters it): a SUM, not a mean, so a token's gradient does not depend on how the tokens
are batched. For each targeted Linear y = W x + b and each real token t, g_t = dL/dy_t (the output at t
feeds every later position's prediction through attention; all of that is in g_t). The stage stores

    G = (1/N) sum_t g_t g_t^T          (per token; N = the real tokens, the same N as stage 1's counts)

(`<linear>.ggt`, float64), or only its diagonal (`<linear>.gdiag`), and sum_t g_t (`<linear>.gsum`, E[g]
is ~0 at a trained model: the first-order term the criterion leaves out). Under K-FAC's assumption (g
independent of x) a change dy_t = D x_t of the layer's outputs then raises L by about
N/2 tr(G D C D^T), C = E[x x^T], and the mean NLL per predicted token by N/N_pred times 1/2 tr(G D C D^T)
(`tokens` and `predicted_tokens` are in every file's metadata).

One forward and backward pass of the model over the calibration tokens (about three forward passes of
compute): parameters frozen (`requires_grad_(False)`), the input embeddings made to require a gradient,
and on each targeted Linear a forward hook that puts a tensor hook on its output, which receives dL/dy;
the gradients of padded positions are dropped (they are 0: right padding feeds no real prediction).
Each batch's g^T g is formed in float32 and added into float64 totals on the CPU (`GradientMoments`).

`gradients.labels`: the tokens the NLL scores. data = the calibration text's next tokens, so G is the
empirical Fisher (the loss criterion then predicts the rise of the text's NLL); sampled = one token per
position drawn from the model's own prediction (seeded by `gradients.seed`), so G estimates the true
Fisher, the Gauss-Newton Hessian of the KL divergence from the model's predictions (the criterion then
predicts the KL of the compressed model from the dense one, as K-FAC samples its targets). Same cost.

`gradients.pack`: the pass reads the calibration texts packed end to end (each followed by the tokenizer's
end-of-sequence token) into full rows of `calibration.seq_len` (`packed_tokens`), instead of one text per
row: the same tokens, each with the whole row after it to feed (a short text's last tokens otherwise feed
no later position). Stage 1's statistics keep one text per row.

`gradients.full`: true = the whole G (out x out per Linear), false = its diagonal, auto = the whole G when
its sums fit (`resolve_full`, by the resource planner's rule `sfsd.resources.needs.full_fits`, which also
sizes the job). The model must fit the device: with `streamed` always, or auto where its weights take
more than `placement.HEADROOM` of the device's free memory, the stage stops with one line (streaming the
backward pass block by block is not implemented).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.features.stats import check_finite
from sfsd.io import atomic_dir, load_tensors, model_digest, save_tensors, write_json
from sfsd.model.loading import load_model, load_tokenizer, model_config, resolve_dtype
from sfsd.model.placement import input_device, placement, resolve_device
from sfsd.model.registry import architecture_of, blocks_of, get_arch, select_linears
from sfsd.model.spec import ArchSpec
from sfsd.model.stream import host_available
from sfsd.provenance import require, stamp, tokenizer_digest, value_digest
from sfsd.resources.needs import full_fits, gradient_sums_bytes

log = logging.getLogger(__name__)

LABELS = ("data", "sampled")
LOSS = "sum of token NLLs (nats) over predicted real tokens; G = (1/tokens) sum_t g_t g_t^T, g_t = dL/dy_t"


def resolve_full(setting: str | bool, out_features: Sequence[int], available_bytes: float) -> bool:
    """The `gradients.full` setting (true / false / auto, as a string or a bool) decided: auto by the
    resource planner's rule (`sfsd.resources.needs.full_fits`: the whole G when its sums take at most half
    of `available_bytes`, the host memory free beside the loaded model), which also sizes the job."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"gradients.full {setting!r} is unknown; use auto, true or false")
    return setting == "true" or (setting == "auto" and full_fits(out_features, available_bytes))


class GradientMoments:
    """Running float64 totals of one Linear's output gradients: sum g g^T (full) or sum g^2 (diagonal),
    sum g, and the token count. The whole G's batches are summed in place into a float32 staging matrix on
    the CPU (`addmm_`, no temporaries), which is added into the float64 total every `flush_every` batches
    (as stage 1's `InputMoments`); on a GPU each batch's product goes to the CPU at once, so no persistent
    device memory is held."""

    def __init__(self, dim: int, full: bool, flush_every: int = 8) -> None:
        self.full, self.flush_every = full, flush_every
        self.gg = torch.zeros((dim, dim) if full else (dim,), dtype=torch.float64)
        self.gsum = torch.zeros(dim, dtype=torch.float64)
        self.count = 0
        self._staged: torch.Tensor | None = None
        self._batches = 0

    def update(self, g: torch.Tensor) -> None:
        """Add a (tokens, d) batch of gradients."""
        g = g.reshape(-1, g.shape[-1]).float()
        if self.full and g.device.type == "cpu":
            if self._staged is None:
                self._staged = torch.zeros(self.gg.shape, dtype=torch.float32)
            self._staged.addmm_(g.T, g)
            self._batches += 1
            if self._batches >= self.flush_every:
                self.flush()
        elif self.full:
            self.gg += (g.T @ g).cpu()
        else:
            self.gg += g.square().sum(0, dtype=torch.float64).cpu()
        self.gsum += g.sum(0, dtype=torch.float64).cpu()
        self.count += g.shape[0]

    def flush(self) -> None:
        """Add the staged float32 batches into the float64 total."""
        if self._staged is not None and self._batches:
            self.gg += self._staged
            self._staged.zero_()
            self._batches = 0

    def second_moment(self) -> torch.Tensor:
        """G = E[g g^T] (full, symmetrised: a float32 g^T g need not be exactly symmetric) or its diagonal,
        per token."""
        self.flush()
        gg = (self.gg + self.gg.T) / 2 if self.full else self.gg
        return gg / max(self.count, 1)


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                 targets: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the NLLs, number of predictions) of a right-padded batch: position t predicts token t + 1
    where both are real tokens (float32 log-softmax). `targets` (batch, length - 1): the tokens scored in
    place of the text's next tokens (`sampled_targets`)."""
    targets = (input_ids[:, 1:] if targets is None else targets).to(logits.device)
    valid = (mask[:, 1:] * mask[:, :-1]).to(logits.device).bool()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), int(valid.sum())


def sampled_targets(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One next token per position drawn from the model's own distribution softmax(logits) (float32), shape
    (batch, length - 1): the labels under which E[g g^T] is the true Fisher, the Gauss-Newton Hessian of
    the KL divergence from the model's predictions, instead of the empirical Fisher of the text's tokens."""
    with torch.no_grad():
        probs = logits[:, :-1].float().softmax(dim=-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return drawn.reshape(probs.shape[:2])


def packed_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, separator: int | None) -> dict[str, torch.Tensor]:
    """The real tokens of every row in order, each text followed by `separator` (None: nothing), cut into
    rows as long as the input's (seq_len); the last row right-padded and masked."""
    seq_len = input_ids.shape[1]
    tail = [] if separator is None else [separator]
    stream = [t for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())
              for t in ids[: sum(mask)] + tail]
    rows = -(-len(stream) // seq_len)
    ids = torch.zeros((rows, seq_len), dtype=input_ids.dtype)
    mask = torch.zeros((rows, seq_len), dtype=attention_mask.dtype)
    ids.view(-1)[: len(stream)] = torch.tensor(stream, dtype=input_ids.dtype)
    mask.view(-1)[: len(stream)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Longest first, each batch cut after its last real token (right padding changes no real token)."""
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = order[start: start + batch_size]
        width = int(lengths[rows].max())
        out.append((input_ids[rows, :width], attention_mask[rows, :width]))
    return out


def collect_output_gradients(
    model: torch.nn.Module,
    spec: ArchSpec,
    linears: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    full: bool,
    progress: bool = True,
    labels: str = "data",
    seed: int = 0,
) -> tuple[list[dict[str, GradientMoments]], dict]:
    """Per block and targeted Linear, the moments of g = dL/dy over the real tokens (L the summed NLL:
    module docstring), and a summary: `loss` (summed NLL), `predicted_tokens`, `tokens`. The model's
    parameters are frozen for the pass (and their requires_grad restored after it). `labels`: data = the
    text's next tokens (the empirical Fisher); sampled = one token per position drawn from the model's own
    prediction (`sampled_targets`, a generator seeded with `seed`; the true Fisher)."""
    if batch_size < 1:
        raise ConfigError(f"gradients.batch_size must be >= 1, got {batch_size}")
    if labels not in LABELS:
        raise ConfigError(f"gradients.labels {labels!r} is unknown; use one of {', '.join(LABELS)}")
    generators: dict[torch.device, torch.Generator] = {}
    blocks = blocks_of(model, spec)
    moments = [{name: None for name in linears} for _ in blocks]
    state: dict = {}
    handles = []

    def make_hook(b: int, name: str):
        def forward_hook(_module, _inputs, output):
            valid = state["valid"]

            def grad_hook(grad):
                g = grad.reshape(-1, grad.shape[-1]).index_select(0, valid.to(grad.device))
                acc = moments[b][name]
                if acc is None:
                    acc = moments[b][name] = GradientMoments(grad.shape[-1], full)
                acc.update(g)

            if output.requires_grad:
                output.register_hook(grad_hook)
        return forward_hook

    for b, block in enumerate(blocks):
        for name in linears:
            handles.append(block.get_submodule(spec.linears[name]).register_forward_hook(make_hook(b, name)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    device = input_device(model)
    embed = model.get_input_embeddings()
    total, predicted = 0.0, 0
    try:
        with torch.enable_grad(), tqdm(total=int(attention_mask.sum()), unit="tok", unit_scale=True,
                                       disable=not progress, desc="gradients") as bar:
            for ids, mask in _batches(input_ids, attention_mask, batch_size):
                ids, mask = ids.to(device), mask.to(device)
                state["valid"] = mask.reshape(-1).nonzero().squeeze(1)
                embeds = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
                targets = None
                if labels == "sampled":
                    if logits.device not in generators:
                        generators[logits.device] = torch.Generator(device=logits.device).manual_seed(seed)
                    targets = sampled_targets(logits, generators[logits.device])
                loss, n = token_losses(logits, ids, mask, targets)
                if not torch.isfinite(loss):
                    raise DataError(f"the calibration loss is {float(loss)}: the model's weights or dtype overflow "
                                    "(collect gradients in float32)")
                loss.backward()
                total, predicted = total + float(loss.detach()), predicted + n
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    missing = [f"{b}.{n}" for b, per in enumerate(moments) for n, acc in per.items() if acc is None]
    if missing:
        raise DataError(f"no gradient reached {missing[:3]}; these layers do not feed the loss")
    for b, per in enumerate(moments):
        check_finite({f"{n}.gg": acc.second_moment() for n, acc in per.items()}, f"gradients of block {b}")
    return moments, {"loss": total, "predicted_tokens": predicted, "tokens": int(attention_mask.sum())}


def run_gradients(
    model_dir: str | os.PathLike,
    tokens_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_name: str,
    layers: list[str],
    full: str = "auto",
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 4,
    streamed: str = "auto",
    compressed: tuple[torch.nn.Module, dict] | None = None,
    labels: str = "data",
    seed: int = 0,
    pack: bool = False,
) -> dict:
    """Load model and tokens, collect the output gradients, write block_NNN.safetensors and manifest.json
    (the layout of stage 1's features/, `collect.block_file`). `compressed`: (model, plan) of a compressed
    folder of the model of `model_dir` (`decompose.compress.load_compressed`), whose gradients are collected
    instead; the files keep the dense model's digest (the loss criterion pairs them with its statistics) and
    record the plan's digest in their settings."""
    digest = model_digest(model_dir)
    config = model_config(model_dir)
    arch = architecture_of(config)
    spec = get_arch(arch)
    torch_device = resolve_device(device)
    if streamed not in ("auto", "always", "never"):
        raise ConfigError(f"streamed {streamed!r} is unknown; use auto, always or never")
    if streamed == "always" or (streamed == "auto" and not _fits(model_dir, dtype, torch_device)):
        raise ConfigError(f"gradients: {model_name} does not fit {torch_device} whole (streamed {streamed}); the backward "
                          "pass is not streamed block by block: run this stage on a device that holds the model")
    tokens, tok_meta = load_tensors(tokens_path, ["input_ids", "attention_mask"])
    require(tokens_path, tok_meta, "tokenize_calibration", tokenizer_digest=tokenizer_digest(model_dir))
    if pack:
        before = tokens["input_ids"].shape[0]
        tokens = packed_tokens(tokens["input_ids"], tokens["attention_mask"], load_tokenizer(model_dir).eos_token_id)
        log.info("packed %d calibration texts into %d rows of %d tokens", before, *tokens["input_ids"].shape)
    model = load_model(model_dir, dtype=dtype, device=device)[0] if compressed is None else compressed[0]
    linears = select_linears(spec, layers)
    n_blocks = len(blocks_of(model, spec))
    outs = [model.get_submodule(f"{spec.blocks}.0.{spec.linears[n]}").out_features for n in linears] * n_blocks
    use_full = resolve_full(full, outs, host_available())
    log.info("output gradients of %s on %s (%s), %s G (%.2f GB of sums)", linears, placement(model), dtype,
             "full" if use_full else "diagonal", gradient_sums_bytes(outs, use_full) / 1e9)
    started = time.perf_counter()
    moments, summary = collect_output_gradients(model, spec, linears, tokens["input_ids"], tokens["attention_mask"],
                                                batch_size, use_full, labels=labels, seed=seed)
    seconds = time.perf_counter() - started
    settings = {"layers": list(layers), "full": str(full).lower(), "dtype": dtype, "device": device,
                "batch_size": batch_size, "labels": labels, "pack": pack}
    if labels == "sampled":
        settings["seed"] = seed
    if compressed is not None:
        settings["compressed_plan"] = value_digest(compressed[1]["layers"])
    common = {"model": model_name, "architecture": arch, "full": use_full, "loss": LOSS, "labels": labels, "pack": pack,
              "tokens": summary["tokens"], "predicted_tokens": summary["predicted_tokens"], "dtype": dtype,
              **stamp(digest, tok_meta.get("digest"), settings, tokenizer_digest=tok_meta.get("tokenizer_digest"))}
    key = "ggt" if use_full else "gdiag"
    with atomic_dir(out_dir) as tmp:
        for b, per in enumerate(moments):
            tensors = {}
            for n, acc in per.items():
                tensors[f"{n}.{key}"] = acc.second_moment()
                tensors[f"{n}.gsum"] = acc.gsum
            save_tensors(Path(tmp) / block_file(b), tensors, {**common, "block": b, "linears": linears})
        write_json(Path(tmp) / "manifest.json", {
            **common, "n_blocks": n_blocks, "linears": linears, "device": placement(model),
            "mean_nll": summary["loss"] / max(summary["predicted_tokens"], 1), "seconds": round(seconds, 2),
            "tokens_per_second": round(summary["tokens"] / seconds, 1)})
    log.info("gradients of %d tokens in %.1f s, mean NLL %.4f", summary["tokens"], seconds,
             summary["loss"] / max(summary["predicted_tokens"], 1))
    return common


def _fits(model_dir: str | os.PathLike, dtype: str, device: torch.device) -> bool:
    """Whether the weights at `dtype` take at most `placement.HEADROOM` of the memory free on `device`
    (a CUDA device's free memory, else the host's); the activations of a batch come on top."""
    from sfsd.model.placement import HEADROOM
    from sfsd.model.shapes import model_shapes

    need = model_shapes(model_dir).total_params * resolve_dtype(dtype).itemsize
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available()
    log.info("weights %.2f GB at %s; %.2f GB free on %s", need / 1e9, dtype, free / 1e9, device)
    return need <= HEADROOM * free


def output_gradient(block, linear: str) -> torch.Tensor:
    """G of one Linear (float64) from a gradients block file (a mapping of its tensors, e.g.
    `compress.BlockFile`): the (d, d) matrix, or its (d,) diagonal where the stage stored only that."""
    for key in ("ggt", "gdiag"):
        try:
            return block[f"{linear}.{key}"].double()
        except (KeyError, DataError):
            continue
    raise DataError(f"the output gradients lack {linear}; rerun collect_gradients with this layer")


__all__ = ["GradientMoments", "LABELS", "LOSS", "collect_output_gradients", "output_gradient", "resolve_full", "packed_tokens", "run_gradients",
           "sampled_targets", "token_losses"]
