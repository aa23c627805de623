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
    # --staging host: the same files bit for bit (flush_every 1), the staging decided in the manifest
    assert json.loads((features / "manifest.json").read_text())["staging"] == "device"  # auto, on the CPU
    assert sfsd_main(["--threads", "1", "collect", "--model-dir", str(tiny_llama), "--model-name", "tiny",
                      "--tokens", str(tokens), "--layers", "q_proj,down_proj", "--device", "cpu",
                      "--batch-size", "4", "--staging", "host", "--out", str(tmp_path / "host")]) == 0
    assert json.loads((tmp_path / "host" / "manifest.json").read_text())["staging"] == "host"
    for b in range(2):
        a, b_ = load_tensors(features / block_file(b))[0], load_tensors(tmp_path / "host" / block_file(b))[0]
        assert a.keys() == b_.keys() and all(torch.equal(a[k], b_[k]) for k in a)


def test_choose_staging_by_its_formula():
    """auto: device when n_blocks x sum_d (4 d^2 + 16 d) <= half the free memory, else host."""
    from sfsd.features.stats import choose_staging, staging_bytes

    llama3_8b = [4096, 4096, 4096, 14336]  # attn_in, attn_out, mlp_in, mlp_out
    assert staging_bytes(llama3_8b) == 3 * (4 * 4096**2 + 16 * 4096) + 4 * 14336**2 + 16 * 14336
    assert 32 * staging_bytes(llama3_8b) == 32_762_757_120  # the 33 GB every block would hold on the GPU
    assert choose_staging(32, llama3_8b, 80e9) == "device"
    assert choose_staging(32, llama3_8b, 2 * 32_762_757_120) == "device"  # exactly half: still fits
    assert choose_staging(32, llama3_8b, 2 * 32_762_757_120 - 1) == "host"
    assert choose_staging(32, llama3_8b, 40e9) == "host"
    assert choose_staging(2, [32, 48], 1e6) == "device" and choose_staging(2, [32, 48], 1e4) == "host"


def _live_staging_counter(monkeypatch):
    """Patches InputMoments.update to record, at each call, how many staging buffers exist at once (those
    of the other accumulators still alive, plus the one this batch needs)."""
    from sfsd.features.stats import InputMoments

    seen, peak = [], [0]
    original = InputMoments.update

    def update(self, x, *args, **kwargs):
        if not any(m is self for m in seen):
            seen.append(self)
        alive = sum(m._staged_xxt is not None for m in seen if m is not self)
        peak[0] = max(peak[0], alive + 1)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(InputMoments, "update", update)
    return seen, peak


@pytest.mark.parametrize("flush_every", [1, 3])
def test_host_staging_equals_device_staging_and_hooked_activations(model_and_tokens, monkeypatch, flush_every):
    """Host staging holds one input's buffers at a time (device: all 2 blocks x 4 inputs for the whole pass).
    flush_every 1: the same arithmetic, bit-identical statistics. flush_every 3: host skips the float32 sum
    over 3 batches, so the two differ by at most the rounding of those sums: batches x 2^-23 x sum |x_i x_j|."""
    model, tokens = model_and_tokens
    spec = get_arch("LlamaForCausalLM")
    groups = ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    runs = {}
    for staging in ("device", "host"):
        seen, peak = _live_staging_counter(monkeypatch)
        runs[staging] = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                              batch_size=1, flush_every=flush_every, progress=False,
                                              staging=staging)
        assert peak[0] == (1 if staging == "host" else 2 * 4), staging
        assert len(seen) == 8 and all(m._staged_xxt is None for m in seen)  # freed once the pass is done
        monkeypatch.undo()
    batches = len(TEXTS)  # batch_size 1
    differ = False
    for block in range(2):
        for group, first in [("attn_in", "k_proj"), ("attn_out", "o_proj"), ("mlp_in", "up_proj"),
                             ("mlp_out", "down_proj")]:
            device, host = runs["device"][block][group], runs["host"][block][group]
            assert host.count == device.count == int(tokens["attention_mask"].sum())
            x = hooked(model, spec, tokens, block, first)
            if flush_every == 1:
                for name in ("xxt", "xsum", "xabs"):
                    assert torch.equal(getattr(host, name), getattr(device, name)), (block, group, name)
            else:
                bound = batches * 2.0**-23 * (x.abs().T @ x.abs())
                assert bool(((host.xxt - device.xxt).abs() <= bound).all()), (block, group)
                differ = differ or not torch.equal(host.xxt, device.xxt)
                torch.testing.assert_close(host.xsum, device.xsum, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(host.xxt, x.T @ x, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(host.xsum, x.sum(0), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(host.xabs, x.abs().sum(0), rtol=1e-5, atol=1e-4)
    assert differ == (flush_every > 1)  # the float32 sums over batches are really skipped


def test_auto_staging_follows_the_free_memory(model_and_tokens, monkeypatch):
    """On the CPU, auto stages on the device (here: host memory) while every block's buffers take at most half
    of what is left beside the float64 totals, else host; an unknown value is refused."""
    import sfsd.features.collect as collect
    from sfsd.errors import ConfigError
    from sfsd.features.stats import staging_bytes

    model, _ = model_and_tokens
    spec = get_arch("LlamaForCausalLM")
    groups = ["attn_in", "mlp_out"]  # widths 32 and 48
    totals = 2 * sum(8 * d * d + 16 * d for d in (32, 48))
    staged = 2 * staging_bytes([32, 48])
    monkeypatch.setattr(collect, "host_available", lambda: totals + 2 * staged)
    assert collect.resolve_staging(model, spec, groups, "auto") == "device"
    monkeypatch.setattr(collect, "host_available", lambda: totals + 2 * staged - 1)
    assert collect.resolve_staging(model, spec, groups, "auto") == "host"
    assert collect.resolve_staging(model, spec, groups, "device") == "device"
    with pytest.raises(ConfigError, match="collection.staging 'gpu' is unknown"):
        collect.resolve_staging(model, spec, groups, "gpu")
