"""Models built without weights (sfsd/model/skeleton.py): every parameter on the meta device and never
allocated, every buffer real and equal to the normally built model's, torch's constructors restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import build_tiny_model
from sfsd.model.skeleton import CONSTRUCTORS, meta_constructors, without_weights

FAMILIES = ["LlamaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM"]


@pytest.mark.parametrize("architecture", FAMILIES)
def test_parameters_on_meta_and_buffers_as_built(architecture, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(build_tiny_model(tmp_path / "m", architecture))
    real = AutoModelForCausalLM.from_config(config)
    empty = without_weights(lambda: AutoModelForCausalLM.from_config(config))
    empty.tie_weights()  # as its users do: transformers ties inside the initialisation the skeleton skips
    assert all(p.is_meta for p in empty.parameters())
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in real.named_parameters()]
    buffers = dict(real.named_buffers())
    assert buffers, "the families tested carry rotary or scale buffers"
    for name, b in empty.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[name]), name


def test_no_weight_is_allocated(monkeypatch):
    """The constructors a Linear makes its weight with return meta tensors: a Linear whose weight would
    take 64 GB is built without allocating it."""
    layer = without_weights(lambda: nn.Linear(131072, 131072))
    assert layer.weight.is_meta and layer.weight.shape == (131072, 131072)


class ZerosBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(3) + 2, persistent=False)


def test_a_buffer_made_by_a_patched_constructor_is_built_again_for_real():
    module = without_weights(ZerosBuffer)
    assert module.proj.weight.is_meta
    assert not module.count.is_meta and torch.equal(module.count, torch.full((3,), 2.0))


def test_constructors_restored_after_an_error():
    before = {name: getattr(torch, name) for name in CONSTRUCTORS}
    with pytest.raises(RuntimeError), meta_constructors():
        assert torch.empty(2).is_meta
        raise RuntimeError("in the build")
    assert {name: getattr(torch, name) for name in CONSTRUCTORS} == before
    assert not torch.zeros(2).is_meta
