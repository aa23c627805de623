"""The description of one family of decoder-only transformers: where its blocks, Linear layers and
shared inputs live. Data only; `sfsd.model.registry` holds the known families and
`sfsd.model.inspection` finds a new one's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one family of decoder-only transformers live."""

    blocks: str  # attribute path from the CausalLM to the ModuleList of blocks
    decoder: str  # attribute path to the base model (everything but the lm_head)
    lm_head: str
    # short name -> attribute path inside a block, in forward order
    linears: dict[str, str]
    # name of a shared input -> the Linear layers that read it (first one gets the hook)
    input_groups: dict[str, tuple[str, ...]]
    # LASER's layer-type names (Sharma et al.) -> our short names
    laser_types: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def group_of(self, linear: str) -> str:
        for group, members in self.input_groups.items():
            if linear in members:
                return group
        raise KeyError(linear)

    def param_name(self, block: int, linear: str, kind: str = "weight") -> str:
        """State-dict key of a Linear's weight or bias, e.g. model.layers.3.self_attn.q_proj.weight."""
        return f"{self.blocks}.{block}.{self.linears[linear]}.{kind}"
