"""The configuration's single source of defaults and its reading of block numbers.

- `default("search.delta")`: a setting's default, read from `workflow/schemas/config.schema.yaml`, the
  single source of every default (the rules validate the config against it and the CLI's options take
  their defaults from it); `choices("streamed")`: the values it allows.
- `resolve_block(block, n_blocks)` / `block_range(...)`: the one reading of block numbers (negative ones
  count from the top).
- `resolve_completion(setting, loss_criterion)`: search.complete's `auto` read as spectral or loss.

Small on purpose: every command imports it (its options' defaults), so it imports no other module of the
package but `errors`. The checks of a whole config live in `sfsd.config`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sfsd.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    import yaml

    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"the config schema {SCHEMA_PATH} is missing: install the package from a checkout of "
                          "the workflow (pip install -e .)")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _node(key: str) -> dict:
    node = schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node


def default(key: str):
    """The schema's default of a dotted key (e.g. `search.delta`); KeyError for a key without one."""
    node = _node(key)
    if "default" not in node:
        raise KeyError(f"{key} has no default in {SCHEMA_PATH.name}")
    return node["default"]


def choices(key: str) -> tuple:
    """The values the schema allows for a dotted key (its enum); KeyError for a key without one."""
    node = _node(key)
    if "enum" not in node:
        raise KeyError(f"{key} has no enum in {SCHEMA_PATH.name}")
    return tuple(node["enum"])


def resolve_completion(setting: str, loss_criterion: bool) -> str:
    """search.complete (make-plan --complete) as `spectral` or `loss`: `auto` is loss where the loss
    criterion is made (`loss_criterion`: in the workflow compression.allocations lists loss, see
    `sfsd.config.search_completion`; for make-plan, --loss names its root), else spectral."""
    if setting not in choices("search.complete"):
        raise ConfigError(f"search.complete {setting!r} is unknown; use one of {', '.join(choices('search.complete'))}")
    if setting == "auto":
        return "loss" if loss_criterion else "spectral"
    return setting


def resolve_block(block: int, n_blocks: int) -> int:
    """A configured block number: 0.. from the bottom, negative from the top (-1 = the last block)."""
    return block + n_blocks if block < 0 else block


def block_range(first: int, last: int | None, n_blocks: int, what: str, model: str = "the model") -> range:
    """Blocks first..last (last None = the top block), negative numbers counting from the top; a range
    that is empty or leaves the model is one ConfigError line naming `what` (the config key) and `model`."""
    lo = resolve_block(first, n_blocks)
    hi = n_blocks - 1 if last is None else resolve_block(last, n_blocks)
    if not 0 <= lo <= hi < n_blocks:
        given = f"{first}" if last is None else f"{first} (last_block {last})"
        raise ConfigError(f"{what} {given} is out of range: {model} has blocks 0..{n_blocks - 1} (negative block "
                          "numbers count from the top)")
    return range(lo, hi + 1)
