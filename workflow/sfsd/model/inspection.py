"""Architectures found by inspection: an ArchSpec read off a transformers causal LM instead of written down.

- blocks: the longest `nn.ModuleList` of same-class modules (model.layers, transformer.h, gpt_neox.layers);
  decoder: the model's `base_model_prefix`; lm_head: the module of `get_output_embeddings()`.
- linears: the `nn.Linear` modules of a block, in the order a forward pass calls them; short name = the
  last part of the path (the whole path with '_' for '.' where two would clash). Every block must hold
  the same Linear paths.
- input groups: Linears whose inputs are bit-identical (`torch.equal`) on a forward pass of a small
  random-weight probe whose norm weights and biases are randomised too (at their initial 1/0 values two
  different norms would give equal outputs). A group is named after its first member, `<first>_in`.
- fused layers (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value) are decomposed as ONE
  Linear: their output covariance is that of the concatenated outputs, the parameter accounting stays
  exact (in*out dense against r*(in+out) factored), and the model's module tree is left as it is.

What inspection cannot decide (LASER's layer-type names per family) is data in `sfsd.model.registry` (LASER_NAMES).
`inspect_architecture(name)` builds the probe from the config class's defaults, shrunk by PROBE_SIZES,
so every stage derives the same spec from the architecture name alone.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from sfsd.errors import ConfigError
from sfsd.model.spec import ArchSpec

# config attributes of a probe (set where the config class has them): a few hundred thousand parameters
PROBE_SIZES = {
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 96, "n_inner": 96, "rotary_dim": 8, "vocab_size": 128,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class InspectionError(ConfigError):
    """A model whose blocks, Linear layers or input groups inspection cannot read."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the longest ModuleList whose members are all of one class: the decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise InspectionError(f"{type(model).__name__}: inspection found no nn.ModuleList of identical blocks")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Path inside the block -> nn.Linear, in module-tree order."""
    return {path: m for path, m in block.named_modules() if isinstance(m, nn.Linear)}


def short_names(paths: list[str]) -> dict[str, str]:
    """Short name -> path: the last part of each path, the whole path ('.' -> '_') where those clash."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {(tail if last.count(tail) == 1 else path.replace(".", "_")): path for tail, path in zip(last, paths)}


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((path for path, m in model.named_modules() if m is target), None) if target is not None else None


def _projection_types(block: nn.Module) -> list[str]:
    """Class names of the block's modules holding a 2-d weight (what stands where Linears would be)."""
    return sorted({type(m).__name__ for m in block.modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2})


def inspect_model(model: nn.Module, probe: nn.Module | None = None, seed: int = 0) -> ArchSpec:
    """The ArchSpec of a causal LM (real weights or the meta device). The forward order and the input
    groups come from a forward pass of `probe` (a small random-weight model of the same class; default:
    `model` itself, which must then hold real weights), on a copy whose 1-d parameters are randomised."""
    name = type(model).__name__
    blocks_path, blocks = find_blocks(model)
    paths = {tuple(block_linears(b)) for b in blocks}
    if len(paths) != 1:
        raise InspectionError(f"{name}: the blocks under {blocks_path} hold different Linear layers; "
                              "add an ArchSpec to sfsd/model/registry.py REGISTRY")
    paths = list(paths.pop())
    if not paths:
        found = ", ".join(_projection_types(blocks[0])) or "none"
        raise InspectionError(f"{name}: inspection found no torch.nn.Linear projections in its blocks "
                              f"({blocks_path}; 2-d weights in: {found}); add an ArchSpec to sfsd/model/registry.py REGISTRY")
    decoder = getattr(model, "base_model_prefix", "") or ""
    if not decoder or not blocks_path.startswith(decoder + ".") or not hasattr(model, decoder):
        raise InspectionError(f"{name}: base_model_prefix {decoder!r} does not hold the blocks {blocks_path}")
    lm_head = _module_path(model, model.get_output_embeddings())
    if not lm_head or not isinstance(model.get_submodule(lm_head), nn.Linear):
        raise InspectionError(f"{name}: inspection found no Linear output embedding (lm_head)")
    order, groups = probe_groups(probe if probe is not None else model, seed)
    if sorted(order) != sorted(paths):
        missed = sorted(set(paths) - set(order))
        raise InspectionError(f"{name}: the probe's forward pass did not call the Linear layers {missed}")
    names = short_names(order)
    short = {path: s for s, path in names.items()}
    return ArchSpec(
        blocks=blocks_path, decoder=decoder, lm_head=lm_head, linears=names,
        input_groups={f"{short[g[0]]}_in": tuple(short[p] for p in g) for g in groups},
    )


def probe_groups(probe: nn.Module, seed: int = 0) -> tuple[list[str], list[tuple[str, ...]]]:
    """(Linear paths inside a block in the order the forward pass calls them, groups of paths whose inputs
    are identical in every block), from one forward pass of a randomised copy of `probe`."""
    _, blocks_orig = find_blocks(probe)
    if any(p.is_meta for p in probe.parameters()):
        raise InspectionError(f"{type(probe).__name__}: the probe is on the meta device; give a model with weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(probe).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:  # norm weights and biases: equal at init, so different norms would agree
                    p.add_(torch.randn_like(p) * 0.5)
        _, blocks = find_blocks(model)
        seen: list[dict[str, torch.Tensor]] = [{} for _ in blocks]
        handles = []
        for b, block in enumerate(blocks):
            for path, layer in block_linears(block).items():
                def hook(_m, inputs, b=b, path=path):
                    seen[b].setdefault(path, inputs[0].detach().clone())
                handles.append(layer.register_forward_pre_hook(hook))
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (2, 7))
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    per_block = []
    for inputs in seen:
        groups: list[list[str]] = []
        for path, x in inputs.items():
            home = next((g for g in groups if inputs[g[0]].shape == x.shape and torch.equal(inputs[g[0]], x)), None)
            if home is None:
                groups.append([path])
            else:
                home.append(path)
        per_block.append([tuple(g) for g in groups])
    if any(g != per_block[0] for g in per_block):
        raise InspectionError(f"{type(probe).__name__}: the blocks' Linear layers share inputs differently "
                              "from block to block; add an ArchSpec to sfsd/model/registry.py REGISTRY")
    return list(seen[0]), per_block[0]


def probe_config(config):
    """A copy of a transformers config shrunk to PROBE_SIZES (where it has those attributes)."""
    small = copy.deepcopy(config)
    for key, value in PROBE_SIZES.items():
        if hasattr(small, key):
            setattr(small, key, value)
    for key in _TOKEN_IDS:  # ids of the full vocabulary would not fit the probe's
        value = getattr(small, key, None)
        if isinstance(value, int) and value >= small.vocab_size:
            setattr(small, key, 0)
        elif isinstance(value, list):
            setattr(small, key, [v if v < small.vocab_size else 0 for v in value])
    return small


@functools.lru_cache(maxsize=None)
def inspect_architecture(architecture: str) -> ArchSpec:
    """The ArchSpec of a transformers CausalLM class, read off a probe built from its config class's
    defaults (PROBE_SIZES). InspectionError naming what was not found."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module) or getattr(cls, "config_class", None) is None:
        raise InspectionError(f"transformers {transformers.__version__} has no model class {architecture!r}")
    config = probe_config(cls.config_class())
    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            probe = cls(config)
        except Exception as err:  # noqa: BLE001 - any failure to build is "cannot inspect"
            raise InspectionError(f"{architecture}: cannot build a small probe from its config class's defaults "
                                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return inspect_model(probe)


__all__ = [
    "InspectionError",
    "PROBE_SIZES",
    "block_linears",
    "find_blocks",
    "inspect_architecture",
    "inspect_model",
    "probe_config",
    "probe_groups",
    "short_names",
]
