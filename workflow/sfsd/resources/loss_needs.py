"""The loss allocation's stages, as pure functions of the shapes, the settings and a machine like the other
stages' (`needs`, whose dataclasses and shared terms they use): the output-gradient pass (`gradients`, rule
collect_gradients) and what it holds for its backward (`backward_bytes`), and the loss criterion of every
rank (`loss_spectra`, one job per factor method) with one Linear's float64 working set (`curve_work_bytes`).
Planned only where compression.allocations has loss (`plan.stage_jobs`)."""

from __future__ import annotations

from sfsd.model.placement import HEADROOM
from sfsd.resources.needs import (
    CUDA_CONTEXT_BYTES,
    FULL_FRACTION,
    PROCESS_BYTES,
    Machine,
    ModelSize,
    Settings,
    StageNeed,
    factors_block_bytes,
    gradient_sums_bytes,
    loading_bytes,
    moments_bytes,
    process_bytes,
    stored_bytes,
)

MAPPED_TENSOR_BYTES = 3 * 65536  # what a tensor read from a block file (sfsd.io.load_tensors: each read maps the
#     file, and the tensor is its pages) holds beyond its own bytes: the kernel maps up to 64 KiB of cached pages
#     around each fault, at the header, before the tensor's start and past its end (one block's 47 tensors of a
#     512-wide Llama held 3.3 MB more than their bytes; this counts 9.2 MB)


def gradient_file_bytes(size: ModelSize, full: bool) -> int:
    """One block's gradients file: per Linear of output width d the float64 G (8 d^2) or its diagonal (8 d),
    and the float64 sum of g (8 d)."""
    return sum(8 * o * o + 8 * o if full else 16 * o for _, o, _ in size.linears)


def backward_bytes(size: ModelSize, rows: int, ctx: int, itemsize: int) -> int:
    """The peak of one batch of the gradient pass (`rows` sequences of `ctx` tokens at `itemsize`) beside
    the weights and the sums: the forward runs through every block before the backward starts, so what
    autograd saves is held for all blocks at once. Per block and token (counted with saved-tensor hooks on
    the Llama blocks of transformers 5): the two norms' float32 inputs (8 hidden), hidden, the attention
    output, q and k/v (sdpa: 2 kv wide; eager: k/v repeated to 1 hidden) and 3 MLP-wide tensors at the run
    dtype, the float32 norm and log-sum-exp scalars; the eager kernel's float32 softmax and its copy at the
    run dtype (rows x heads x ctx^2). Outside the blocks: the logits at the run dtype, the float32
    log-softmax and two float32 gradients of that size in flight, the final norm and the input embeddings
    with their gradient. In flight: the gradients of one block (4 hidden + 3 MLP wide) and a hook's copies
    of one Linear's output gradient (its rows at the run dtype, float32 and squared)."""
    widest = max(o for _, o, _ in size.linears)
    tokens = rows * ctx
    per_block = (8 * size.hidden + itemsize * (2 * size.hidden + max(size.hidden, 2 * size.kv_width) + 3 * size.mlp)
                 + 4 * size.heads + 8)
    scores = rows * size.heads * ctx * ctx * (4 + (itemsize if itemsize < 4 else 0))
    outside = size.vocab * (itemsize + 16) + size.hidden * (8 + 2 * itemsize) + 64
    in_flight = itemsize * (4 * size.hidden + 3 * size.mlp) + (itemsize + 8) * widest
    return size.n_blocks * (tokens * per_block + scores) + tokens * (outside + in_flight)


def gradients(size: ModelSize, s: Settings, m: Machine, full: bool) -> StageNeed:
    """collect_gradients: one forward and backward pass of the whole model at gradients.dtype over the
    calibration tokens, gradients.batch_size sequences of seq_len at a time (`backward_bytes`), and per
    targeted Linear the sums of its output gradient: the whole G (`full`) or its diagonal
    (`gradient_sums_bytes`). On a GPU: the weights, one batch's pass and (full) one Linear's float32 g^T g
    on the device, at least the weights / `placement.HEADROOM` (the stage refuses a device whose free memory
    holds less, sfsd/features/gradients.py `_fits`); the sums, with one product copied to the host, in
    host memory. On the CPU all of it is host memory, the float32 staging sums included. While the files
    are written: one block's G and its serialised copy, and the float64 temporaries of symmetrising one G.
    With gradients.full auto, a full G is chosen where its sums take at most `FULL_FRACTION` of the host
    memory free beside the model (`full_fits`), so that mode counts the sums / FULL_FRACTION beside it: a
    job given this much memory chooses the full G again when it runs. The model and its checkpoint's pages
    pass through host memory while it loads. Writes per block the float64 G (d^2 or d per Linear) and sum
    of g. Leaves out: the tokens and their masks."""
    it = s.grad_itemsize
    outs = [o for _, o, _ in size.linears] * size.n_blocks
    widest = max(outs)
    gpu = s.gpu and m.gpu_bytes is not None
    weights = size.total_params * it
    act = backward_bytes(size, s.grad_batch, s.seq_len, it)
    block_file = gradient_file_bytes(size, full)
    sums = gradient_sums_bytes(outs, full, staged=not gpu) + (4 * widest * widest if full and gpu else 0)
    if full and s.grad_full == "auto":
        sums = max(sums, gradient_sums_bytes(outs, True) / FULL_FRACTION)
    writing = 2 * block_file + (16 * widest * widest if full else 0)
    loading = loading_bytes(size, it, gpu)  # the model and its checkpoint's pages
    if gpu:
        device = CUDA_CONTEXT_BYTES + max(weights / HEADROOM, weights + act + (4 * widest * widest if full else 0))
        host = process_bytes(gpu) + max(loading, sums + writing)
    else:
        device = 0
        host = PROCESS_BYTES + max(loading, weights / HEADROOM, weights + sums + max(act, writing))
    disk = size.n_blocks * block_file
    # gradients.dtype auto: the mode names the dtype the stage then runs in (decide.decide_gradient_dtype)
    dtype = ("float32" if it == 4 else s.grad_fallback) if s.grad_fallback else None
    mode = ("full G" if full else "diagonal G") + (f", {dtype}" if dtype else "")
    return StageNeed("collect_gradients", mode, device, host, disk, disk,
                     gpus=int(gpu), threads=2, why="weights, one batch's backward pass and the sums of G")


def loss_file_bytes(size: ModelSize) -> int:
    """One block's loss criterion file: per Linear the float64 loss(r) at r = 0..kappa - 1 (the factor cache's
    kappa - 1 ranks and rank 0)."""
    return sum(8 * (max(1, o * i // (o + i) - 1) + 1) for _, o, i in size.linears)


def curve_work_bytes(out: int, inp: int, method: str) -> int:
    """float64 bytes one Linear's loss curve holds at its peak (sfsd/decompose/criteria.py loss_curve and
    kfac_loss_curve), k = kappa - 1 the cached ranks: E[x x^T] / count (in^2) and the mean; feature space's
    covariance beside it (in^2 more, a third in^2 while E[x x^T] - m m^T is formed; bias_compensation none:
    E[[x;1][x;1]^T], one row and column more, counted as in + 1); the float64 copies of W, first and second
    (out in + k in + out k); G W C (out in) and one temporary of its size; then the largest of the products
    formed one at a time: (G W C) * W (out in), s^T G W C and its product with first (2 k in), G s and
    s^T G s (out k + k^2), f C and f C f^T beside s^T G s (k in + 2 k^2), the cross terms T with both
    factors (3 k^2). G itself is the gradients file's float64 tensor (no copy)."""
    k = max(1, out * inp // (out + inp) - 1)
    o, i = out, inp + 1 if method == "feature" else inp
    kfac = 8 * (o * i + k * i + o * k) + 8 * o * i + 8 * max(o * i, 2 * k * i, o * k + k * k, k * i + 2 * k * k,
                                                             3 * k * k)
    if method == "feature":
        return max(24 * i * i, 16 * i * i + kfac) + 8 * i
    return 8 * i * i + kfac + 8 * i


def loss_spectra(size: ModelSize, s: Settings, method: str, full: bool) -> StageNeed:
    """loss_spectra of one factor method, on the CPU a block at a time (the model streamed at its stored
    dtype, sfsd/decompose/criteria.py save_loss_spectra): the modules outside the blocks, one block's weights
    (beside the checkpoint's pages while it is read), and then the block's files as they are read and kept
    until the next block: its factor-cache entries (`factors_block_bytes`), stage 1's statistics
    (`moments_bytes`) and the output gradients (`gradient_file_bytes`: the whole G with `full`, the one
    gradients.full chose, else its diagonal), each tensor of them the file pages it is read as (no copy)
    with `MAPPED_TENSOR_BYTES` around it (at most 5 a Linear: first, second, mean, bias, G; 3 an input:
    E[x x^T], sum x, count), and the largest Linear's working set (`curve_work_bytes`); the block's curves.
    Writes per block the float64 loss(r) of every Linear (`loss_file_bytes`). Measured in a fresh process
    (tests/test_resources.py), the pass beyond the process and the modules outside the blocks peaked at
    0.95-0.99 of this on a 512-wide Llama and at 0.996 on a 2048-wide one: the tensors are counted near
    exactly, so what the allocator adds falls to `PROCESS_BYTES` (the stage returns each Linear's freed
    memory to the system, which kept glibc's heap 15% above the tensors without it)."""
    outside = stored_bytes(size, size.embed_params + size.head_params)
    block = stored_bytes(size, size.block_params)
    mapped = MAPPED_TENSOR_BYTES * (5 * len(size.linears) + 3 * len(size.groups))
    files = factors_block_bytes(size, s.factor_itemsize) + moments_bytes(size) + gradient_file_bytes(size, full)
    work = max(curve_work_bytes(o, i, method) for _, o, i in size.linears)
    curves = loss_file_bytes(size)
    host = PROCESS_BYTES + outside + max(outside, block + max(block, files + mapped + work + curves))
    disk = size.n_blocks * curves
    return StageNeed("loss_spectra", f"{method}, {'full' if full else 'diagonal'} G", 0, host, disk, disk,
                     why="one block's weights, factors, statistics and G, one Linear's curve")
