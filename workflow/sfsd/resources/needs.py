"""Each stage's peak memory and disk, as pure functions of a model's shapes, the settings and a machine.

One formula per stage (`collect`, `eigen`, `factor_cache`, `compress`, `gpu_stage`, `prepare`; the loss
allocation's stages in `loss_needs`, from the terms defined here), each giving a `StageNeed` for one mode:
the peak bytes on the fullest GPU (`device_bytes`), in host memory (`host_bytes`) and written to disk
(`disk_bytes` per job, `disk_total` for all of the stage's jobs).
`plan_stage` tries a stage's modes in the order the code prefers them and returns the first that fits the
machine; when none does, the best one with `fix` naming the setting that would make it fit (found by
running the same formula again with that setting changed).

Every number is a prediction from shapes, not a measurement; what a formula leaves out is said in its
docstring. Terms every stage has: `PROCESS_BYTES` of host memory for the interpreter and its libraries
(`LINALG_PROCESS_BYTES` for the two that run no forward pass; `CUDA_HOST_BYTES` more where it runs on a
GPU), and `CUDA_CONTEXT_BYTES` on each GPU it uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from sfsd.io import MAX_SHARD_BYTES
from sfsd.model.placement import gpus_needed
from sfsd.model.stream import HIDDEN_SHARE

PROCESS_BYTES = 0.85e9  # the interpreter with torch, transformers and lm-eval imported (0.23-0.36 GB resident with
#                         torch's CPU build, measured) and what the formulas leave out (allocator, transient copies:
#                         up to 0.56 GB measured, docs/benchmarks.md#paper-scale)
LINALG_PROCESS_BYTES = 0.6e9  # the same for a stage that runs no forward pass, only linear algebra on the
#                               tensors its formula names (eigendecompose, compress_model): the interpreter with
#                               torch and transformers' model classes (0.38 GB measured) and at most 0.07 GB
#                               measured beyond the named tensors (docs/configuration.md#will-it-fit)
CUDA_CONTEXT_BYTES = 0.5e9  # CUDA context and kernels on each GPU a job uses (not measured on a GPU)
CUDA_HOST_BYTES = 0.75e9  # host memory a process adds when it initialises CUDA (not measured on a GPU)
FLUSH_BAND_BYTES = 32 * 2**20  # stage 1 adds S^T into a float64 total in bands of rows of this size (stats.flush)
STAGING_SHARE = 0.5  # collection.staging auto: device when every block's staging takes at most this of the
#                      device memory left beside the weights (sfsd/features/stats.py choose_staging)
TASK_TOKENS = 512  # context of one multiple-choice document (an assumption: most BoolQ passages, the
#                    longest of the six tasks, are shorter)
CHOICE_TOKENS = 128  # positions per document whose logits the native scorer computes (its choices' tokens)
MAX_GPUS = 8  # GPUs of one node, the most a fix suggests
FULL_FRACTION = 0.5  # gradients.full auto: the whole G when its sums take at most this part of the host memory
#                      free beside the model (`full_fits`, the rule sfsd/features/gradients.py runs by)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAVE_DTYPE_BYTES = {**DTYPE_BYTES, "float64": 8}  # eigen.save_dtype may also keep float64


@dataclass(frozen=True)
class ModelSize:
    """What the formulas read of a model: its shapes, and how its checkpoint is stored.

    `linears`: (name, out, in) of each decomposed Linear of a block; `groups`: (input group, width) of
    their distinct inputs; `embed_params`: the parameters a streamed pass loads besides its block (input
    embedding, final norm, and the lm_head when it is tied); `head_params`: an untied lm_head's;
    `shard_bytes`: the weight shards a compressed folder is written in (`io.shard_bytes_of`: the
    checkpoint's largest file, at most `io.MAX_SHARD_BYTES`)."""

    n_blocks: int
    hidden: int
    heads: int
    kv_width: int
    mlp: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]
    groups: tuple[tuple[str, int], ...]
    block_params: int
    embed_params: int
    head_params: int
    stored_bytes: int
    shard_bytes: int = MAX_SHARD_BYTES

    @property
    def total_params(self) -> int:
        return self.n_blocks * self.block_params + self.embed_params + self.head_params



def llama_like(params_b: float, stored_itemsize: int = 2) -> ModelSize:
    """A Llama-shaped stand-in for a model known only by its parameter count (a hub model not downloaded
    yet): 32 blocks of width d (multiple of 128), MLP 2.6875 d, full attention, a 32000-token vocabulary
    and an untied lm_head, d solved from 32 (4 d^2 + 3 x 2.6875 d^2) + 2 x 32000 d = params. An estimate:
    the real shapes replace it once the model is on disk."""
    a, b = 32 * (4 + 3 * 2.6875), 2 * 32000
    d = max(128, round((-b + math.sqrt(b * b + 4 * a * params_b * 1e9)) / (2 * a) / 128) * 128)
    mlp = round(2.6875 * d / 128) * 128
    linears = (("q_proj", d, d), ("k_proj", d, d), ("v_proj", d, d), ("o_proj", d, d),
               ("gate_proj", mlp, d), ("up_proj", mlp, d), ("down_proj", d, mlp))
    block = 4 * d * d + 3 * d * mlp + 2 * d
    size = ModelSize(32, d, max(1, d // 128), d, mlp, 32000, linears,
                     (("attn_in", d), ("attn_out", d), ("mlp_in", d), ("mlp_out", mlp)), block, 32000 * d + d,
                     32000 * d, 0)
    return replace(size, stored_bytes=size.total_params * stored_itemsize)

@dataclass(frozen=True)
class Settings:
    """The settings the formulas read (bytes per element of each dtype; `compressed`: the fraction of the
    parameters each written budget variant's folder keeps; `searched`: the searched folders written;
    `eval_context`: tokens per scored sequence)."""

    itemsize: int = 4  # the model's run dtype (factor cache, compression, evaluation, search, LASER, speed)
    collect_itemsize: int = 4
    gpu: bool = True  # the GPU stages run on a GPU (device is not cpu and one is present)
    fixed_device: bool = False  # device cuda or cuda:N: one GPU per job, never spread
    streamed: str = "auto"
    staging: str = "auto"
    samples: int = 128
    seq_len: int = 128
    collect_batch: int = 8
    eigen_itemsize: int = 4
    eigen_threads: int = 1
    methods: tuple[str, ...] = ("feature",)
    factor_itemsize: int = 4  # factors are cached in float32
    compressed: tuple[float, ...] = ()
    searched: int = 0
    eval_batch: int = 8
    eval_context: int = TASK_TOKENS
    ppl_window: int = 128  # perplexity's window (0: no perplexity), logits at each of its positions
    grad_itemsize: int = 4  # gradients.dtype (auto: float32 first)
    grad_fallback: str | None = None  # gradients.dtype auto: the checkpoint's half dtype, tried where float32 does not fit
    grad_batch: int = 4
    grad_full: str = "auto"  # gradients.full: auto, true or false
    search_batch: int = 8
    search_cache_bytes: float = 4096e6
    laser_batch: int = 16
    speed_batch: int = 8
    speed_tokens: tuple[int, int] = (128, 32)  # prompt, decoded


@dataclass(frozen=True)
class Machine:
    """Memory of one GPU (None: the stages run on the CPU), the GPUs a job may use, host memory and the
    free disk of results/ (None: not checked), in bytes."""

    gpu_bytes: float | None
    gpus: int
    host_bytes: float
    disk_bytes: float | None = None


@dataclass(frozen=True)
class StageNeed:
    """A stage's predicted peak in one mode: bytes on the fullest GPU and in host memory, bytes written by
    one job and by all `jobs`, GPUs and threads per job; `why` names the terms, `fix` (None: it fits) the
    setting that would make it fit."""

    stage: str
    mode: str
    device_bytes: float
    host_bytes: float
    disk_bytes: float
    disk_total: float
    gpus: int = 0
    threads: int = 1
    jobs: int = 1
    why: str = ""
    fix: str | None = None

    def fits(self, machine: Machine) -> bool:
        device_ok = self.gpus == 0 or (machine.gpu_bytes is not None and self.gpus <= machine.gpus
                                       and self.device_bytes <= machine.gpu_bytes)
        return device_ok and self.host_bytes <= machine.host_bytes


# ---- terms shared by the formulas -------------------------------------------------------------------------

def moments_bytes(size: ModelSize) -> int:
    """One block's statistics as stage 1 keeps and writes them: per input of width d, float64 x x^T, sum x
    and sum |x| (8 d^2 + 16 d)."""
    return sum(8 * d * d + 16 * d for _, d in size.groups)


def staging_bytes(size: ModelSize) -> int:
    """One block's float32 staging sums on the compute device: per input 4 d^2 + 16 d."""
    return sum(4 * d * d + 16 * d for _, d in size.groups)


def hidden_bytes(size: ModelSize, s: Settings) -> int:
    """The calibration tokens' hidden states between blocks (streamed stage 1): samples x seq_len x hidden."""
    return s.samples * s.seq_len * size.hidden * s.collect_itemsize


def forward_bytes(size: ModelSize, rows: int, ctx: int, itemsize: int) -> int:
    """One block's activations for `rows` sequences of `ctx` tokens: residual, norm, attention output and
    q/k/v (4 hidden + 2 kv wide), gate, up and their product (3 mlp), and the attention scores (rows x
    heads x ctx^2, as the eager and math kernels hold them; flash kernels hold none)."""
    width = 4 * size.hidden + 2 * size.kv_width + 3 * size.mlp
    return rows * ctx * width * itemsize + rows * size.heads * ctx * ctx * itemsize


def kv_cache_bytes(size: ModelSize, rows: int, ctx: int, itemsize: int) -> int:
    return 2 * rows * ctx * size.n_blocks * size.kv_width * itemsize


def logits_bytes(size: ModelSize, rows: int, positions: int) -> int:
    """float32 logits and their log-softmax at `positions` of `rows` sequences."""
    return 2 * rows * positions * size.vocab * 4


def gradient_sums_bytes(out_features: Iterable[int], full: bool, staged: bool = True) -> int:
    """The gradient stage's sums in host memory, over every targeted Linear l of output width d_l: the whole
    G as a float64 total, the float32 staging sum a CPU run adds each batch into (`staged`) and the float64
    sum of g, 12 d_l^2 + 8 d_l (8 d_l^2 + 8 d_l unstaged: a GPU run sends each batch's product to the host
    at once); its diagonal and the sum of g, 16 d_l."""
    return sum((12 if staged else 8) * d * d + 8 * d if full else 16 * d for d in out_features)


def full_fits(out_features: Iterable[int], free_bytes: float, fraction: float = FULL_FRACTION) -> bool:
    """`gradients.full: auto`, the one rule: the whole G when gradient_sums_bytes(out_features, full=True) <=
    fraction x free_bytes, the host memory free beside the loaded model (measured where the stage runs,
    predicted by `modes.gradients_full`)."""
    return gradient_sums_bytes(out_features, True) <= fraction * free_bytes


def eigen_file_bytes(out: int, inp: int, save_itemsize: int) -> int:
    """One Linear's entries of an eigen file: min(in, out) eigenvector columns at `eigen.save_dtype`,
    float64 eigenvalues and output mean."""
    return out * min(out, inp) * save_itemsize + 16 * out


def eigh_work_bytes(out: int, inp: int) -> int:
    """float64 working set of one Linear's eigendecomposition (sfsd/features/stats.py output_eigen): out x out
    covariance, its eigenvectors and LAPACK's workspace (4 out^2); a widening Linear (out > in) takes the
    thin SVD of W L instead (W L, its copy and U: 3 out x in; V^T: in^2). Leaves out: a widening Linear
    whose input covariance is not positive definite, which takes the out x out path."""
    return 8 * 4 * out * out if out <= inp else 8 * (3 * out * inp + inp * inp)


def svd_work_bytes(out: int, inp: int) -> int:
    """float64 working set of a thin SVD of an out x in matrix: the input and its copy, U, V^T and S."""
    m = min(out, inp)
    return 8 * (2 * out * inp + m * (out + inp) + m)


def factors_block_bytes(size: ModelSize, itemsize: int) -> int:
    """One block of a factor cache: per Linear both factors at rank kappa - 1 (kappa = in out / (in + out)),
    the float64 gains of each rank, and output mean and bias."""
    total = 0
    for _, out, inp in size.linears:
        top = max(1, out * inp // (out + inp) - 1)
        total += top * (out + inp) * itemsize + 8 * top + 2 * out * itemsize
    return total


def process_bytes(gpu: bool) -> float:
    """Host memory of a stage's process before it holds any data: `PROCESS_BYTES`, and `CUDA_HOST_BYTES` more
    where it runs on a GPU."""
    return PROCESS_BYTES + (CUDA_HOST_BYTES if gpu else 0)


def loading_bytes(size: ModelSize, itemsize: int, gpu: bool) -> float:
    """Host memory while the whole model loads at `itemsize`: for a CPU run at the dtype it is stored in, the
    tensors are the checkpoint's mapped pages (transformers maps safetensors without a copy: 4.0 GB of
    bfloat16 weights scored on the CPU peak at 4.6 GB resident), so one copy; otherwise the converted
    weights beside the pages they are read from."""
    weights = size.total_params * itemsize
    return weights if not gpu and mapped(size, itemsize) else weights + stored_bytes(size, size.total_params)


def mapped(size: ModelSize, itemsize: int) -> bool:
    """Whether the checkpoint stores the weights at `itemsize` bytes each (loaded at that size, they are its
    pages)."""
    return size.total_params > 0 and round(size.stored_bytes / size.total_params) == itemsize


def stored_bytes(size: ModelSize, params: int) -> float:
    """The checkpoint's bytes of `params` parameters: the file pages mapped while they are read (safetensors
    maps the file; the pages count as resident until it is closed)."""
    return params * size.stored_bytes / max(size.total_params, 1)


def compressed_params(size: ModelSize, fraction: float) -> int:
    return int(math.ceil(fraction * size.total_params))


def _gib(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


# ---- the stages -------------------------------------------------------------------------------------------

def prepare(size: ModelSize, s: Settings, source: str) -> StageNeed:
    """prepare_model: a hub download writes the checkpoint as stored; the embedded model is dequantized to
    float32, the GGUF-loaded model and its rebuilt copy both in host memory. Leaves out: the download cache."""
    if source == "embedded":
        host, disk = PROCESS_BYTES + 2 * 4 * size.total_params, 4 * size.total_params
    else:
        host, disk = PROCESS_BYTES, size.stored_bytes
    return StageNeed("prepare_model", source, 0, host, disk, disk, why="checkpoint written")


def collect(size: ModelSize, s: Settings, m: Machine, streamed: bool, staging: str) -> StageNeed:
    """collect_features (stage 1), whole model or one block at a time (`streamed`), the float32 staging sums
    of every block kept on the device (`staging` device) or only one input's at a time (host).

    Whole: the weights at the collection dtype, the staging sums and one batch's activations on the device;
    the float64 totals of every block in host memory (the model and its checkpoint's pages pass through
    host memory while it loads, before the totals exist). Streamed: the embedding, one block's weights,
    staging and the hidden states up to a quarter of the device (then a quarter of the host, then
    temporary files) on the device; one block's totals and its weights as read on the host. On the CPU all of it is host memory. Writes the
    float64 statistics of every block. Each batch's staging sum of the widest input is added into its total
    through a float64 copy on the host (8 d^2 and a band of `FLUSH_BAND_BYTES`, with its float32 copy from a
    GPU: 12 d^2; `stats.InputMoments.flush`). Leaves out: the per-block mask and position tables a streamed pass records, and the tokens
    (samples x seq_len int64)."""
    ci = s.collect_itemsize
    act = forward_bytes(size, s.collect_batch, s.seq_len, ci) + 8 * s.collect_batch * s.seq_len * max(
        d for _, d in size.groups)  # the hook's float32 copy and its real tokens
    one_input = max(4 * d * d + 16 * d for _, d in size.groups)
    widest = max(d for _, d in size.groups)
    flush = (12 if s.gpu and m.gpu_bytes is not None else 8) * widest * widest + FLUSH_BAND_BYTES
    totals = moments_bytes(size)
    weights, block, outside = size.total_params * ci, size.block_params * ci, size.embed_params * ci
    gpu = s.gpu and m.gpu_bytes is not None
    ctx = CUDA_CONTEXT_BYTES if gpu else 0
    scratch = 0.0
    if streamed:
        staged = staging_bytes(size) if staging == "device" else one_input
        hidden = hidden_bytes(size, s)
        if gpu:
            on_device = min(hidden, HIDDEN_SHARE * max(m.gpu_bytes - outside - ctx, 0))
            on_host = min(hidden - on_device, HIDDEN_SHARE * m.host_bytes)
            device = outside + block + staged + act + ctx + on_device
            host = process_bytes(gpu) + totals + flush + block + stored_bytes(size, size.block_params) + on_host
        else:
            on_host = min(hidden, HIDDEN_SHARE * m.host_bytes)
            device = 0
            host = (PROCESS_BYTES + outside + block + stored_bytes(size, size.block_params) + staged + totals + flush
                    + act + on_host)
        scratch = hidden - on_host - (on_device if gpu else 0)
        why = "one block, its statistics and the calibration hidden states"
    else:
        staged = size.n_blocks * staging_bytes(size) if staging == "device" else one_input
        loading = loading_bytes(size, ci, gpu)  # the model and its checkpoint's pages
        if gpu:
            device = weights + staged + act + ctx
            host = process_bytes(gpu) + max(loading, size.n_blocks * totals + flush)
        else:
            device = 0
            host = PROCESS_BYTES + max(loading, weights + staged + size.n_blocks * totals + flush + act)
        why = "weights, staging of every block" if staging == "device" else "weights, float64 totals on the host"
    disk = size.n_blocks * totals + scratch
    mode = f"{'streamed' if streamed else 'whole'}, staging {staging}"
    return StageNeed("collect_features", mode, device, host, disk, disk, gpus=int(gpu), threads=2, why=why)


def eigen(size: ModelSize, s: Settings) -> StageNeed:
    """eigendecompose, one job per block on the CPU: the block's float64 statistics, each input's covariance
    and Cholesky factor (kept for the Linears that share it), the decomposed Linears' weights as stored, the largest
    Linear's eigendecomposition working set and the eigen entries gathered for the file. Writes the block's
    eigen file (min(in, out) eigenvector columns)."""
    covariances = sum(2 * 8 * d * d for _, d in size.groups)
    # the decomposed Linears' weights, read from the checkpoint's pages into tensors
    weights = 2 * stored_bytes(size, sum(o * i for _, o, i in size.linears))
    work = max(eigh_work_bytes(o, i) for _, o, i in size.linears)
    files = sum(eigen_file_bytes(o, i, s.eigen_itemsize) for _, o, i in size.linears)
    host = LINALG_PROCESS_BYTES + moments_bytes(size) + covariances + weights + work + files
    return StageNeed("eigendecompose", "per block", 0, host, files, size.n_blocks * files, threads=s.eigen_threads,
                     jobs=size.n_blocks, why="one block's statistics, covariances and eigh")


def _method_work(size: ModelSize, method: str, s: Settings) -> tuple[float, float]:
    """(statistics of one block a factor method reads, float64 working set of its largest Linear)."""
    if method == "feature":
        stats = sum(eigen_file_bytes(o, i, s.eigen_itemsize) for _, o, i in size.linears)
        work = max(8 * (o * i + o * min(o, i) + min(o, i) * i) for _, o, i in size.linears)
    else:  # weight reads the statistics for its spectra only; asvd and whitened for the factors
        stats = moments_bytes(size)
        extra = {"whitened": lambda i: 16 * i * i}.get(method, lambda i: 0)
        work = max(svd_work_bytes(o, i) + extra(i) for _, o, i in size.linears)
    return stats, work


def factor_cache(size: ModelSize, s: Settings, streamed: bool, method: str) -> StageNeed:
    """factor_cache of one method on the CPU: the whole model (at the stored dtype the checkpoint's mapped
    pages, of which only the decomposed Linears' are read and so resident; converted, beside the pages while
    it loads: `loading_bytes`) or the modules outside the blocks
    and one block (streamed, beside the block's pages while it is read), one block's statistics, the
    largest Linear's float64 working set and the block's factors until they are written. Writes every
    block's factors (float32)."""
    stats, work = _method_work(size, method, s)
    block = factors_block_bytes(size, s.factor_itemsize)
    if streamed:  # a block's tensors are copied from the checkpoint's pages
        weights = (size.embed_params + size.head_params + size.block_params) * s.itemsize
        host = PROCESS_BYTES + weights + max(stored_bytes(size, size.block_params), stats + work + block)
    elif mapped(size, s.itemsize):  # the weights are the checkpoint's pages; only the decomposed Linears' are read
        read = stored_bytes(size, size.n_blocks * sum(o * i for _, o, i in size.linears))
        host = PROCESS_BYTES + read + stats + work + block
    else:
        weights = size.total_params * s.itemsize
        host = PROCESS_BYTES + max(loading_bytes(size, s.itemsize, False), weights + stats + work + block)
    disk = size.n_blocks * block
    return StageNeed("factor_cache", f"{'streamed' if streamed else 'whole'}, {method}", 0, host, disk, disk,
                     why="weights, one block's factors")


def compress(size: ModelSize, s: Settings, streamed: bool, searched: bool = False) -> StageNeed:
    """compress_model (the budget variants' folders, `Settings.compressed`) or, with `searched`,
    compress_searched (`Settings.searched` folders, each sized at every parameter: a searched plan keeps
    an unknown share, up to all): one job per folder, on the CPU, sized for the largest folder. Streamed,
    the modules outside the blocks and one block (beside the block's pages while it is read), one
    factor-cache block and the block cut from it, and the weight shard being filled (at most 5 GiB).
    Whole, at the stored dtype (the weights are the checkpoint's mapped pages, of which only those the
    folder keeps are read): the compressed model as it is built, one factor-cache block and the shard being
    filled; converted, the whole model beside the pages it loads from, with the same work. Writes the folder
    at the run dtype; the disk of every folder of the stage is summed in `disk_total`."""
    folders = (1.0,) * s.searched if searched else s.compressed
    written = compressed_params(size, max(folders, default=1.0)) * s.itemsize
    shard = min(size.shard_bytes, written)
    cache_block = factors_block_bytes(size, s.factor_itemsize)
    work = cache_block + size.block_params * s.itemsize + shard  # a factor-cache block, the block cut, the shard
    if streamed:  # a block's tensors are copied from the checkpoint's pages
        weights = (size.embed_params + size.head_params + 2 * size.block_params) * s.itemsize
        host = LINALG_PROCESS_BYTES + weights + max(stored_bytes(size, size.block_params), work)
    elif mapped(size, s.itemsize):  # kept weights stay their pages; each cut Linear becomes its factors
        host = LINALG_PROCESS_BYTES + written + cache_block + shard
    else:
        host = LINALG_PROCESS_BYTES + max(loading_bytes(size, s.itemsize, False), size.total_params * s.itemsize + work)
    total = sum(compressed_params(size, f) * s.itemsize for f in folders)
    return StageNeed("compress_searched" if searched else "compress_model", "streamed" if streamed else "whole", 0,
                     host, written, total, jobs=len(folders), why="weights, one shard")


GPU_STAGES = ("evaluate_model", "check_scorer", "search", "laser_point", "inference_speed")


def gpu_stage(size: ModelSize, s: Settings, m: Machine, stage: str, jobs: int = 1) -> StageNeed:
    """A stage that loads the whole model at the run dtype (on the host first) and runs it: the weights
    spread over as many GPUs as hold them at 80% each (device auto, `placement.gpus_needed`; one with a
    fixed cuda device), and on the
    fullest GPU the activations of one batch, the KV cache, the logits and the stage's own extra:

    - evaluate_model: evaluation.batch_size sequences of `eval_context` tokens, logits at every position of
      a perplexity window, or at the choices' tokens (`CHOICE_TOKENS`);
    - check_scorer: the same batch through lm-eval, which computes the logits at every position;
    - search: search.batch_size sequences, logits as evaluate_model's, and the block-input cache
      (search.cache_max_mb);
    - laser_point: laser.batch_size sequences, logits at the choices' tokens, and the float64 SVD of the
      largest Linear;
    - inference_speed: the largest speed.batch_sizes with the KV cache of prompt + decoded tokens, logits at
      the last position only.

    In host memory the weights and the checkpoint's pages, which it loads from (on the CPU at the stored
    dtype the weights are those pages: `loading_bytes`). Planned for the dense model
    (a compressed variant holds fewer weights). Leaves out: lm-eval's request tables and the documents on
    the host."""
    it = s.itemsize
    rows, ctx, positions, extra = s.eval_batch, s.eval_context, max(s.ppl_window, CHOICE_TOKENS), 0.0
    if stage == "check_scorer":
        positions = ctx
    elif stage == "search":
        rows, extra = s.search_batch, s.search_cache_bytes
    elif stage == "laser_point":
        rows, positions = s.laser_batch, CHOICE_TOKENS
        extra = max(svd_work_bytes(o, i) for _, o, i in size.linears)
    elif stage == "inference_speed":
        rows, ctx, positions = s.speed_batch, sum(s.speed_tokens), 1
    act = forward_bytes(size, rows, ctx, it) + kv_cache_bytes(size, rows, ctx, it) + logits_bytes(size, rows, positions)
    weights = size.total_params * it
    if not (s.gpu and m.gpu_bytes is not None):
        # the weights, and beside them the checkpoint's pages while it loads (none where they are its pages)
        pages = loading_bytes(size, it, False) - weights
        return StageNeed(stage, "cpu", 0, PROCESS_BYTES + weights + max(pages, act + extra), 0, 0, jobs=jobs,
                         why="weights and activations in host memory")
    gpus = 1 if s.fixed_device else gpus_needed(weights, m.gpu_bytes)
    device = weights / gpus + act + extra + CUDA_CONTEXT_BYTES
    host = process_bytes(True) + loading_bytes(size, it, True)  # the model passes through host memory as it loads
    return StageNeed(stage, f"{gpus} GPU{'s' if gpus > 1 else ''}", device, host, 0, 0,
                     gpus=gpus, jobs=jobs, why="weights, one batch's activations and logits")
