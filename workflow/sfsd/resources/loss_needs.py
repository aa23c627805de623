"""The loss allocation's stages, as pure functions of the shapes, the settings and a machine like the other
stages' (`needs`, whose dataclasses and shared terms they use): the output-gradient pass (`gradients`, rule
collect_gradients) and what it holds for its backward (`backward_bytes`). Planned only where
compression.allocations has loss (`plan.stage_jobs`)."""

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
    gradient_sums_bytes,
    loading_bytes,
    process_bytes,
)


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
    block_file = sum(8 * o * o + 8 * o if full else 16 * o for _, o, _ in size.linears)
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
    return StageNeed("collect_gradients", "full G" if full else "diagonal G", device, host, disk, disk,
                     gpus=int(gpu), threads=2, why="weights, one batch's backward pass and the sums of G")
