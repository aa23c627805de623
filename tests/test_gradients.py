"""Output-gradient statistics (sfsd.features.gradients): the hooked gradients equal a direct autograd
computation of dL/dy, padding never enters them, the memory bound, and the stage's files."""

from __future__ import annotations

import pytest
import torch

from sfsd.errors import ConfigError
from sfsd.features.calibration import tokenize
from sfsd.features.gradients import (
    collect_output_gradients,
    output_gradient,
    packed_tokens,
    resolve_full,
    run_gradients,
    sampled_targets,
    token_losses,
)
from sfsd.io import load_tensors, read_json, save_tensors
from sfsd.model.loading import load_model
from sfsd.model.registry import get_arch, linear_of
from sfsd.resources.needs import full_fits, gradient_sums_bytes

SPEC = get_arch("LlamaForCausalLM")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A man is sitting on a roof.",
         "Question: What do plants need to grow?\nAnswer: water and light", "Once upon a time"]


@pytest.fixture(scope="module")
def model_and_tokens(tiny_llama):
    model, tokenizer = load_model(tiny_llama, device="cpu")
    tokens = tokenize(TEXTS, tokenizer, seq_len=24)
    assert int(tokens["attention_mask"][:, -1].sum()) < len(TEXTS)  # some rows are padded
    return model, tokens


def direct_gradients(model, tokens, block: int, linear: str) -> torch.Tensor:
    """dL/dy of one Linear at every real token, L the summed NLL of each sequence run ALONE (no padding
    anywhere), by retaining the output's gradient."""
    rows = []
    for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"]):
        n = int(mask.sum())
        seen = {}
        layer = linear_of(model, SPEC, block, linear)
        h = layer.register_forward_hook(lambda _m, _i, out: seen.setdefault("y", out))
        embeds = model.get_input_embeddings()(ids[None, :n]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        h.remove()
        seen["y"].retain_grad()
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:n], reduction="sum").backward()
        rows.append(seen["y"].grad[0].double())
    return torch.cat(rows)


@pytest.mark.parametrize("full", [True, False])
def test_gradients_equal_autograd_per_sequence(model_and_tokens, full):
    """G = (1/N) sum_t g g^T over the real tokens equals the direct computation, sequence by sequence
    without padding (so the padded batches leak nothing), for a Linear of each kind; the loss is the
    summed NLL and the parameters keep their requires_grad."""
    model, tokens = model_and_tokens
    before = [p.requires_grad for p in model.parameters()]
    moments, summary = collect_output_gradients(model, SPEC, ["q_proj", "v_proj", "down_proj"], tokens["input_ids"],
                                                tokens["attention_mask"], batch_size=3, full=full, progress=False)
    assert [p.requires_grad for p in model.parameters()] == before
    n = int(tokens["attention_mask"].sum())
    assert summary["tokens"] == n and summary["predicted_tokens"] == n - len(TEXTS)
    for block, linear in [(0, "q_proj"), (1, "v_proj"), (1, "down_proj")]:
        g = direct_gradients(model, tokens, block, linear)
        acc = moments[block][linear]
        assert acc.count == n
        expected = g.T @ g / n if full else g.square().mean(0)
        torch.testing.assert_close(acc.second_moment(), expected, rtol=2e-4, atol=1e-5 * float(expected.abs().max()))
        torch.testing.assert_close(acc.gsum, g.sum(0), rtol=2e-4, atol=1e-5 * float(g.abs().sum(0).max()))


def test_token_losses_sum_real_predictions():
    """Two sequences, the second padded after 2 tokens: 3 + 1 predictions, uniform logits give log V each."""
    logits = torch.zeros(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, n = token_losses(logits, ids, mask)
    assert n == 4 and float(loss) == pytest.approx(4 * torch.log(torch.tensor(5.0)).item())


def test_sampled_labels_give_the_true_fisher():
    """Labels drawn from softmax(z): the gradient of the NLL at the logits is g = p - e_y, whose mean over
    the draws is 0 and whose second moment is diag(p) - p p^T (the true Fisher of a softmax); the text's
    own label (the empirical Fisher) gives (p - e_y)(p - e_y)^T instead. 40000 positions of the same
    logits, so the Monte Carlo error is about 1/200."""
    z = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0])
    p = z.softmax(0)
    logits = z.expand(1, 40001, 5)
    targets = sampled_targets(logits, torch.Generator().manual_seed(0))
    assert targets.shape == (1, 40000)
    g = p - torch.nn.functional.one_hot(targets[0], 5).float()
    torch.testing.assert_close(g.mean(0), torch.zeros(5), atol=0.01, rtol=0)
    torch.testing.assert_close(g.T @ g / len(g), torch.diag(p) - torch.outer(p, p), atol=0.01, rtol=0)
    same = sampled_targets(logits, torch.Generator().manual_seed(0))
    other = sampled_targets(logits, torch.Generator().manual_seed(1))
    assert torch.equal(same, targets) and not torch.equal(other, targets)
    certain = torch.full((2, 4, 5), -30.0)
    certain[..., 3] = 30.0  # all the mass on token 3: every draw is 3
    assert torch.equal(sampled_targets(certain, torch.Generator().manual_seed(0)), torch.full((2, 3), 3))


def test_sampled_labels_in_the_pass(model_and_tokens):
    """The pass with sampled labels: the same seed gives the same G, another seed or the text's labels
    another one; an unknown kind of label is one ConfigError."""
    model, tokens = model_and_tokens
    args = (model, SPEC, ["v_proj"], tokens["input_ids"], tokens["attention_mask"])

    def g(**kw):
        moments, _ = collect_output_gradients(*args, batch_size=2, full=False, progress=False, **kw)
        return moments[1]["v_proj"].second_moment()

    sampled = g(labels="sampled", seed=0)
    torch.testing.assert_close(g(labels="sampled", seed=0), sampled, rtol=0, atol=0)
    assert not torch.allclose(g(labels="sampled", seed=1), sampled)
    assert not torch.allclose(g(), sampled)
    with pytest.raises(ConfigError, match="gradients.labels"):
        g(labels="model")


def test_packed_tokens_join_the_texts_into_full_rows():
    """Texts [1 2 3] and [4 5] in rows of 4 (padding 0), separator 9: the stream 1 2 3 9 4 5 9 cut into rows
    of 4, the last padded and masked; without a separator the texts simply follow each other."""
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    packed = packed_tokens(ids, mask, 9)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 9], [4, 5, 9, 0]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert packed_tokens(ids, mask, None)["input_ids"].tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]
    assert packed_tokens(ids, mask, None)["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_memory_bound():
    """12 d^2 + 8 d bytes per Linear for the whole G (float64 total, float32 staging, float64 sum of g),
    16 d for the diagonal; auto = full when that takes at most half the free memory."""
    assert gradient_sums_bytes([2, 3], True) == 12 * (4 + 9) + 8 * (2 + 3)
    assert gradient_sums_bytes([2, 3], True, staged=False) == 8 * (4 + 9) + 8 * (2 + 3)  # a GPU run stages none
    assert gradient_sums_bytes([2, 3], False) == 16 * 5
    assert full_fits([10], 2 * 1280) and not full_fits([10], 2 * 1280 - 1)
    assert resolve_full("auto", [10], 1e9) and not resolve_full("auto", [10], 100)
    assert resolve_full("true", [10], 0) and not resolve_full("false", [10], 1e12) and resolve_full(True, [1], 0)
    with pytest.raises(ConfigError):
        resolve_full("sometimes", [1], 1)


def test_stage_writes_blocks_and_manifest(tiny_llama, model_and_tokens, tmp_path):
    """run_gradients writes one file per block with G per Linear and the provenance of stage 1."""
    from sfsd.features.calibration import tokens_digest
    from sfsd.provenance import tokenizer_digest

    _, tokens = model_and_tokens
    path = tmp_path / "tokens.safetensors"
    save_tensors(path, tokens, {"digest": tokens_digest(tokens), "tokenizer_digest": tokenizer_digest(tiny_llama)})
    out = tmp_path / "gradients"
    run_gradients(tiny_llama, path, out, "tiny", ["q_proj", "down_proj"], full="false", device="cpu", batch_size=2)
    manifest = read_json(out / "manifest.json")
    assert manifest["n_blocks"] == 2 and manifest["full"] is False and manifest["linears"] == ["q_proj", "down_proj"]
    tensors, meta = load_tensors(out / "block_001.safetensors")
    assert meta["calibration_digest"] == tokens_digest(tokens) and meta["model_digest"]
    assert meta["tokens"] == int(tokens["attention_mask"].sum())
    assert output_gradient(tensors, "down_proj").ndim == 1
    assert sorted(tensors) == ["down_proj.gdiag", "down_proj.gsum", "q_proj.gdiag", "q_proj.gsum"]
    assert meta["labels"] == "data" and meta["settings"]["labels"] == "data" and "seed" not in meta["settings"]
    sampled = tmp_path / "sampled"
    run_gradients(tiny_llama, path, sampled, "tiny", ["q_proj"], full="false", device="cpu", batch_size=2,
                  labels="sampled", seed=3)
    meta = load_tensors(sampled / "block_000.safetensors")[1]
    assert meta["labels"] == "sampled" and meta["settings"]["labels"] == "sampled" and meta["settings"]["seed"] == 3
    packed = tmp_path / "packed"
    run_gradients(tiny_llama, path, packed, "tiny", ["q_proj"], full="false", device="cpu", batch_size=2, pack=True)
    meta = load_tensors(packed / "block_000.safetensors")[1]
    texts = tokens["input_ids"].shape[0]  # one end-of-sequence token after each text
    assert meta["pack"] is True and meta["settings"]["pack"] is True
    assert meta["tokens"] == int(tokens["attention_mask"].sum()) + texts
    assert meta["calibration_digest"] == tokens_digest(tokens)  # paired with stage 1's statistics of the same texts


# the gradient pass in a fresh process, its peak resident memory above the memory held before it: a first
# pass loads the kernels' code, /proc/self/clear_refs resets the peak (VmHWM) to the memory held now, and
# large blocks are mapped (MALLOC_MMAP_THRESHOLD_), so memory freed goes back and the peak is the tensors'
MEASURE_PASS = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from sfsd.features.gradients import collect_output_gradients
from sfsd.model.registry import get_arch
torch.set_num_threads(1)
config, rows, ctx = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**config)).eval()
ids = torch.randint(0, config["vocab_size"], (rows, ctx))
spec = get_arch("LlamaForCausalLM")
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
def gradient_pass():
    collect_output_gradients(model, spec, list(spec.linears), ids, torch.ones_like(ids), rows, True, progress=False)
gradient_pass()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
gradient_pass()
print(status("VmHWM") - before)
"""


def test_the_planned_pass_is_never_under_its_measured_peak(tmp_path):
    """The resource planner's gradient stage on the CPU (sfsd/resources/loss_needs.py gradients, the whole G in
    float32) against the peak memory of the pass measured in a fresh process: the prediction beyond the
    process and the weights (one batch's activations held for the backward, the logits, the sums of G and
    the files' copies) is at least the measured peak, and not four times it."""
    import json
    import os
    import subprocess
    import sys

    from sfsd.resources.loss_needs import backward_bytes, gradients
    from sfsd.resources.needs import PROCESS_BYTES, Machine, Settings
    from sfsd.resources.read import model_size, write_shapes_only

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": 2000, "tie_word_embeddings": False, "attn_implementation": "sdpa"}
    rows, ctx = 4, 128
    size = model_size(write_shapes_only(tmp_path / "model", config))
    s = Settings(gpu=False, seq_len=ctx, grad_batch=rows, grad_itemsize=4, grad_full="true")
    need = gradients(size, s, Machine(None, 0, 1e15), full=True)
    weights = size.total_params * 4
    predicted = need.host_bytes - PROCESS_BYTES - weights
    # the pass is the peak, not the loading (the float32 weights and the checkpoint's pages)
    assert predicted > backward_bytes(size, rows, ctx, 4) and predicted > size.stored_bytes
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    run = subprocess.run([sys.executable, "-c", MEASURE_PASS, json.dumps(config), str(rows), str(ctx)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = int(run.stdout.split()[-1])
    assert predicted / 4 < measured <= predicted, (measured, predicted)


def test_the_gradients_of_a_compressed_model(tiny_llama, model_and_tokens, tmp_path):
    """--compressed: the gradients of a compressed folder of the model, stamped with the dense model's digest
    (the loss criterion pairs them with its statistics) and the plan's; a cut in block 1 changes the
    gradient reaching block 0, and the files hold what the pass computes on the compressed model itself."""
    from sfsd.decompose.compress import apply_plan, load_compressed, save_compressed
    from sfsd.decompose.plan import uniform_plan
    from sfsd.features.calibration import tokens_digest
    from sfsd.io import model_digest
    from sfsd.model.loading import load_tokenizer, model_config
    from sfsd.model.shapes import model_shapes
    from sfsd.provenance import tokenizer_digest, value_digest

    _, tokens = model_and_tokens
    path = tmp_path / "tokens.safetensors"
    save_tensors(path, tokens, {"digest": tokens_digest(tokens), "tokenizer_digest": tokenizer_digest(tiny_llama)})
    plan = uniform_plan(SPEC, 2, ["q_proj", "down_proj"], model_shapes(model_config(tiny_llama)), 0.3, "weight",
                        blocks=[1])
    model = load_model(tiny_llama, device="cpu")[0]
    apply_plan(model, SPEC, plan)
    folder = save_compressed(model, plan, tmp_path / "compressed", tokenizer=load_tokenizer(tiny_llama))
    compressed = load_compressed(folder, "cpu", "float32")
    linears = ["q_proj", "down_proj"]
    run_gradients(tiny_llama, path, tmp_path / "dense", "tiny", linears, full="true", device="cpu", batch_size=2)
    run_gradients(tiny_llama, path, tmp_path / "cut", "tiny", linears, full="true", device="cpu", batch_size=2,
                  compressed=compressed)
    dense, _ = load_tensors(tmp_path / "dense" / "block_000.safetensors")
    cut, meta = load_tensors(tmp_path / "cut" / "block_000.safetensors")
    assert meta["model_digest"] == model_digest(tiny_llama)
    assert meta["settings"]["compressed_plan"] == value_digest(compressed[1]["layers"])
    assert not torch.allclose(cut["down_proj.ggt"], dense["down_proj.ggt"])
    moments, _ = collect_output_gradients(compressed[0], SPEC, linears, tokens["input_ids"], tokens["attention_mask"],
                                          batch_size=2, full=True, progress=False)
    torch.testing.assert_close(cut["down_proj.ggt"], moments[0]["down_proj"].second_moment())
