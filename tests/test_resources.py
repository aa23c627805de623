"""The resource planner (sfsd/resources): each formula's bytes on a hand-made two-block model, the choice of
mode and the fix, the shapes read from safetensors headers alone (a Llama-3-8B folder without weights), the
`plan-resources` table, the config check's one-line refusals, and `streamed: auto` decided by the planner."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from helpers import REPO, run_cli
from sfsd.config import check_config, validate
from sfsd.errors import ConfigError
from sfsd.features.stats import STAGING_SHARE as FEATURES_STAGING_SHARE, choose_staging
from sfsd.io import safetensors_header
from sfsd.model.shapes import model_shapes
from sfsd.resources.decide import decide_streamed
from sfsd.features.gradients import resolve_full
from sfsd.resources.loss_needs import (backward_bytes, curve_work_bytes, gradient_file_bytes, gradients,
                                       loss_file_bytes, loss_spectra)
from sfsd.resources.modes import candidates, every_mode, gradients_full, plan_stage, staging_on_device
from sfsd.io import MAX_SHARD_BYTES, shard_bytes_of
from sfsd.resources.needs import (
    CHOICE_TOKENS,
    CUDA_CONTEXT_BYTES as CTX,
    PROCESS_BYTES as PROC,
    LINALG_PROCESS_BYTES as LINALG,
    CUDA_HOST_BYTES,
    FLUSH_BAND_BYTES as BAND,
    STAGING_SHARE,
    Machine,
    ModelSize,
    Settings,
    collect,
    compress,
    eigen,
    eigen_file_bytes,
    eigh_work_bytes,
    factor_cache,
    factors_block_bytes,
    forward_bytes,
    gpu_stage,
    gradient_sums_bytes,
    hidden_bytes,
    kv_cache_bytes,
    llama_like,
    logits_bytes,
    moments_bytes,
    prepare,
    staging_bytes,
    svd_work_bytes,
)

GPU_PROC = PROC + CUDA_HOST_BYTES  # a process that runs on a GPU
from sfsd.resources.plan import check_fit, job_needs, plan_config, plan_rows, variants
from sfsd.resources.read import model_size, read_header, tokens_shape, write_shapes_only

GB = 1e9
LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Two blocks: hidden 8, 2 heads, k/v width 4, MLP 16, vocab 32; a block holds 576 Linear weights and two
# norms of 8 (592), the embedding and final norm 264, an untied lm_head 256: 1704 parameters, stored in bfloat16.
TINY = ModelSize(
    n_blocks=2, hidden=8, heads=2, kv_width=4, mlp=16, vocab=32,
    linears=(("q_proj", 8, 8), ("k_proj", 4, 8), ("v_proj", 4, 8), ("o_proj", 8, 8), ("gate_proj", 16, 8),
             ("up_proj", 16, 8), ("down_proj", 8, 16)),
    groups=(("attn_in", 8), ("attn_out", 8), ("mlp_in", 8), ("mlp_out", 16)),
    block_params=592, embed_params=264, head_params=256, stored_bytes=2 * 1704)
SETTINGS = Settings(itemsize=4, collect_itemsize=4, samples=4, seq_len=3, collect_batch=2, eigen_itemsize=4,
                    methods=("feature",), compressed=(0.5,), eval_batch=2, eval_context=5, ppl_window=0,
                    grad_batch=2, grad_full="true")
BIG = Machine(gpu_bytes=1e9, gpus=1, host_bytes=1e12)

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_the_terms_on_hand_made_shapes():
    assert TINY.total_params == 2 * 592 + 264 + 256 == 1704
    assert moments_bytes(TINY) == 3 * (8 * 64 + 16 * 8) + (8 * 256 + 16 * 16) == 4224
    assert staging_bytes(TINY) == 3 * (4 * 64 + 16 * 8) + (4 * 256 + 16 * 16) == 2432
    assert hidden_bytes(TINY, SETTINGS) == 4 * 3 * 8 * 4 == 384
    # 2 rows x 3 tokens x (4 x 8 + 2 x 4 + 3 x 16) x 4 bytes, and 2 rows x 2 heads x 3^2 scores x 4 bytes
    assert forward_bytes(TINY, 2, 3, 4) == 2 * 3 * 88 * 4 + 2 * 2 * 9 * 4 == 2256
    assert kv_cache_bytes(TINY, 2, 3, 4) == 2 * 2 * 3 * 2 * 4 * 4 == 384
    assert logits_bytes(TINY, 2, 5) == 2 * 2 * 5 * 32 * 4 == 2560
    assert eigen_file_bytes(16, 8, 4) == 16 * 8 * 4 + 16 * 16 == 768  # min(in, out) = 8 columns
    assert eigh_work_bytes(8, 16) == 8 * 4 * 64 and eigh_work_bytes(16, 8) == 8 * (3 * 128 + 64)
    assert svd_work_bytes(16, 8) == 8 * (2 * 128 + 8 * 24 + 8) == 3648
    # kappa - 1 per Linear: q, o 3; k, v 1; gate, up, down 4; factors, float64 gains, mean and bias
    assert factors_block_bytes(TINY, 4) == 2 * (3 * 16 * 4 + 24 + 64) + 2 * (12 * 4 + 8 + 32) + 2 * (
        4 * 24 * 4 + 32 + 128) + (4 * 24 * 4 + 32 + 64) == 2304


def test_stage_one_in_each_mode():
    act = 2256 + 8 * 2 * 3 * 16  # one batch through a block, and the hook's float32 copy of the widest input
    weights, block, outside = 1704 * 4, 592 * 4, 264 * 4
    whole = collect(TINY, SETTINGS, BIG, streamed=False, staging="device")
    assert whole.device_bytes == weights + 2 * 2432 + act + CTX
    # loading: the weights and the checkpoint's bfloat16 pages (2 x 1704); then the float64 totals of both blocks
    # and a batch's flush of the widest (16-wide) input: its float32 copy from the GPU and a float64 one
    assert whole.host_bytes == GPU_PROC + max(weights + 2 * 1704, 2 * 4224 + 12 * 256 + BAND) == GPU_PROC + 11520 + BAND
    assert whole.disk_bytes == 2 * 4224 and whole.gpus == 1
    host_staged = collect(TINY, SETTINGS, BIG, streamed=False, staging="host")
    assert host_staged.device_bytes == weights + (4 * 256 + 16 * 16) + act + CTX  # one input's buffers
    streamed = collect(TINY, SETTINGS, BIG, streamed=True, staging="device")
    assert streamed.device_bytes == outside + block + 2432 + act + CTX + 384  # hidden states on the GPU
    # one block's totals and flush, the block and its pages
    assert streamed.host_bytes == GPU_PROC + 4224 + 12 * 256 + BAND + block + 592 * 2
    # a GPU with 400 bytes to spare keeps a quarter of it (100) of the 384 bytes of hidden states; the host
    # keeps a quarter of its 1000 (250); the last 34 go to temporary files
    small = Machine(gpu_bytes=outside + CTX + 400, gpus=1, host_bytes=1000)
    spilled = collect(TINY, SETTINGS, small, streamed=True, staging="device")
    assert spilled.device_bytes == outside + block + 2432 + act + CTX + 100
    assert spilled.host_bytes == GPU_PROC + 4224 + 12 * 256 + BAND + block + 592 * 2 + 250
    assert spilled.disk_bytes == 2 * 4224 + 34
    on_cpu = collect(TINY, replace(SETTINGS, gpu=False), BIG, streamed=False, staging="device")
    assert (on_cpu.device_bytes, on_cpu.gpus) == (0, 0)
    assert on_cpu.host_bytes == PROC + max(weights + 2 * 1704, weights + 2 * 2432 + 2 * 4224 + 8 * 256 + BAND + act)


def test_the_other_stages():
    files = 2 * (8 * 8 * 4 + 128) + 2 * (4 * 4 * 4 + 64) + 2 * 768 + (8 * 8 * 4 + 128)
    e = eigen(TINY, SETTINGS)
    assert e.disk_bytes == files == 2944 and e.disk_total == 2 * 2944 and e.jobs == 2
    # statistics, covariance and Cholesky factor of each input, the block's bfloat16 weights (its pages and
    # the tensors read from them), gate's SVD: down's eigh (8 x 4 x 8^2 = 2048) is below gate's thin SVD
    # (8 x (3 x 128 + 64) = 3584)
    # the decomposed Linears' 576 weights read from their bfloat16 pages
    assert e.host_bytes == LINALG + 4224 + (3 * 16 * 64 + 16 * 256) + 2 * 576 * 2 + 8 * (3 * 128 + 64) + files
    feature = factor_cache(TINY, SETTINGS, streamed=False, method="feature")
    # the weights, and the larger of the checkpoint's pages while they load (3408) and one block's work
    assert feature.host_bytes == PROC + 1704 * 4 + max(2 * 1704, 2944 + 8 * (128 + 128 + 64) + 2304)
    assert feature.disk_bytes == feature.disk_total == 2 * 2304
    streamed = factor_cache(TINY, SETTINGS, streamed=True, method="whitened")
    # the modules outside the blocks and one block; the input statistics; down's SVD and Cholesky factor
    assert streamed.host_bytes == PROC + (264 + 256 + 592) * 4 + 4224 + (3648 + 16 * 256) + 2304
    c = compress(TINY, SETTINGS, streamed=False)
    # converted from bfloat16: the float32 weights (above their pages), a factor-cache block, a block, the shard
    assert c.disk_bytes == 852 * 4 and c.host_bytes == LINALG + 1704 * 4 + 2304 + 592 * 4 + 852 * 4
    # at the dtype it is stored in, the whole model is the checkpoint's mapped pages: counted once
    stored = replace(SETTINGS, itemsize=2)
    assert (factor_cache(TINY, stored, streamed=False, method="feature").host_bytes  # the 2 x 576 read
            == PROC + 2 * 576 * 2 + 2944 + 8 * (128 + 128 + 64) + 2304)
    # at the stored dtype only the pages the folder keeps are read: the compressed model (852 parameters) as
    # built, a factor-cache block and the shard (the whole folder here)
    assert compress(TINY, stored, streamed=False).host_bytes == LINALG + 852 * 2 + 2304 + 852 * 2
    assert prepare(TINY, SETTINGS, "hub").disk_bytes == 3408
    assert prepare(TINY, SETTINGS, "embedded").host_bytes == PROC + 2 * 4 * 1704
    ev = gpu_stage(TINY, SETTINGS, BIG, "evaluate_model")
    act = forward_bytes(TINY, 2, 5, 4) + kv_cache_bytes(TINY, 2, 5, 4)
    assert ev.device_bytes == 1704 * 4 + act + logits_bytes(TINY, 2, CHOICE_TOKENS) + CTX
    assert (ev.gpus, ev.host_bytes) == (1, GPU_PROC + 1704 * 4 + 1704 * 2)  # loaded on the host from its pages
    # on the CPU at the dtype it is stored in (bfloat16), the weights are the checkpoint's mapped pages: one copy
    cpu = replace(SETTINGS, gpu=False)
    act16 = forward_bytes(TINY, 2, 5, 2) + kv_cache_bytes(TINY, 2, 5, 2) + logits_bytes(TINY, 2, CHOICE_TOKENS)
    assert gpu_stage(TINY, replace(cpu, itemsize=2), BIG, "evaluate_model").host_bytes == PROC + 1704 * 2 + act16
    # at float32 the converted copy sits beside the pages while they are read
    act32 = act + logits_bytes(TINY, 2, CHOICE_TOKENS)
    assert gpu_stage(TINY, cpu, BIG, "evaluate_model").host_bytes == PROC + 1704 * 4 + max(1704 * 2, act32)
    check = gpu_stage(TINY, SETTINGS, BIG, "check_scorer")  # lm-eval: logits at every position
    assert check.device_bytes == 1704 * 4 + act + logits_bytes(TINY, 2, 5) + CTX
    search = gpu_stage(TINY, replace(SETTINGS, search_batch=2, search_cache_bytes=1000), BIG, "search")
    assert search.device_bytes == ev.device_bytes + 1000
    # device auto spreads weights of 3 GB over the GPUs that hold them at 80% each: 2 of 2 GB
    two = gpu_stage(TINY, replace(SETTINGS, itemsize=4), Machine(2e9, 2, 1e12), "evaluate_model")
    assert two.gpus == 1  # 6816 bytes fit one
    big = replace(TINY, block_params=int(3e9 / 4 / 2))
    spread = gpu_stage(big, SETTINGS, Machine(2e9, 2, 1e12), "evaluate_model")
    assert spread.gpus == 2 and spread.device_bytes == pytest.approx(big.total_params * 4 / 2 + act + logits_bytes(
        TINY, 2, CHOICE_TOKENS) + CTX)


def test_the_gradient_stage_on_hand_made_shapes():
    # one batch of 2 x 3 tokens through both blocks, held for the backward: per block and token 8 x 8 (norms'
    # float32 inputs) + 4 x (2 x 8 + max(8, 2 x 4) + 3 x 16) + 4 x 2 heads + 8 = 368, the scores 2 x 2 x 3^2 x 4;
    # outside: 32 x (4 + 16) logits and their float32 copies + 8 x 16 + 64; in flight 4 x (4 x 8 + 3 x 16) + 12 x 16
    assert backward_bytes(TINY, 2, 3, 4) == 2 * (6 * 368 + 144) + 6 * (832 + 512) == 12768
    # sum over the 14 Linears of d^2 = 2 x 736 and of d = 2 x 64
    assert gradient_sums_bytes([o for _, o, _ in TINY.linears] * 2, True) == 2 * (12 * 736 + 8 * 64) == 18688
    weights, loading, files = 1704 * 4, 1704 * 4 + 1704 * 2, 8 * 736 + 8 * 64  # one block's file, full G
    full = gradients(TINY, SETTINGS, BIG, full=True)
    # the device: the weights, the pass and one float32 g^T g of the widest Linear (16 x 16)
    assert full.device_bytes == CTX + weights + 12768 + 4 * 256 and (full.gpus, full.threads) == (1, 2)
    # the host: the float64 totals and sums of g, one product copied over; one block's G and its serialised
    # copy, and the float64 temporaries of symmetrising the widest G
    assert full.host_bytes == GPU_PROC + max(loading, 2 * (8 * 736 + 8 * 64) + 4 * 256 + 2 * files + 16 * 256)
    assert full.disk_bytes == full.disk_total == 2 * files == 12800
    diagonal = gradients(TINY, SETTINGS, BIG, full=False)
    assert diagonal.disk_bytes == 2 * 16 * 64 and diagonal.host_bytes == GPU_PROC + loading
    # at least the weights / placement.HEADROOM on the device: the stage refuses less free memory
    small_batch = gradients(replace(TINY, vocab=0), replace(SETTINGS, seq_len=1, grad_batch=1), BIG, full=False)
    assert small_batch.device_bytes == CTX + weights / 0.8
    on_cpu = gradients(TINY, replace(SETTINGS, gpu=False), BIG, full=True)
    assert (on_cpu.gpus, on_cpu.device_bytes) == (0, 0)
    assert on_cpu.host_bytes == PROC + weights + 18688 + max(12768, 2 * files + 16 * 256)  # float32 staging too
    # full auto counts the sums twice: the rule runs the full G only where they take half the free memory
    auto = gradients(TINY, replace(SETTINGS, gpu=False, grad_full="auto"), BIG, full=True)
    assert auto.host_bytes == PROC + weights + 2 * 18688 + 2 * files + 16 * 256


def test_gradients_full_auto_is_the_stages_rule():
    """gradients.full auto: the planner's choice is the stage's own (resolve_full on the host memory free once
    the model is loaded, predicted as the host less the process and, on the CPU, the weights), and a job
    given the planned memory of the full G chooses it again."""
    outs = [o for _, o, _ in TINY.linears] * 2
    s = replace(SETTINGS, grad_full="auto", gpu=False)
    for free in (37_375, 37_376, 50_000):
        m = Machine(None, 0, PROC + 1704 * 4 + free)
        assert gradients_full(TINY, s, m) == resolve_full("auto", outs, free) == (free >= 37_376), free
        assert plan_stage("collect_gradients", TINY, s, m).mode == ("full G" if free >= 37_376 else "diagonal G")
    need = plan_stage("collect_gradients", TINY, s, Machine(None, 0, 1e12))
    assert need.mode == "full G" and resolve_full("auto", outs, need.host_bytes - PROC - 1704 * 4)
    assert gradients_full(TINY, replace(s, gpu=True), Machine(1e9, 1, PROC + 37_376))  # weights on the GPU
    assert not gradients_full(TINY, replace(s, grad_full="false"), BIG) and gradients_full(TINY, SETTINGS, BIG)
    assert [n.mode for n in every_mode("collect_gradients", TINY, s, BIG)] == ["full G", "diagonal G"]


def test_a_gradient_stage_that_fits_nowhere_names_the_fix():
    s = replace(SETTINGS, grad_full="auto")
    fits_bf16 = gradients(TINY, replace(s, grad_itemsize=2), BIG, full=True).device_bytes
    assert plan_stage("collect_gradients", TINY, s, replace(BIG, gpu_bytes=fits_bf16)).fix == (
        "gradients.dtype: bfloat16")
    on_cpu = replace(s, gpu=False, grad_full="true")
    full = gradients(TINY, on_cpu, BIG, full=True)
    assert plan_stage("collect_gradients", TINY, on_cpu, replace(BIG, host_bytes=full.host_bytes - 1)).fix == (
        "gradients.full: false")
    # the stage refuses streamed always (its backward pass is not streamed)
    assert plan_stage("collect_gradients", TINY, replace(s, streamed="always"), BIG).fix.startswith("streamed: auto")



def test_the_loss_criterion_stage_on_hand_made_shapes():
    # per Linear loss(r) at r = 0..kappa - 1 in float64: kappa 4 (q, o), 2 (k, v), 5 (gate, up, down)
    assert loss_file_bytes(TINY) == 8 * (4 + 2 + 2 + 4 + 5 + 5 + 5) == 216
    assert gradient_file_bytes(TINY, True) == 8 * 736 + 8 * 64 == 6400 and gradient_file_bytes(TINY, False) == 1024
    # down_proj (out 8, in 16, k = 4), feature space at in + 1 = 17 (bias_compensation none's row of ones):
    # W, first, second in float64 8 x (136 + 68 + 32), G W C 8 x 136, the largest product 8 x 136; beside them
    # E[x x^T] / count and the covariance 16 x 17^2 (the third 17^2 while it is formed is less) and the mean
    assert curve_work_bytes(8, 16, "feature") == 16 * 289 + 8 * (136 + 68 + 32) + 2 * 8 * 136 + 8 * 17 == 8824
    # weight space reads E[x x^T] / count alone, at in = 16
    assert curve_work_bytes(8, 16, "weight") == 8 * 256 + 8 * (128 + 64 + 32) + 2 * 8 * 128 + 8 * 16 == 6016
    assert max(curve_work_bytes(o, i, "feature") for _, o, i in TINY.linears) == 8824  # down_proj's is the largest
    # the embedding and lm_head (520) and one block (592) at the stored 2 bytes, then one block's factors (2304),
    # statistics (4224) and G (6400), each of their tensors read as its file's pages with 3 x 64 KiB around it
    # (5 a Linear, 3 an input), down_proj's working set and the curves
    mapped = 3 * 65536 * (5 * 7 + 3 * 4)
    feature = loss_spectra(TINY, SETTINGS, "feature", full=True)
    assert feature.host_bytes == PROC + 2 * 520 + 2 * 592 + (2304 + 4224 + 6400 + mapped) + 8824 + 216
    assert feature.disk_bytes == feature.disk_total == 2 * 216 and (feature.gpus, feature.device_bytes) == (0, 0)
    assert feature.mode == "feature, full G" and feature.jobs == 1
    diagonal = loss_spectra(TINY, SETTINGS, "weight", full=False)
    assert diagonal.host_bytes == PROC + 2 * 520 + 2 * 592 + (2304 + 4224 + 1024 + mapped) + 6016 + 216
    # the block as read beside its checkpoint pages, where that is more than its files and one Linear's curve
    heavy = replace(TINY, block_params=10**7, stored_bytes=2 * (2 * 10**7 + 520))
    assert loss_spectra(heavy, SETTINGS, "weight", full=False).host_bytes == PROC + 2 * 520 + 2 * 2 * 10**7


def test_the_loss_criterion_reads_the_g_the_gradient_stage_chose():
    s = replace(SETTINGS, grad_full="auto", gpu=False)
    full_free = Machine(None, 0, PROC + 1704 * 4 + 37_376)  # the gradient stage's full G just fits (see above)
    assert plan_stage("loss_spectra", TINY, s, full_free, method="whitened").mode == "whitened, full G"
    less = replace(full_free, host_bytes=full_free.host_bytes - 1)
    assert plan_stage("loss_spectra", TINY, s, less, method="whitened").mode == "whitened, diagonal G"
    assert [n.mode for n in every_mode("loss_spectra", TINY, s, BIG, method="asvd")] == [
        "asvd, full G", "asvd, diagonal G"]
    full = loss_spectra(TINY, SETTINGS, "feature", full=True)
    tight = replace(BIG, host_bytes=full.host_bytes - 1)
    assert plan_stage("loss_spectra", TINY, SETTINGS, tight, method="feature").fix == "gradients.full: false"
    assert plan_stage("loss_spectra", TINY, replace(SETTINGS, grad_full="false"), replace(BIG, host_bytes=100),
                      method="feature").fix.startswith("a machine with ")

def test_modes_follow_the_settings_and_the_first_that_fits_is_chosen():
    assert plan_stage("collect_features", TINY, SETTINGS, BIG).mode == "whole, staging device"
    # a GPU that holds one block but not the whole model: streamed
    tight = Machine(gpu_bytes=CTX + 12_000, gpus=1, host_bytes=1e12)
    assert plan_stage("collect_features", TINY, SETTINGS, tight).mode == "streamed, staging device"
    modes = [n.mode for n in candidates("collect_features", TINY, replace(SETTINGS, staging="host"), BIG)]
    assert modes == ["whole, staging host", "streamed, staging host"]
    assert [n.mode for n in candidates("collect_features", TINY, replace(SETTINGS, streamed="never"), BIG)] == [
        "whole, staging device", "whole, staging host"]
    # host memory that holds the streamed factor cache only
    s = replace(SETTINGS, streamed="auto")
    whole, streamed = candidates("factor_cache", TINY, s, BIG, method="feature")
    assert plan_stage("factor_cache", TINY, s, replace(BIG, host_bytes=streamed.host_bytes)).mode == "streamed, feature"
    assert plan_stage("factor_cache", TINY, s, replace(BIG, host_bytes=whole.host_bytes)).mode == "whole, feature"


def test_staging_auto_is_the_rule_of_stage_one():
    """The planner's staging auto is features/stats.py choose_staging on the memory left beside the weights."""
    assert STAGING_SHARE == FEATURES_STAGING_SHARE
    widths = [d for _, d in TINY.groups]
    for free in (9_000, 9_728, 9_729, 20_000):
        m = Machine(gpu_bytes=1704 * 4 + CTX + free, gpus=1, host_bytes=1e12)
        assert staging_on_device(TINY, SETTINGS, m) == (choose_staging(2, widths, free) == "device"), free


def test_a_stage_that_fits_nowhere_names_the_fix():
    never = replace(SETTINGS, streamed="never")
    tight = Machine(gpu_bytes=CTX + 10_000, gpus=1, host_bytes=1e12)  # streamed 9264 bytes, whole 11120 or more
    assert plan_stage("collect_features", TINY, never, tight).fix == "streamed: always"
    # evaluation whose logits overflow the GPU at batch 8 fits at batch 2
    s = replace(SETTINGS, eval_batch=8)
    fits_at_2 = gpu_stage(TINY, replace(s, eval_batch=2), BIG, "evaluate_model").device_bytes
    need = plan_stage("evaluate_model", TINY, s, replace(BIG, gpu_bytes=fits_at_2))
    assert need.fix == "evaluation.batch_size: 2"
    # weights too large for one GPU with a fixed cuda device: device auto over more GPUs
    big = replace(TINY, block_params=int(3e9 / 4 / 2))
    need = plan_stage("evaluate_model", big, replace(SETTINGS, fixed_device=True), Machine(2.5e9, 1, 1e12))
    assert need.fix == "device: auto on a node with 2 GPUs of 2.5 GB"
    # device auto already: more GPUs than the weights need at 80% each are never used (placement.gpus_needed)
    assert plan_stage("evaluate_model", big, SETTINGS, Machine(2e9, 8, 1e12)).fix.startswith("a machine with")
    # nothing helps an eigendecomposition but memory
    assert plan_stage("eigendecompose", TINY, SETTINGS, replace(BIG, host_bytes=100)).fix.startswith(
        "a machine with")


def test_llama_like_stand_in():
    size = llama_like(6.7)
    assert (size.hidden, size.mlp, size.n_blocks) == (4096, 11008, 32)  # LLaMA-7B's shapes
    assert size.total_params == pytest.approx(6.74e9, rel=1e-3) and size.stored_bytes == 2 * size.total_params


# ---- shapes from headers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory):
    """Llama-3-8B without its weights: config.json and a model.safetensors holding only the header."""
    return write_shapes_only(tmp_path_factory.mktemp("llama3-8b"), LLAMA3_8B)


def test_shapes_come_from_the_header_alone(llama3_8b):
    file = llama3_8b / "model.safetensors"
    header = read_header(file)
    assert file.stat().st_size < 100_000 and len(header) == 3 + 32 * 9  # embedding, norm, lm_head, 32 blocks
    with pytest.raises(Exception, match="truncated"):  # the weights are absent: no stage can load it
        safetensors_header(file)
    size = model_size(llama3_8b, LAYERS)
    assert size.total_params == 8_030_261_248 == model_shapes(llama3_8b).total_params
    assert size.stored_bytes == 2 * size.total_params  # bfloat16
    assert (size.hidden, size.kv_width, size.mlp, size.vocab, size.n_blocks) == (4096, 1024, 14336, 128256, 32)
    assert sum(d * d for _, d in size.groups) == 3 * 4096**2 + 14336**2  # 2.56e8 moments per block
    assert size.n_blocks * staging_bytes(size) == 32_762_757_120  # the 32.7 GB of float32 staging
    assert size.n_blocks * moments_bytes(size) == pytest.approx(65.5e9, rel=1e-3)  # float64 totals on the host
    # one file describing 16 GB of weights: a compressed folder is written in shards of at most 5 GiB
    assert size.shard_bytes == MAX_SHARD_BYTES


def test_shapes_of_a_real_checkpoint_equal_the_meta_model(tiny_llama, tmp_path):
    size = model_size(tiny_llama, LAYERS)
    shapes = model_shapes(tiny_llama)
    assert size.total_params == shapes.total_params
    assert {n: (o, i) for n, o, i in size.linears} == shapes.linears
    assert size.stored_bytes == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in tiny_llama.glob("*.safetensors"))
    # a folder with config.json alone is planned from the model built on the meta device
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    assert model_size(tmp_path, LAYERS).total_params == size.total_params
    # a compressed folder is sharded like its checkpoint: no shard larger than its largest file
    data = [f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in tiny_llama.glob("*.safetensors")]
    assert size.shard_bytes == max(data) and shard_bytes_of(tiny_llama) == max(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))


def test_plan_resources_table_for_a_24_gb_gpu(llama3_8b, tmp_path):
    """The brief's example: Llama-3-8B on a 24 GB GPU streams stage 1; the whole pass with host staging
    needs the 65.5 GB of float64 totals in host memory, so it fits 64 GB only streamed."""
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    run = run_cli("plan-resources", "--config", str(config), "--model-dir", str(llama3_8b), "--device-memory-gb", "24",
                  "--host-memory-gb", "64", "--root", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line[2:].split("  ")[0].strip() + "|" + line[21:45].strip(): line for line in run.stdout.splitlines()
            if line[2:20].strip() in ("collect_features", "eigendecompose", "evaluate_model")}
    assert rows["collect_features|streamed, staging device"].startswith("*"), run.stdout
    assert rows["collect_features|streamed, staging device"].endswith("fits")
    assert rows["collect_features|whole, staging host"].endswith("does not fit")
    assert rows["collect_features|whole, staging device"].endswith("does not fit")
    assert "planned for 1 GPU of 24 GB, 64.0 GB host memory" in run.stdout and "not a measurement" in run.stdout
    expected = plan_config(validated({"models": {"m": {"source": "local", "path": str(llama3_8b)}}}), "m", tmp_path,
                           Machine(24e9, 1, 64e9, None))["collect_features"]
    numbers = rows["collect_features|streamed, staging device"][45:].split()
    assert [float(x) for x in numbers[:3]] == [round(expected.device_bytes / GB, 1), round(expected.host_bytes / GB, 1),
                                               round(expected.disk_total / GB, 1)]


def validated(config: dict) -> dict:
    validate(config)
    return config


def test_config_check_refuses_a_stage_that_fits_in_no_mode(llama3_8b, tmp_path):
    config = validated({"models": {"llama3": {"source": "local", "path": str(llama3_8b)}}, "streamed": "never",
                        "device": "cuda"})
    small = Machine(gpu_bytes=24e9, gpus=1, host_bytes=48e9, disk_bytes=None)
    with pytest.raises(ConfigError) as err:
        check_fit(config, tmp_path, small)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("collect_features of model llama3 fits in no mode:"), line
    assert "GB on one 24 GB GPU" in line and "of host memory (48.0 GB)" in line and line.endswith("set streamed: always")


def test_the_gradient_stage_is_planned_when_the_loss_allocation_is_configured(llama3_8b, tmp_path):
    """collect_gradients runs (and is checked) only for compression.allocations: loss; the config check refuses
    a gradient pass that fits in no mode in one line naming the stage, its need and the fix."""
    local = {"llama3": {"source": "local", "path": str(llama3_8b)}}
    machine = Machine(gpu_bytes=24e9, gpus=1, host_bytes=512e9, disk_bytes=None)
    plain = validated({"models": local, "compression": {"allocations": ["uniform", "spectral"]}})
    assert not [s for s in plan_config(plain, "llama3", tmp_path, machine) if s.startswith(("collect_gra", "loss_"))]
    sized = job_needs(plain, "llama3", tmp_path, machine)  # sized anyway
    assert "collect_gradients" in sized and all(f"loss_spectra:{m}" in sized for m in plain["compression"]["methods"])
    config = validated({"models": local, "device": "cuda", "compression": {"allocations": ["uniform", "loss"]},
                        "gradients": {"dtype": "float32"}})
    assert [s for s in plan_config(config, "llama3", tmp_path, machine) if s.startswith("loss_")] == [
        f"loss_spectra:{m}" for m in config["compression"]["methods"]]
    _, rows = plan_rows(config, "llama3", tmp_path, machine)
    assert [(n.mode, chosen) for n, chosen, _ in rows if n.stage == "collect_gradients"] == [
        ("full G", True), ("diagonal G", False)]  # 178 GB of sums fit half of the 510 GB free
    feature = [(n.mode, chosen) for n, chosen, _ in rows if n.stage == "loss_spectra" and n.mode.startswith("feature")]
    assert feature == [("feature, full G", True), ("feature, diagonal G", False)]
    with pytest.raises(ConfigError) as err:  # 32 GB of float32 weights on a 24 GB GPU
        check_fit(config, tmp_path, machine)
    line = str(err.value)
    assert "\n" not in line, line
    assert line.startswith("collect_gradients of model llama3 fits in no mode: full G needs "), line
    assert "GB on one 24 GB GPU" in line and line.endswith("set gradients.dtype: bfloat16"), line
    check_fit(config, tmp_path, replace(machine, gpu_bytes=48e9))
    with pytest.raises(ConfigError, match=r"^collect_gradients of model llama3 fits in no mode: .*set streamed: auto"):
        check_fit({**config, "streamed": "always"}, tmp_path, replace(machine, gpu_bytes=48e9))


def test_a_config_json_without_model_type_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    config = validated({"models": {"m": {"source": "local", "path": str(folder)}}})
    with pytest.raises(ConfigError) as err:
        check_config(config, tmp_path, Machine(None, 0, 16e9, None))
    assert str(err.value) == (f"{folder / 'config.json'} has no model_type; add \"model_type\": \"llama\" (the model "
                              "type of LlamaForCausalLM, as transformers' config.json files name it)")
    run = run_cli("plan-resources", "--model-dir", str(folder), "--root", str(tmp_path))
    assert run.returncode != 0 and f"{folder / 'config.json'} has no model_type" in run.stderr, run.stderr[-2000:]


def test_config_check_refuses_a_disk_too_small(llama3_8b, tmp_path):
    config = validated({"models": {"llama3": {"source": "local", "path": str(llama3_8b)}}, "device": "cuda"})
    machine = Machine(gpu_bytes=80e9, gpus=1, host_bytes=512e9, disk_bytes=100e9)
    with pytest.raises(ConfigError, match=r"^results/ has 100.0 GB free, the stages still to run write \d+\.\d GB "
                                          r"\(the most: compress_model of model llama3"):
        check_fit(config, tmp_path, machine)
    needs = plan_config(config, "llama3", tmp_path, machine)
    for variant in variants(config)["written"]:  # written already: not counted again
        (tmp_path / "results" / "llama3" / "compressed" / variant[0]).mkdir(parents=True)
    (tmp_path / "results" / "llama3" / "features").mkdir(parents=True)
    left = sum(n.disk_total for stage, n in needs.items()
               if stage not in ("compress_model", "compress_searched", "collect_features"))
    check_fit(config, tmp_path, replace(machine, disk_bytes=left + 1))
    with pytest.raises(ConfigError, match="results/ has"):
        check_fit(config, tmp_path, replace(machine, disk_bytes=left - 1))


def test_a_searched_folder_is_sized_apart_from_the_budget_variants(llama3_8b, tmp_path):
    """compress_model is sized for the largest budget variant; compress_searched for a searched plan, which may
    keep every parameter; each counts the disk of its own folders."""
    config = validated({"models": {"llama3": {"source": "local", "path": str(llama3_8b)}}, "device": "cpu",
                        "search": {"enabled": True, "methods": ["feature"], "modes": ["kl"], "budgets": False}})
    made = variants(config)
    searched = [v for v, _ in made["written"] if v.startswith("search-")]
    budget = [f for v, f in made["written"] if not v.startswith("search-")]
    assert searched and budget and max(budget) < 1
    needs = plan_config(config, "llama3", tmp_path, Machine(None, 0, 512e9, None))
    size = model_size(llama3_8b, config["layers"])
    model, search = needs["compress_model"], needs["compress_searched"]
    assert (model.mode, search.mode) == ("whole", "whole")
    assert model.disk_bytes == math.ceil(max(budget) * size.total_params) * 2
    assert search.disk_bytes == size.total_params * 2 > model.disk_bytes
    assert (model.jobs, search.jobs) == (len(budget), len(searched))
    assert search.disk_total == len(searched) * size.total_params * 2
    # whole at the stored dtype: the folder as built, a factor-cache block and one shard
    shard = min(size.shard_bytes, search.disk_bytes)
    assert search.host_bytes == LINALG + search.disk_bytes + factors_block_bytes(size, 4) + shard
    assert search.host_bytes - model.host_bytes == search.disk_bytes - model.disk_bytes


def test_the_loss_allocations_shots_are_counted_in_the_disk(llama3_8b, tmp_path):
    """compression.loss_shots 3 at two budgets and two methods: each method and budget adds two gradient
    passes and two loss criteria, each writing its own files."""
    one = validated({"models": {"llama3": {"source": "local", "path": str(llama3_8b)}}, "device": "cpu",
                     "compression": {"methods": ["feature", "weight"], "allocations": ["uniform", "loss"]}})
    three = validated({**json.loads(json.dumps(one)), "compression": {**one["compression"], "loss_shots": 3}})
    machine = Machine(None, 0, 512e9, None)
    a, b = plan_config(one, "llama3", tmp_path, machine), plan_config(three, "llama3", tmp_path, machine)
    assert (a["collect_gradients"].jobs, b["collect_gradients"].jobs) == (1, 1 + 2 * 2 * 2)
    assert b["collect_gradients"].disk_total == 9 * a["collect_gradients"].disk_total
    assert (a["loss_spectra:feature"].jobs, b["loss_spectra:feature"].jobs) == (1, 1 + 2 * 2)
    assert b["loss_spectra:weight"].disk_total == 5 * a["loss_spectra:weight"].disk_total
    assert b["collect_gradients"].host_bytes == a["collect_gradients"].host_bytes  # each job is the same pass


def test_a_model_not_downloaded_is_skipped_with_a_log_line(tmp_path, caplog):
    config = validated({"models": {"big": {"source": "hub", "id": "org/model", "params_b": 70}}})
    check_fit(config, tmp_path, Machine(24e9, 1, 1e9, 1e9))  # would fit nowhere; not checked yet
    assert "checked once it is downloaded" in caplog.text
    needs = job_needs(config, "big", tmp_path, Machine(24e9, 1, 1e9, 1e9))  # jobs sized from params_b
    assert needs["evaluate_model"].gpus == 8  # 70B at 2 bytes over 24 GB GPUs at 80%


def test_check_config_runs_the_resource_check(llama3_8b, tmp_path):
    config = validated({"models": {"llama3": {"source": "local", "path": str(llama3_8b)}}, "device": "cpu",
                        "evaluation": {"enabled": False}, "search": {"enabled": False}, "speed": {"enabled": False}})
    with pytest.raises(ConfigError, match="fits in no mode"):
        check_config(config, tmp_path, Machine(None, 0, 4e9, None))


def test_streamed_auto_is_the_planners_choice(tiny_llama, tmp_path):
    from sfsd.features.calibration import tokenize
    from sfsd.io import save_tensors
    from sfsd.model.loading import load_tokenizer

    tokens = tmp_path / "tokens.safetensors"
    save_tensors(tokens, tokenize(["a b c"] * 6, load_tokenizer(tiny_llama), 16), {})
    assert tokens_shape(tokens) == (6, 16)
    cpu = torch.device("cpu")
    kw = dict(dtype="float32", device=cpu, layers=LAYERS, tokens=tokens, batch_size=2, staging="auto")
    assert decide_streamed("collect_features", tiny_llama, "auto", **kw, machine=Machine(None, 0, 1e12)) == "never"
    # host memory that holds the process and one block, not the whole pass
    streamed = plan_stage("collect_features", model_size(tiny_llama, LAYERS),
                          Settings(samples=6, seq_len=16, collect_batch=2, gpu=False), Machine(None, 0, 1e12))
    whole_only = candidates("collect_features", model_size(tiny_llama, LAYERS),
                            Settings(samples=6, seq_len=16, collect_batch=2, gpu=False), Machine(None, 0, 1e12))
    limit = Machine(None, 0, whole_only[1].host_bytes)
    assert streamed.mode.startswith("whole") and whole_only[1].host_bytes < whole_only[0].host_bytes
    assert decide_streamed("collect_features", tiny_llama, "auto", **kw, machine=limit) == "always"
    assert decide_streamed("collect_features", tiny_llama, "never", **kw, machine=limit) == "never"
    assert decide_streamed("factor_cache", tiny_llama, "auto", dtype="float32", device=cpu,
                           machine=Machine(None, 0, 1e12)) == "never"
    with pytest.raises(ConfigError, match="unknown"):
        decide_streamed("factor_cache", tiny_llama, "sometimes", dtype="float32", device=cpu)


def test_job_needs_of_the_default_config_cover_every_rule():
    config = validated({})
    needs = job_needs(config, "smollm2-135m", REPO / "does-not-exist", Machine(None, 0, 16e9, None))
    assert {"prepare_model", "collect_features", "collect_gradients", "eigendecompose", "compress_model",
            "evaluate_model", "check_scorer", "search", "laser_point", "inference_speed"} <= set(needs)
    assert all(f"factor_cache:{m}" in needs and f"loss_spectra:{m}" in needs for m in config["compression"]["methods"])
    assert json.dumps({k: v.host_bytes for k, v in needs.items()})  # plain numbers


RULES_SIZED = {"prepare_model": "prepare_model", "collect_features": "collect_features",
               "collect_gradients": "collect_gradients", "eigendecompose": "eigendecompose",
               "factor_cache": "factor_cache", "loss_spectra": "loss_spectra", "compress_model": "compress_model",
               "compress_searched": "compress_searched", "evaluate_model": "evaluate_model",
               "check_scorer": "check_scorer", "search": "search", "laser_point": "laser_point",
               "inference_speed": "inference_speed", "spectra": "eigendecompose",
               "loss_shot_model": "compress_model", "loss_shot_gradients": "collect_gradients",
               "loss_shot_spectra": "loss_spectra"}


def test_every_heavy_rule_is_sized_by_the_planner():
    """Each rule that loads a model or its statistics takes mem_mb (and gpu) from the planner's stage; a rule
    made from another (`use rule P as R with:`, a shot of the loss allocation) keeps P's resources."""
    import re

    text = "\n".join(p.read_text() for p in sorted((REPO / "rules").glob("*.smk")))
    for rule, stage in RULES_SIZED.items():
        used = re.search(rf"^use rule (\w+) as {rule} with:\n(.*?)(?=^(?:rule|checkpoint|use rule) |\Z)", text, re.M | re.S)
        if used:
            assert RULES_SIZED.get(used[1]) == stage and "resources:" not in used[2], rule
            continue
        block = re.search(rf"^(?:rule|checkpoint) {rule}:\n(.*?)(?=^(?:rule|checkpoint|use rule) |\Z)", text, re.M | re.S)[1]
        assert f'mem_mb=plan_mem_mb("{stage}")' in block, rule
        assert "gpu=" not in block or f'gpu=plan_gpus("{stage}")' in block, rule
    assert "collect_mem_mb" not in text and "eigen_mem_mb" not in text and "gpus_for" not in text


@pytest.mark.slow
def test_snakemake_resources_are_the_planners(tmp_path, tiny_llama, calibration_text_file):
    """A dry run: the jobs' mem_mb, disk_mb, gpu and threads are the planner's numbers for the tiny model; the
    global mem_mb limit is the machine's host memory (host_memory_gb), so a job planned above it (a 70B hub
    model's evaluation on the CPU) is capped to it and runs alone; --resources mem_mb=N replaces the limit."""
    import re

    from helpers import base_config, new_run, snakemake

    snakefile, workdir = new_run(tmp_path)
    config = base_config(tiny_llama, calibration_text_file)
    config["host_memory_gb"] = 16
    config["models"]["big"] = {"source": "hub", "id": "org/model-70b", "params_b": 70}
    targets = ["results/tiny/eval/base.parquet", "results/tiny/features", "results/tiny/factors/whitened",
               "results/tiny/gradients", "results/tiny/loss/whitened", "results/big/eval/base.parquet"]
    out = snakemake(snakefile, workdir, config, "--dry-run", *targets).stdout
    jobs = re.findall(r"^(?:rule|checkpoint|localrule|localcheckpoint) (\w+):\n(.*?)^\s+resources: ([^\n]*)", out,
                      re.M | re.S)
    full = validated(json.loads(json.dumps(config)))
    tiny = job_needs(full, "tiny", workdir, Machine(None, 8, 16e9, None))
    big = job_needs(full, "big", workdir, Machine(None, 8, 16e9, None))
    seen = set()
    for rule, head, resources in jobs:
        model = re.search(r"wildcards: model=(\w+)", head)
        if rule not in RULES_SIZED or model is None:
            continue
        stage = RULES_SIZED[rule] + (":whitened" if rule in ("factor_cache", "loss_spectra") else "")
        need = (tiny if model[1] == "tiny" else big)[stage]
        got = dict(re.findall(r"(\w+)=([^,]+)", resources))
        expected = min(16000, -(-int(need.host_bytes) // 10**6))  # the global limit caps it
        assert int(got["mem_mb"]) == expected, (rule, model[1], got)
        assert int(got.get("gpu", 0)) == need.gpus
        if "disk_mb" in got:
            assert int(got["disk_mb"]) == max(1, -(-int(need.disk_bytes) // 10**6)), (rule, got)
        # at most half of the run's 2 cores, so a 2-thread stage never waits for both to be free at once
        threads = re.search(r"threads: (\d+)", head)
        assert threads is None or int(threads[1]) == 1, (rule, head)
        seen.add((rule, model[1]))
    assert {("collect_features", "tiny"), ("collect_gradients", "tiny"), ("factor_cache", "tiny"),
            ("loss_spectra", "tiny"), ("evaluate_model", "tiny"), ("evaluate_model", "big")} <= seen, seen
    assert big["evaluate_model"].host_bytes > 16e9  # capped above
    # on 8 cores the planner's threads; the stage-1 chain runs before the scoring jobs beside it
    out = snakemake(snakefile, workdir, config, "--dry-run", "--cores", "8", "results/tiny/features",
                    "results/tiny/eval/base.parquet").stdout
    collect = re.search(r"^checkpoint collect_features:\n(.*?)\n\n", out, re.M | re.S)[1]
    assert f"threads: {tiny['collect_features'].threads}" in collect and tiny["collect_features"].threads == 2
    assert "priority: 10" in collect
    assert "priority" not in re.search(r"^rule evaluate_model:\n(.*?)\n\n", out, re.M | re.S)[1]
    out = snakemake(snakefile, workdir, config, "--dry-run", "results/big/eval/base.parquet", "--resources",
                    "mem_mb=1000000").stdout
    evaluate = re.search(r"^rule evaluate_model:\n.*?^\s+resources: ([^\n]*)", out, re.M | re.S)[1]
    assert f"mem_mb={-(-int(big['evaluate_model'].host_bytes) // 10**6)}," in evaluate, evaluate


# loss-spectra's pass in a fresh process, its peak resident memory above the memory held before it (the
# modules outside the blocks): a first pass loads the kernels' code, /proc/self/clear_refs resets the peak
# (VmHWM) to the memory held now, and large blocks are mapped (MALLOC_MMAP_THRESHOLD_), so memory freed goes
# back and the peak is the tensors'
MEASURE_LOSS_SPECTRA = """
import sys, torch
from pathlib import Path
from sfsd.decompose.compress import BlockFile
from sfsd.decompose.criteria import save_loss_spectra
from sfsd.features.collect import block_file
from sfsd.model.stream import open_blocks
torch.set_num_threads(1)
root, method = Path(sys.argv[1]), sys.argv[2]
source = open_blocks(root / "model", "always")
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
def files(kind):
    return lambda b: BlockFile(root / kind / block_file(b), None)
def loss_pass(out):
    save_loss_spectra(source, source.spec, method, list(source.spec.linears), root / out, files(f"factors/{method}"),
                      files("features"), files("gradients"))
loss_pass("warm")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
loss_pass("measured")
print(status("VmHWM") - before)
"""


def _loss_spectra_inputs(root, config: dict, methods: tuple[str, ...]) -> None:
    """A random-weight Llama stored in bfloat16 and, per block, random files of the shapes loss-spectra reads:
    stage 1's float64 statistics, the whole float64 G of every Linear, each method's float32 factors at rank
    kappa - 1 (feature space's with the output mean)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sfsd.features.collect import block_file
    from sfsd.io import save_tensors
    from sfsd.model.registry import get_arch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(root / "model")
    size = model_size(root / "model", LAYERS)
    spec, shapes = get_arch("LlamaForCausalLM"), {n: (o, i) for n, o, i in size.linears}
    for b in range(size.n_blocks):
        features = {}
        for group, d in size.groups:
            x = torch.randn(4 * d, d, dtype=torch.float64)
            features |= {f"{group}.xxt": x.T @ x, f"{group}.xsum": x.sum(0), f"{group}.xabs": x.abs().sum(0),
                         f"{group}.count": torch.tensor(4 * d)}
        save_tensors(root / "features" / block_file(b), features, {"block": b})
        grads = {}
        for name, (o, _) in shapes.items():
            g = torch.randn(2 * o, o, dtype=torch.float64)
            grads |= {f"{name}.ggt": g.T @ g, f"{name}.gsum": g.sum(0)}
        save_tensors(root / "gradients" / block_file(b), grads, {"block": b, "full": True})
        for method in methods:
            factors = {}
            for name, (o, i) in shapes.items():
                k = max(1, o * i // (o + i) - 1)
                factors |= {f"{name}.first": torch.randn(k, i), f"{name}.second": torch.randn(o, k)}
                if method == "feature":
                    factors[f"{name}.mean"] = torch.randn(o)
            save_tensors(root / "factors" / method / block_file(b), factors, {"block": b})
    assert set(shapes) == set(spec.linears)


@pytest.mark.slow  # the pass measured in a fresh process per method
@pytest.mark.parametrize("method", ["feature", "weight"])
def test_the_planned_loss_spectra_is_never_under_its_measured_peak(tmp_path, method):
    """The resource planner's loss-criterion stage (sfsd/resources/loss_needs.py loss_spectra, the whole G)
    against the peak memory of its pass measured in a fresh process on a small Llama stored in bfloat16: the
    prediction beyond the process and the modules outside the blocks (one block's weights and files, one
    Linear's float64 working set) is at least the measured peak, and not twice it."""
    import os
    import subprocess
    import sys

    from sfsd.resources.loss_needs import loss_spectra
    from sfsd.resources.needs import stored_bytes

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    config = {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 2000, "tie_word_embeddings": False}
    _loss_spectra_inputs(tmp_path, config, (method,))
    size = model_size(tmp_path / "model", LAYERS)
    assert round(size.stored_bytes / size.total_params) == 2  # the blocks are read at the stored dtype
    need = loss_spectra(size, Settings(gpu=False), method, full=True)
    predicted = need.host_bytes - PROC - stored_bytes(size, size.embed_params + size.head_params)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    run = subprocess.run([sys.executable, "-c", MEASURE_LOSS_SPECTRA, str(tmp_path), method], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = int(run.stdout.split()[-1])
    assert predicted / 2 < measured <= predicted, (measured, predicted)
    assert (tmp_path / "measured" / "block_001.safetensors").stat().st_size <= need.disk_bytes / size.n_blocks + 4096


def test_gradient_dtype_auto_is_float32_where_it_fits_else_the_checkpoints(llama3_8b, tmp_path):
    """gradients.dtype auto: bfloat16 Llama-3-8B's backward pass runs in float32 on a 48 GB GPU and in its own
    bfloat16 on a 24 GB one, where float32 fits in no mode; the planner's mode names the dtype, and the stage
    decides the same way on the same machine (decide_gradient_dtype)."""
    from sfsd.resources.decide import decide_gradient_dtype

    local = {"llama3": {"source": "local", "path": str(llama3_8b)}}
    config = validated({"models": local, "device": "cuda", "compression": {"allocations": ["uniform", "loss"]}})
    assert config["gradients"]["dtype"] == "auto"
    tokens = tmp_path / "tokens.safetensors"
    from sfsd.io import save_tensors

    save_tensors(tokens, {"input_ids": torch.zeros(128, 128, dtype=torch.long),
                          "attention_mask": torch.ones(128, 128, dtype=torch.long)}, {})
    for gpu_gb, dtype in ((24, "bfloat16"), (48, "float32")):
        machine = Machine(gpu_bytes=gpu_gb * 1e9, gpus=1, host_bytes=512e9, disk_bytes=None)
        need = plan_config(config, "llama3", tmp_path, machine)["collect_gradients"]
        assert need.fix is None and need.mode.endswith(f", {dtype}"), (gpu_gb, need)
        assert decide_gradient_dtype(llama3_8b, "auto", device=torch.device("cuda"), layers=LAYERS, tokens=tokens,
                                     batch_size=4, machine=machine) == dtype
    fixed = validated({"models": local, "device": "cuda", "compression": {"allocations": ["uniform", "loss"]},
                       "gradients": {"dtype": "float32"}})
    small = Machine(gpu_bytes=24e9, gpus=1, host_bytes=512e9, disk_bytes=None)
    assert plan_config(fixed, "llama3", tmp_path, small)["collect_gradients"].fix == "gradients.dtype: bfloat16"
    assert decide_gradient_dtype(llama3_8b, "bfloat16", device=torch.device("cpu"), layers=LAYERS, tokens=tokens,
                                 batch_size=4) == "bfloat16"
