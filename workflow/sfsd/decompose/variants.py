"""Names of evaluated model variants, in one place (workflow rules, tables, comparisons, figures).

    base                                   the uncompressed model
    <method>-<budget>                      uniform allocation at a parameter budget (e.g. feature-p54)
    <method>-spectral-<budget>             spectral allocation (sfsd.decompose.allocate) at that budget
    <method>-loss-<budget>                 loss allocation (sfsd.decompose.criteria) at that budget
    search-<method>-<mode>-<target>        the surgical search with its tolerance (size not fixed)
    search-<method>-<mode>-<target>-<budget>   the search landed on (or completed to) that budget

Methods are the factor methods of `sfsd.decompose.plan`; budget names are the keys of compression.budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

METHOD_NAMES = ("feature", "weight", "whitened", "asvd")  # plan.FACTOR_METHODS (a test keeps them equal)
ALLOCATIONS = ("uniform", "spectral", "loss", "searched")


@dataclass(frozen=True)
class Variant:
    """kind: base | uniform | spectral | loss | searched (at a budget) | search (tolerance only) | other."""

    kind: str
    method: str | None = None
    budget: str | None = None
    search: str | None = None  # <mode>-<target>

    @property
    def allocation(self) -> str | None:
        return {"uniform": "uniform", "spectral": "spectral", "loss": "loss", "searched": "searched",
                "search": "searched"}.get(self.kind)


def parse_variant(name: str) -> Variant:
    """The parts of a variant name (see the module docstring); unknown shapes are kind 'other'."""
    if name == "base":
        return Variant("base", "baseline")
    parts = name.split("-")
    if parts[0] == "search" and len(parts) in (4, 5) and parts[1] in METHOD_NAMES and all(parts[2:]):
        search = f"{parts[2]}-{parts[3]}"
        return Variant("searched", parts[1], parts[4], search) if len(parts) == 5 else Variant("search", parts[1], None, search)
    if len(parts) == 3 and parts[0] in METHOD_NAMES and parts[1] in ("spectral", "loss") and parts[2]:
        return Variant(parts[1], parts[0], parts[2])
    if len(parts) == 2 and parts[0] in METHOD_NAMES and parts[1]:
        return Variant("uniform", parts[0], parts[1])
    return Variant("other")


def variant_name(method: str, budget: str, allocation: str = "uniform", search: str | None = None) -> str:
    """The variant name of a method at a budget under an allocation (`search` = <mode>-<target>)."""
    if allocation == "uniform":
        return f"{method}-{budget}"
    if allocation in ("spectral", "loss"):
        return f"{method}-{allocation}-{budget}"
    if allocation == "searched" and search:
        return f"search-{method}-{search}-{budget}"
    raise ValueError(f"no variant name for allocation {allocation!r} (search {search!r})")


__all__ = ["ALLOCATIONS", "METHOD_NAMES", "Variant", "parse_variant", "variant_name"]
