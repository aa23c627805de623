"""Architecture registry: the only place that knows where a model keeps its Linear layers.

Algorithms ask this module for "the q_proj of block 3" or "the layers that read the attention
input"; they never spell `model.model.layers[i].self_attn...` themselves.

`get_arch(name)`: an explicit REGISTRY entry first; otherwise the spec found by inspecting the
transformers class (`sfsd.model.inspection`: blocks, Linear layers in forward order, input groups from a
probe's forward pass), completed by what inspection cannot decide, kept here as data (LASER_NAMES). Other per-family facts are
data here too: where perplexity windows put BOS (PPL_BOS, `perplexity_bos`).
Fused Linears (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's query_key_value) are one layer each.
"""

from __future__ import annotations

import torch
from torch import nn

from sfsd.errors import ConfigError
from sfsd.model.spec import ArchSpec


_LLAMA_LINEARS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_LLAMA_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
_LLAMA_LASER = {
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "out_proj": ("o_proj",),
    "fc_in": ("gate_proj",),
    "fc_up": ("up_proj",),
    "fc_out": ("down_proj",),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": tuple(_LLAMA_LINEARS),
    "dont": (),
}

_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    decoder="model",
    lm_head="lm_head",
    linears=_LLAMA_LINEARS,
    input_groups=_LLAMA_GROUPS,
    laser_types=_LLAMA_LASER,
)

# Mistral, Qwen2 and Qwen3 use Llama's module names; grouped-query k/v only changes shapes, and
# Qwen2's q/k/v biases are read from the checkpoint like any other bias.
REGISTRY: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}


# LASER's layer-type names per inspected family (what inspection cannot decide). A family without an
# entry gets each Linear under its own short name, plus `all` and `dont`.
_FUSED_LASER = {"out_proj": ("o_proj",), "fc_in": ("gate_up_proj",), "fc_out": ("down_proj",),
                "attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}
_NEOX_LASER = {"out_proj": ("dense",), "fc_in": ("dense_h_to_4h",), "fc_out": ("dense_4h_to_h",),
               "attn": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")}
_GPTJ_LASER = {"q_proj": ("q_proj",), "k_proj": ("k_proj",), "v_proj": ("v_proj",), "out_proj": ("out_proj",),
               "fc_in": ("fc_in",), "fc_out": ("fc_out",), "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
               "mlp": ("fc_in", "fc_out")}
LASER_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "Gemma2ForCausalLM": _LLAMA_LASER,
    "Olmo2ForCausalLM": _LLAMA_LASER,
    "Phi3ForCausalLM": _FUSED_LASER,
    "GPTNeoXForCausalLM": _NEOX_LASER,
    "GPTJForCausalLM": _GPTJ_LASER,  # LASER's original model (Sharma et al.)
}


def with_laser_names(spec: ArchSpec, architecture: str) -> ArchSpec:
    """An inspected spec completed with its family's LASER names (LASER_NAMES, or one per Linear)."""
    names = dict(LASER_NAMES.get(architecture) or {name: (name,) for name in spec.linears})
    names = {**names, "all": tuple(spec.linears), "dont": ()}
    unknown = sorted({n for members in names.values() for n in members} - set(spec.linears))
    if unknown:
        raise ConfigError(f"LASER_NAMES[{architecture!r}] names {unknown}, not Linear layers of the inspected "
                          f"architecture ({', '.join(spec.linears)}); fix it in sfsd/model/registry.py")
    return ArchSpec(spec.blocks, spec.decoder, spec.lm_head, dict(spec.linears), dict(spec.input_groups), names)


def linear_order(spec: ArchSpec, *, reverse: bool = False) -> tuple[str, ...]:
    """The spec's Linear short names in forward order; reverse=True: the top of a block first (the rank
    search's order inside a block)."""
    names = tuple(spec.linears)
    return names[::-1] if reverse else names


# Every Linear short name the registry knows, in forward order: the order figures list layers in.
LINEAR_ORDER = tuple(dict.fromkeys(name for spec in REGISTRY.values() for name in linear_order(spec)))
# The rank search's default order inside a block (search.order, whose schema default equals it).
SEARCH_ORDER = LINEAR_ORDER[::-1]


# The architectures tested end to end (tests/test_architectures.py), listed by `python -m sfsd architectures`.
SUPPORTED = (*REGISTRY, *LASER_NAMES)


# Where BOS goes when perplexity text is cut into windows (`sfsd.evaluate.perplexity`), per model_type:
# "every_window" = each window is BOS + window-1 text tokens; "first_window" = the text is tokenized once with
# the tokenizer's own special tokens (a Llama tokenizer's BOS opens the first window only: SVD-LLM's protocol).
# Gemma models are trained to see BOS first and fall apart without it (Gemma-3-270M, LAMBADA, 30 windows of 128
# tokens: perplexity 321 with BOS on the first window only, 48 with BOS on every window), so they get it on
# every window, as lm-eval's rolling log-likelihood gives each window its prefix token. A model_type without an
# entry keeps the first-window protocol. `evaluation.perplexity.bos: auto` reads this table.
PPL_BOS_PROTOCOLS = ("every_window", "first_window")
PPL_BOS: dict[str, str] = {
    "gemma": "every_window",
    "gemma2": "every_window",
    "gemma3": "every_window",
    "gemma3_text": "every_window",
}
PPL_BOS_OTHERS = "first_window"


def perplexity_bos(setting: str, model_type: str | None) -> str:
    """The BOS protocol of perplexity windows (one of PPL_BOS_PROTOCOLS): `setting` itself, or for "auto" the
    family's (PPL_BOS by model_type, a compressed folder's `sfsd_` prefix dropped; PPL_BOS_OTHERS otherwise)."""
    from sfsd.model.hf_modeling import MODEL_TYPE_PREFIX

    if setting in PPL_BOS_PROTOCOLS:
        return setting
    if setting != "auto":
        raise ConfigError(f"evaluation.perplexity.bos {setting!r} is unknown; choose auto, "
                          f"{', '.join(PPL_BOS_PROTOCOLS)}")
    return PPL_BOS.get(str(model_type or "").removeprefix(MODEL_TYPE_PREFIX), PPL_BOS_OTHERS)


def get_arch(architecture: str) -> ArchSpec:
    """The ArchSpec of an HF architecture name: REGISTRY first, then inspection of the transformers
    class; ConfigError naming what inspection did not find."""
    if architecture in REGISTRY:
        return REGISTRY[architecture]
    from sfsd.model.inspection import InspectionError, inspect_architecture

    try:
        return with_laser_names(inspect_architecture(architecture), architecture)
    except InspectionError as err:
        reason = str(err).removeprefix(architecture + ": ")
        raise ConfigError(
            f"unsupported architecture {architecture!r}: {reason}; supported: {', '.join(sorted(SUPPORTED))} "
            "and decoders whose blocks inspection can read"
        ) from None


def architecture_of(config) -> str:
    """The HF architecture name of a transformers config (or its dict form)."""
    archs = config.get("architectures") if isinstance(config, dict) else config.architectures
    if not archs:
        raise ConfigError("the model's config.json names no 'architectures'; set it to e.g. ['LlamaForCausalLM']")
    return archs[0]


def select_linears(spec: ArchSpec, keywords: list[str]) -> list[str]:
    """Short names of the Linear layers matched by config keywords (substring match, forward order)."""
    if not keywords:
        raise ConfigError("config 'layers' is empty; name at least one Linear, e.g. [q_proj, down_proj]")
    def matches(keyword: str, name: str) -> bool:  # "q_proj", "proj", or the path "self_attn.q_proj"
        return keyword in name or keyword == spec.linears[name]

    chosen = [name for name in spec.linears if any(matches(k, name) for k in keywords)]
    unmatched = [k for k in keywords if not any(matches(k, name) for name in spec.linears)]
    if unmatched:
        raise ConfigError(
            f"config 'layers' keyword(s) {unmatched} match no Linear layer; available: {', '.join(spec.linears)}"
        )
    return chosen


def groups_for(spec: ArchSpec, linears: list[str]) -> list[str]:
    """Input groups needed to describe the given Linear layers (in forward order)."""
    return [g for g, members in spec.input_groups.items() if any(m in linears for m in members)]


def blocks_of(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.blocks)


def linear_of(model: torch.nn.Module, spec: ArchSpec, block: int, linear: str) -> torch.nn.Linear:
    return blocks_of(model, spec)[block].get_submodule(spec.linears[linear])


def check_linears(model: torch.nn.Module, spec: ArchSpec, architecture: str) -> None:
    """One-line ConfigError unless `model` holds the spec's blocks and, in its first block, a dense Linear
    at each of the spec's paths (an inspected spec is read from the class's default config: a checkpoint
    whose config builds other layers is refused here, before any statistics are collected)."""
    try:
        block = blocks_of(model, spec)[0]
    except (AttributeError, IndexError, TypeError):
        raise ConfigError(f"{architecture}: the model holds no blocks at {spec.blocks}; "
                          "add an ArchSpec to sfsd/model/registry.py REGISTRY") from None

    def is_linear(path: str) -> bool:
        try:
            return isinstance(block.get_submodule(path), nn.Linear)
        except AttributeError:
            return False

    missing = [name for name, path in spec.linears.items() if not is_linear(path)]
    if missing:
        raise ConfigError(f"{architecture}: this model's config builds no dense Linear at {missing} "
                          f"({', '.join(spec.linears[n] for n in missing)}) where its architecture has them; "
                          "add an ArchSpec to sfsd/model/registry.py REGISTRY")
