"""The factored Linear and where it goes: `from_factors` (a `LowRankLinear`, whose one home is
`sfsd.model.hf_modeling`, the modeling code compressed folders carry), the module paths of a model's Linear layers
(`linear_path`, `replace_module`, `linear_shapes`), and the factor cut (`cut_factors`, `cut_module`):
the factors at any rank sliced from a full-rank factor-cache entry (`sfsd.decompose.factor_cache`).

Shared by the compress stage (`sfsd.decompose.compress`, `sfsd.decompose.factor_cache`) and the rank search (`sfsd.search.algorithm`),
which swaps candidate layers in and out of a model in memory; no file access here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sfsd.decompose.methods import Factors, feature_bias
from sfsd.errors import ConfigError
from sfsd.model.hf_modeling import LowRankLinear
from sfsd.model.registry import blocks_of
from sfsd.model.spec import ArchSpec


def from_factors(factors: Factors) -> LowRankLinear:
    """A LowRankLinear holding exactly the given factors (their dtype and device)."""
    first, second = factors.first, factors.second
    module = LowRankLinear(first.shape[1], second.shape[0], first.shape[0], factors.bias is not None,
                           device=first.device, dtype=first.dtype)
    with torch.no_grad():
        module.first.weight.copy_(first)
        module.second.weight.copy_(second)
        if factors.bias is not None:
            module.second.bias.copy_(factors.bias)
    return module


def linear_path(spec: ArchSpec, block: int, linear: str) -> str:
    """Module path of a Linear inside the CausalLM, e.g. model.layers.3.self_attn.q_proj."""
    return f"{spec.blocks}.{block}.{spec.linears[linear]}"


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted attribute `path` (setattr on its parent)."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def linear_shapes(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each short Linear name, read from block 0 (dense or factored)."""
    block = blocks_of(model, spec)[0]
    out = {}
    for name, path in spec.linears.items():
        mod = block.get_submodule(path)
        out[name] = (mod.out_features, mod.in_features)
    return out


def cut_factors(cache: Mapping[str, torch.Tensor], method: str, rank: int,
                bias_compensation: str = "intended") -> Factors:
    """Factors at `rank` from a full-rank cache entry (`factor_cache.full_rank_factors`) by slicing; the
    feature-space bias, which depends on the rank, is rebuilt (`methods.feature_bias`)."""
    if not 1 <= rank <= cache["first"].shape[0]:
        raise ConfigError(f"rank {rank} is not in the cache (1..{cache['first'].shape[0]})")
    first, second = cache["first"][:rank], cache["second"][:, :rank]
    bias = cache.get("bias")
    if method == "feature":
        mean = None if bias_compensation == "none" else cache["mean"]
        new = feature_bias(second.double(), mean, bias, bias_compensation)
        bias = None if new is None else new.to(first.dtype)
    return Factors(first, second, bias)


def cut_module(cache: Mapping[str, torch.Tensor], method: str, rank: int, bias_compensation: str,
               like: nn.Linear) -> LowRankLinear:
    """`cut_factors` as a LowRankLinear in the dtype and on the device of the Linear it replaces."""
    f = cut_factors(cache, method, rank, bias_compensation)
    f = Factors(*(None if t is None else t.to(like.weight.device, like.weight.dtype) for t in (f.first, f.second, f.bias)))
    return from_factors(f)


__all__ = ["LowRankLinear", "cut_factors", "cut_module", "linear_path", "linear_shapes", "replace_module"]
