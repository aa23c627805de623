"""Modeling code of a compressed model folder, for transformers' `auto_map` (remote code).

`save_compressed` copies this file into every compressed folder as `modeling_sfsd.py`, with
BASE_ARCHITECTURE set to the model's own class, and points config.json's `auto_map` at it, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

returns the compressed model (and lm-eval's `--model hf --model_args pretrained=<folder>,trust_remote_code=True`
scores it) with no import of the sfsd package. The model is the base architecture's own class with each
factored Linear replaced by a `LowRankLinear` (two thin Linears, `first`: in -> rank, `second`: rank -> out,
with the bias) at the same attribute path; config.json lists them under `sfsd_low_rank`
({module path: [rank, has_bias]}). config.json's model_type is `sfsd_<base model_type>`, so transformers
refuses to load the folder without the remote code instead of loading the dense class half-initialised.

Self-contained: this module imports torch and transformers only (the folder must load where the sfsd
package is not installed). `sfsd.decompose.lowrank` takes `LowRankLinear` from here, so the class has one home.
"""

from __future__ import annotations

import torch
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # set to the saved model's class in each folder's copy
MODEL_TYPE_PREFIX = "sfsd_"


class LowRankLinear(nn.Module):
    """y = second(first(x)): first = nn.Linear(in, rank, bias=False), second = nn.Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factor_modules(model: nn.Module, low_rank: dict) -> None:
    """Replace the dense Linear at each path of `low_rank` ({path: [rank, has_bias]}) by an uninitialised
    LowRankLinear of that rank, on the dense module's device and dtype (the weights are loaded after)."""
    for path, (rank, bias) in low_rank.items():
        dense = model.get_submodule(path)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"sfsd_low_rank names {path}, which is a {type(dense).__name__}, not a Linear layer")
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr,
                LowRankLinear(dense.in_features, dense.out_features, int(rank), bool(bias),
                              device=dense.weight.device, dtype=dense.weight.dtype))


def compressed_classes(base_architecture: str) -> dict[str, type]:
    """The config and model classes of a compressed model of `base_architecture` (a transformers CausalLM
    class name): subclasses of the base ones, the model factored as config.sfsd_low_rank says."""
    import transformers

    base = getattr(transformers, base_architecture)
    base_config = base.config_class

    class SfsdConfig(base_config):
        model_type = MODEL_TYPE_PREFIX + base_config.model_type

        def __init__(self, sfsd_low_rank: dict | None = None, **kwargs):
            self.sfsd_low_rank = dict(sfsd_low_rank or {})
            super().__init__(**kwargs)

    class SfsdForCausalLM(base):
        config_class = SfsdConfig

        def __init__(self, config):
            super().__init__(config)
            factor_modules(self, config.sfsd_low_rank)

    for cls in (SfsdConfig, SfsdForCausalLM):
        cls.__qualname__ = cls.__name__
    return {"SfsdConfig": SfsdConfig, "SfsdForCausalLM": SfsdForCausalLM}


def __getattr__(name: str):
    """`modeling_sfsd.SfsdConfig` / `.SfsdForCausalLM` (the names config.json's auto_map gives), built
    on first use for BASE_ARCHITECTURE."""
    if name in ("SfsdConfig", "SfsdForCausalLM"):
        classes = compressed_classes(BASE_ARCHITECTURE)
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
