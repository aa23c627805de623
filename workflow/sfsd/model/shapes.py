"""A dense model's shapes, read from its config on the meta device (no weights): the Linear layers of
a block, which carry a bias, the parameter count and the lm_head. The parameter accountant
(`sfsd.decompose.plan`) and the resource planner read them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sfsd.errors import ConfigError, DataError
from sfsd.model.registry import architecture_of, blocks_of, get_arch

Shapes = Mapping[str, tuple[int, int]]  # short linear name -> (out_features, in_features), as weight.shape


@dataclass(frozen=True)
class ModelShapes:
    """What the accountant needs to know about a dense model.

    `linears` maps each short Linear name of the registry to (out_features, in_features), the same
    in every block; `biases` says which of them carry a bias. `total_params` counts every parameter
    once (tied embeddings once), `lm_head` is the output projection's (out, in)."""

    architecture: str
    n_blocks: int
    linears: dict[str, tuple[int, int]]
    biases: dict[str, bool]
    total_params: int
    lm_head: tuple[int, int]

    def decoder_linear_params(self) -> int:
        """Parameters (weights and biases) of the decoder's Linear layers, dense."""
        return self.n_blocks * sum(o * i + (o if self.biases[n] else 0) for n, (o, i) in self.linears.items())


def _arch_and_config(source):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, Mapping):
        d = dict(source)
        if "model_type" not in d:
            raise ConfigError("a config dict needs 'model_type' (as in config.json)")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if isinstance(source, (str, os.PathLike)):
        return AutoConfig.from_pretrained(source)
    raise TypeError(f"cannot read model shapes from {type(source).__name__}")


def meta_model(source) -> torch.nn.Module:
    """The model of a transformers config (object or config.json dict) or a model folder, instantiated on
    the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config = _arch_and_config(source)
    get_arch(architecture_of(config))  # unsupported architecture fails here
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shapes(source) -> ModelShapes:
    """ModelShapes of a DENSE model: an nn.Module, a transformers config (object or config.json dict),
    or a model folder. Configs are instantiated on the meta device (no memory, no weights)."""
    model = source if isinstance(source, torch.nn.Module) else meta_model(source)
    architecture = architecture_of(model.config)
    spec = get_arch(architecture)
    blocks = blocks_of(model, spec)
    linears: dict[str, tuple[int, int]] = {}
    biases: dict[str, bool] = {}
    for b, block in enumerate(blocks):
        for name, path in spec.linears.items():
            mod = block.get_submodule(path)
            if not isinstance(mod, torch.nn.Linear):
                raise ConfigError(f"block {b} {name} is a {type(mod).__name__}, not a dense Linear; "
                                  "model_shapes needs the uncompressed model (or its config)")
            shape, bias = (mod.out_features, mod.in_features), mod.bias is not None
            if linears.setdefault(name, shape) != shape or biases.setdefault(name, bias) != bias:
                raise DataError(f"block {b} {name} has shape {shape}, unlike block 0's {linears[name]}; "
                                "models with per-block shapes are not supported")
    head = model.get_submodule(spec.lm_head)
    return ModelShapes(
        architecture=architecture,
        n_blocks=len(blocks),
        linears=linears,
        biases=biases,
        total_params=sum(p.numel() for p in model.parameters()),
        lm_head=(head.out_features, head.in_features),
    )
