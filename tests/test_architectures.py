"""Decoders found by inspection (sfsd.model.inspection) and the registry: per architecture, on a tiny random
model of its transformers config class, the collected statistics equal hooked activations, the factors at
full rank reproduce the logits, and a compressed model saves and loads to the same logits; the stage
commands on two families with other Linear names."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from helpers import STAT_TEXTS, TINY_CONFIGS, base_config, build_tiny_model, python_without_sfsd, run_cli, stage_tensors
from sfsd import config as sfsd_config
from sfsd.cli.main import main as sfsd_main
from sfsd.decompose.compress import apply_plan, factors_for, load_compressed, save_compressed
from sfsd.decompose.lowrank import from_factors, replace_module
from sfsd.decompose.methods import max_rank
from sfsd.decompose.plan import count_params, new_plan
from sfsd.errors import ConfigError
from sfsd.features.calibration import tokenize
from sfsd.features.collect import collect_input_moments
from sfsd.model.inspection import inspect_architecture, inspect_model, short_names
from sfsd.model.loading import load_model
from sfsd.model.registry import REGISTRY, SEARCH_ORDER, SUPPORTED, check_linears, get_arch, groups_for, linear_of
from sfsd.model.shapes import model_shapes
from sfsd.search.algorithm import search_order

# architecture -> its Linear short names and input groups (members), as inspection must find them
LLAMA_GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
EXPECTED = {
    **{name: LLAMA_GROUPS for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                       "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM")},
    "Phi3ForCausalLM": [("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)],
    "GPTNeoXForCausalLM": [("query_key_value",), ("dense",), ("dense_h_to_4h",), ("dense_4h_to_h",)],
    # GPT-J: attention and MLP read the same ln_1 output (parallel block)
    "GPTJForCausalLM": [("q_proj", "k_proj", "v_proj", "fc_in"), ("out_proj",), ("fc_out",)],
}
METHODS = ("feature", "whitened", "asvd", "weight")


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).logits


def _hooked_inputs(model, spec, tokens, block):
    """Each Linear's input over the real (unpadded) tokens, by plain hooks on one forward pass."""
    seen, handles = {}, []
    for name in spec.linears:
        hook = (lambda name: lambda _m, inputs: seen.setdefault(name, inputs[0].detach()))(name)
        handles.append(linear_of(model, spec, block, name).register_forward_pre_hook(hook))
    _logits(model, tokens)
    for h in handles:
        h.remove()
    keep = tokens["attention_mask"].reshape(-1).bool()
    return {n: x.reshape(-1, x.shape[-1])[keep].double() for n, x in seen.items()}


def test_every_supported_architecture_has_a_tiny_model_and_expected_groups():
    assert set(SUPPORTED) == set(TINY_CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("architecture", sorted(EXPECTED))
def test_statistics_full_rank_and_save_load(tmp_path, architecture):
    folder = build_tiny_model(tmp_path / "model", architecture)
    model, tokenizer = load_model(folder, device="cpu")
    spec = get_arch(architecture)
    assert list(spec.input_groups.values()) == EXPECTED[architecture]
    assert spec.linears == inspect_model(model).linears  # the loaded model itself reads the same
    assert [tuple(g) for g in inspect_model(model).input_groups.values()] == EXPECTED[architecture]
    assert spec.laser_types["all"] == tuple(spec.linears) and spec.laser_types["dont"] == ()
    tokens = tokenize(STAT_TEXTS, tokenizer, seq_len=40)
    linears = list(spec.linears)
    groups = groups_for(spec, linears)
    moments = collect_input_moments(model, spec, groups, tokens["input_ids"], tokens["attention_mask"],
                                    batch_size=3, progress=False)
    full = copy.deepcopy(model)
    for b, per_block in enumerate(moments):
        hooked = _hooked_inputs(model, spec, tokens, b)
        for g, acc in per_block.items():
            for member in spec.input_groups[g]:  # every member reads what the hook on the first one saw
                x = hooked[member]
                assert acc.count == x.shape[0]
                torch.testing.assert_close(acc.xsum, x.sum(0), rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(acc.xxt, x.T @ x, rtol=1e-5, atol=1e-4)
    features, eigen = stage_tensors(model, spec, linears, moments)
    for b in range(len(moments)):
        for name in linears:
            layer = linear_of(model, spec, b, name)
            with torch.no_grad():  # feature space at full rank (out): the layer exactly
                bias = None if layer.bias is None else layer.bias.detach()
                factors, _ = factors_for(layer.weight.detach(), bias, "feature", layer.out_features, eigen=eigen[b],
                                         linear=name, block=b)
            replace_module(full, f"{spec.blocks}.{b}.{spec.linears[name]}", from_factors(factors))
    base = _logits(model, tokens)
    torch.testing.assert_close(_logits(full, tokens), base, rtol=1e-4, atol=1e-4)

    # every Linear factored (just below kappa, methods in turn), then saved and loaded: the same logits
    shapes = model_shapes(model)
    layers = {f"{b}.{name}": {"method": METHODS[(b + i) % len(METHODS)],
                              "rank": max_rank(shapes.linears[name][1], shapes.linears[name][0]) - 1}
              for b in range(shapes.n_blocks) for i, name in enumerate(linears)}
    plan = new_plan(layers, model="tiny", architecture=architecture)
    compressed = copy.deepcopy(model)
    apply_plan(compressed, spec, plan, eigen, features)
    before = _logits(compressed, tokens)
    assert torch.isfinite(before).all()
    out = save_compressed(compressed, plan, tmp_path / "compressed", tokenizer=tokenizer)
    loaded, saved_plan = load_compressed(out)
    assert torch.equal(_logits(loaded, tokens), before)
    assert sum(p.numel() for p in loaded.parameters()) == count_params(shapes, saved_plan)["model"]["compressed"]


@pytest.mark.parametrize("architecture", sorted(REGISTRY))
def test_inspection_reproduces_the_registry(architecture):
    spec, found = REGISTRY[architecture], inspect_architecture(architecture)
    assert (found.blocks, found.decoder, found.lm_head) == (spec.blocks, spec.decoder, spec.lm_head)
    assert found.linears == spec.linears
    assert list(found.input_groups.values()) == list(spec.input_groups.values())


def test_short_names_fall_back_to_paths_on_a_clash():
    assert short_names(["attn.dense", "mlp.dense", "mlp.fc"]) == {
        "attn_dense": "attn.dense", "mlp_dense": "mlp.dense", "fc": "mlp.fc"}


def test_gpt2_is_refused_naming_its_conv1d():
    with pytest.raises(ConfigError, match=r"unsupported architecture 'GPT2LMHeadModel': .*no torch.nn.Linear"
                                          r".*transformer.h.*Conv1D") as err:
        get_arch("GPT2LMHeadModel")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="has no model class 'NoSuchForCausalLM'"):
        get_arch("NoSuchForCausalLM")


def test_architectures_command_lists_every_supported_row():
    proc = run_cli("architectures")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for architecture, groups in EXPECTED.items():
        spec = get_arch(architecture)
        assert architecture in out and spec.blocks in out
        for group in groups:
            assert " ".join(group) in out, (architecture, group)
        for lname, members in spec.laser_types.items():
            assert lname in out
    assert "gpt_neox.layers" in out and "transformer.h" in out and "attention.query_key_value" in out


def test_config_check_accepts_an_inspected_model(tmp_path, calibration_text_file):
    folder = build_tiny_model(tmp_path / "gptj", "GPTJForCausalLM")
    config = {**base_config(folder, calibration_text_file), "layers": ["q_proj", "out_proj", "fc_in", "fc_out"]}
    sfsd_config.validate(config)
    sfsd_config.check_config(config, root=tmp_path)


def test_default_search_order_adapts_to_other_layer_names():
    """search.order's default spells Llama's names; for GPT-J it means GPT-J's forward order reversed."""
    spec = get_arch("GPTJForCausalLM")
    assert search_order(spec, 2, spec.linears, 0, order=SEARCH_ORDER)[:6] == [
        (1, n) for n in ("fc_out", "fc_in", "out_proj", "v_proj", "k_proj", "q_proj")]
    with pytest.raises(ConfigError, match=r"search.order names \['o_proj'\]"):
        search_order(spec, 2, spec.linears, 0, order=["o_proj", *spec.linears])


@pytest.mark.parametrize("architecture", ["GPTNeoXForCausalLM", "GPTJForCausalLM"])
def test_stage_commands_on_an_inspected_model(tmp_path, calibration_text_file, architecture):
    """The stage commands (calibration to compressed folder) on a family with other Linear names: each
    stage derives the spec from the architecture name; transformers alone loads the result."""
    model_dir = build_tiny_model(tmp_path / "model", architecture)
    layers = ",".join(get_arch(architecture).linears)
    results, texts, tokens = tmp_path / "results", tmp_path / "texts.jsonl", tmp_path / "tokens.safetensors"
    settings = json.dumps({"source": "text_file", "path": str(calibration_text_file), "num_samples": 8})
    common, mdir = ["--threads", "1"], ["--model-dir", str(model_dir)]
    assert sfsd_main(["calibration-texts", "--settings", settings, "--out", str(texts)]) == 0
    assert sfsd_main([*common, "tokenize", *mdir, "--texts", str(texts), "--seq-len", "32", "--out", str(tokens)]) == 0
    assert sfsd_main([*common, "collect", *mdir, "--model-name", "tiny", "--tokens", str(tokens), "--layers", layers,
                      "--device", "cpu", "--batch-size", "4", "--out", str(results / "features")]) == 0
    for b in range(2):
        name = f"block_{b:03d}.safetensors"
        assert sfsd_main([*common, "eigen", "--features", str(results / "features" / name), "--model-dir",
                          str(model_dir), "--layers", layers, "--out", str(results / "eigen" / name)]) == 0
    assert sfsd_main([*common, "factor-cache", "--model-dir", str(model_dir), "--results", str(results), "--method",
                      "feature", "--layers", layers, "--out", str(results / "factors" / "feature")]) == 0
    plan = tmp_path / "plan.json"
    assert sfsd_main([*common, "make-plan", *mdir, "--model-name", "tiny", "--method", "feature",
                      "--params-fraction", "0.9", "--first-block", "0", "--layers", layers, "--out", str(plan)]) == 0
    out = tmp_path / "compressed"
    assert sfsd_main([*common, "compress", "--model-dir", str(model_dir), "--plan", str(plan), "--factors",
                      str(results / "factors"), "--out", str(out)]) == 0
    model, saved = load_compressed(out)
    assert any(e["method"] == "feature" for e in saved["layers"].values())
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    proc = python_without_sfsd(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            print("identical:", torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"]))
    """)
    assert proc.returncode == 0 and "identical: True" in proc.stdout, proc.stderr[-3000:]


def test_a_model_without_the_specs_linears_is_refused(tiny_llama):
    """An inspected spec comes from the class's default config; a model (or checkpoint config) that builds
    other layers is one line, before any statistics."""
    model, _ = load_model(tiny_llama, device="cpu")
    check_linears(model, get_arch("LlamaForCausalLM"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match=r"GPTJForCausalLM: the model holds no blocks at transformer.h"):
        check_linears(model, get_arch("GPTJForCausalLM"), "GPTJForCausalLM")
    spec = get_arch("Gemma2ForCausalLM")
    other = replace(spec, linears={**spec.linears, "q_proj": "self_attn.qkv"})
    with pytest.raises(ConfigError, match=r"builds no dense Linear at \['q_proj'\] \(self_attn.qkv\)"):
        check_linears(model, other, "Gemma2ForCausalLM")


def test_a_meta_model_is_read_with_a_tiny_probe(tmp_path):
    """The module tree comes from the model (here on the meta device), the forward order and the input
    groups from a small probe of the same class."""
    import transformers

    model, _ = load_model(build_tiny_model(tmp_path, "GPTNeoXForCausalLM"), device="cpu")
    with torch.device("meta"):
        big = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, vocab_size=100))
    with pytest.raises(ConfigError, match="meta device"):
        inspect_model(big)
    spec = inspect_model(big, probe=model)
    assert spec.blocks == "gpt_neox.layers" and spec.decoder == "gpt_neox"
    assert list(spec.input_groups.values()) == EXPECTED["GPTNeoXForCausalLM"]
