"""Architecture registry and atomic I/O."""

import pytest
import torch

from helpers import build_tiny_model
from sfsd.errors import ConfigError, DataError
from sfsd.io import atomic_path, checkpoint_index, load_tensors, save_tensors
from sfsd.model.registry import REGISTRY, get_arch, select_linears


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_registry_names_exist_in_real_checkpoints(tmp_path, architecture):
    folder = build_tiny_model(tmp_path, architecture)
    names = set(checkpoint_index(folder))
    spec = get_arch(architecture)
    for block in range(2):
        for linear in spec.linears:
            assert spec.param_name(block, linear) in names
    if architecture == "Qwen2ForCausalLM":  # q/k/v biases are found through the same names
        assert spec.param_name(0, "q_proj", "bias") in names


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*MistralForCausalLM"):
        get_arch("GPT2LMHeadModel")


def test_layer_keywords():
    spec = REGISTRY["LlamaForCausalLM"]
    assert select_linears(spec, ["q_proj", "down"]) == ["q_proj", "down_proj"]
    assert select_linears(spec, ["proj"]) == list(spec.linears)
    with pytest.raises(ConfigError, match=r"\['attn_q'\] match no Linear"):
        select_linears(spec, ["q_proj", "attn_q"])
    with pytest.raises(ConfigError, match="empty"):
        select_linears(spec, [])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.ones(100, 100)}, {"block": 0})
    tensors, meta = load_tensors(path)
    assert meta == {"block": 0}
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_tensors(path)


def test_a_block_file_maps_its_file_once_for_every_tensor_read(tmp_path):
    """The rank search reads a factor-cache block one tensor at a time and keeps them: one mapping of the
    file for all of them (a mapping per read held 15 x 88 MB of address space at the paper-scale run);
    a tensor the file lacks and a truncated file are each a DataError."""
    from sfsd.decompose.compress import BlockFile

    path = tmp_path / "block_000.safetensors"
    save_tensors(path, {f"t{i}": torch.full((64, 64), float(i)) for i in range(6)}, {"model_digest": "d"})

    def mappings() -> int:
        return sum(str(path) in line for line in open("/proc/self/maps"))

    block = BlockFile(path, "d")
    held = [block[f"t{i}"] for i in range(6)]
    assert [float(t[0, 0]) for t in held] == [0, 1, 2, 3, 4, 5] and block["t2"] is held[2]
    assert mappings() == 1
    with pytest.raises(DataError, match=r"lacks tensors \['t9'\]"):
        block["t9"]
    with pytest.raises(DataError, match="another model"):
        BlockFile(path, "other")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match="corrupt or truncated"):
        BlockFile(path, None)["t0"]
