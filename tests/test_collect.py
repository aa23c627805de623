"""Stage 1 on a tiny random Llama with grouped-query attention: the collected statistics equal a
direct computation, padding does not leak into them, and derived output moments match hooked outputs."""

import json

import pytest
import torch

from sfsd.cli.main import main as sfsd_main
from sfsd.errors import DataError
from sfsd.features.calibration import tokenize
from sfsd.features.collect import block_file, collect_input_moments, load_block_moments
from sfsd.features.stats import output_moments
from sfsd.io import load_tensors, save_tensors
from sfsd.model.loading import load_model
from sfsd.model.registry import get_arch, groups_for, linear_of, select_linears

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What do plants need to grow?\nAnswer: water and light",
    "A man is sitting on a roof.",
    "Sarah was a much better surgeon than Maria.",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def model_and_tokens(tiny_llama):
    model, tokenizer = load_model(tiny_llama, device="cpu")
    tokens = tokenize(TEXTS, tokenizer, seq_len=40)
    assert int(tokens["attention_mask"][:, -1].sum()) < len(TEXTS)  # some rows are padded
    return model, tokens


def hooked(model, spec, tokens, block, linear, where="input"):
    """Inputs or outputs of one Linear over the real (unpadded) tokens, by a plain hook."""
    seen = []
    layer = linear_of(model, spec, block, linear)

    def hook(_m, inputs, output):
        seen.append((inputs[0] if where == "input" else output).detach())

    h = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(**tokens)
    h.remove()
    flat = seen[0].reshape(-1, seen[0].shape[-1])
    return flat[tokens["attention_mask"].reshape(-1).bool()].double()


def test_statistics_equal_direct_computation(model_and_tokens):
    model, tokens = model_and_tokens
    spec = get_arch("LlamaForCausalLM")
    groups = groups_for(spec, select_linears(spec, ["proj"]))
    assert groups == ["attn_in", "attn_out", "mlp_in", "mlp_out"]  # 4 inputs for 7 Linear layers
    moments = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                    batch_size=2, progress=False)
    assert len(moments) == 2 and set(moments[1]) == set(groups)
    for block in range(2):
        for group, first in [("attn_in", "k_proj"), ("attn_out", "o_proj"), ("mlp_in", "up_proj"),
                             ("mlp_out", "down_proj")]:
            x = hooked(model, spec, tokens, block, first)
            acc = moments[block][group]
            assert acc.count == int(tokens["attention_mask"].sum())
            torch.testing.assert_close(acc.xsum, x.sum(0), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(acc.xxt, x.T @ x, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(acc.xabs, x.abs().sum(0), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(acc.mean_abs(), x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_statistics(tiny_llama, model_and_tokens):
    model, tokens = model_and_tokens
    spec = get_arch("LlamaForCausalLM")
    _, tokenizer = load_model(tiny_llama, device="cpu")
    longer = tokenize(TEXTS, tokenizer, seq_len=64)  # same texts, 24 more padding slots each
    ids = longer["input_ids"].clone()
    ids[longer["attention_mask"] == 0] = 7  # garbage under the mask must not matter either
    a = collect_input_moments(model, spec, ["mlp_out"], tokens["input_ids"], tokens["attention_mask"], 5, progress=False)
    b = collect_input_moments(model, spec, ["mlp_out"], ids, longer["attention_mask"], 2, progress=False)
    assert a[1]["mlp_out"].count == b[1]["mlp_out"].count
    torch.testing.assert_close(a[1]["mlp_out"].xxt, b[1]["mlp_out"].xxt, rtol=1e-5, atol=1e-4)


def test_derived_output_covariance_equals_hooked_outputs(model_and_tokens):
    model, tokens = model_and_tokens
    spec = get_arch("LlamaForCausalLM")
    moments = collect_input_moments(model, spec, ["attn_in", "mlp_in"], tokens["input_ids"],
                                    tokens["attention_mask"], 3, progress=False)
    for linear in ["k_proj", "v_proj", "gate_proj"]:  # k/v are grouped-query: 16 outputs of 32 inputs
        layer = linear_of(model, spec, 1, linear)
        y = hooked(model, spec, tokens, 1, linear, where="output")
        acc = moments[1][spec.group_of(linear)]
        mu, cov = output_moments(layer.weight, layer.bias, acc.mean(), acc.covariance())
        torch.testing.assert_close(mu, y.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cov, torch.cov(y.T, correction=0), rtol=1e-4, atol=1e-5)


def test_block_files_hold_sum_abs_and_older_files_still_load(tiny_llama, calibration_text_file, tmp_path):
    """The collect stage saves <group>.xabs beside .xxt/.xsum/.count; a file of an older collection
    without it still loads (and the eigen stage still runs on it), only its mean |x| is refused."""
    texts, tokens, features = tmp_path / "texts.jsonl", tmp_path / "tokens.safetensors", tmp_path / "features"
    settings = json.dumps({"source": "text_file", "path": str(calibration_text_file), "num_samples": 8})
    assert sfsd_main(["calibration-texts", "--settings", settings, "--out", str(texts)]) == 0
    assert sfsd_main(["--threads", "1", "tokenize", "--model-dir", str(tiny_llama), "--texts", str(texts),
                      "--seq-len", "32", "--out", str(tokens)]) == 0
    assert sfsd_main(["--threads", "1", "collect", "--model-dir", str(tiny_llama), "--model-name", "tiny",
                      "--tokens", str(tokens), "--layers", "q_proj,down_proj", "--device", "cpu",
                      "--batch-size", "4", "--out", str(features)]) == 0
    model, _ = load_model(tiny_llama, device="cpu")
    spec = get_arch("LlamaForCausalLM")
    ids = load_tensors(tokens)[0]
    direct = collect_input_moments(model, spec, ["attn_in", "mlp_out"], ids["input_ids"], ids["attention_mask"], 4,
                                   progress=False)
    path = features / block_file(1)
    saved, _ = load_block_moments(path)
    for group in ("attn_in", "mlp_out"):
        assert saved[group].xabs.dtype == torch.float64
        torch.testing.assert_close(saved[group].mean_abs(), direct[1][group].mean_abs())
    tensors, meta = load_tensors(path)
    old = tmp_path / "old" / block_file(1)
    save_tensors(old, {k: v for k, v in tensors.items() if not k.endswith(".xabs")}, meta)
    loaded, _ = load_block_moments(old)
    assert loaded["attn_in"].xabs is None
    torch.testing.assert_close(loaded["attn_in"].second_moment(), saved["attn_in"].second_moment())
    with pytest.raises(DataError, match="rerun collection"):
        loaded["attn_in"].mean_abs()
    assert sfsd_main(["--threads", "1", "eigen", "--features", str(old), "--model-dir", str(tiny_llama),
                      "--layers", "q_proj,down_proj", "--out", str(tmp_path / "eigen.safetensors")]) == 0
