"""The allocated plans of `make-plan` from the files they read: the spectral and loss allocations, and a
search cut at a parameter budget.

- `criterion_spectra`: every layer's `allocate.LayerSpectrum` under an allocation's criterion: spectral =
  the energy gains of the factor cache (`factor_cache.factor_spectrum`), loss = the predicted loss
  increase at every rank (`<linear>.loss` of the loss criterion, `criteria.save_loss_spectra`).
- `allocated_plan`: `allocate.spectral_plan` on them; with a search folder, the search's own plan where it
  landed on the budget (`checkpoints/<label>.json`, lowered to the uniform plan's size by `to_size`), else
  its decisions (`feasible_prefix`) kept as they are and the layers it did not decide allocated by the
  criterion (search.complete: spectral or loss).

`to_size` and `feasible_prefix` are pure; the rest reads the files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sfsd.decompose.allocate import LayerSpectrum, curve_spectra, layer_spectra, spectral_plan
from sfsd.decompose.compress import BlockFile
from sfsd.decompose.factor_cache import factor_spectrum
from sfsd.decompose.plan import budget_plan, count_params, largest_fitting, layer_key, new_plan
from sfsd.errors import ConfigError, DataError
from sfsd.features.collect import block_file
from sfsd.io import read_json
from sfsd.model.shapes import ModelShapes
from sfsd.model.spec import ArchSpec

CRITERIA = {"spectral": "energy", "loss": "loss"}  # an allocation -> the criterion `spectral_plan` minimises


def criterion_spectra(
    allocation: str,
    root: str | Path,
    method: str,
    spec: ArchSpec,
    shapes: ModelShapes,
    keys: Iterable[str],
    model_digest: str | None,
    bias_compensation: str,
) -> tuple[dict[str, LayerSpectrum], str | None]:
    """({plan key: LayerSpectrum} of `keys` under `allocation`'s criterion, the calibration digest of the
    files read, None unless they share one). spectral: `root` is the factor cache root (<method>/block_NNN);
    loss: the loss criterion root (<method>/block_NNN, command loss-spectra), made with `bias_compensation`."""
    if allocation not in CRITERIA:
        raise ConfigError(f"allocation {allocation!r} reads no per-layer curves; use {' or '.join(CRITERIA)}")
    files: dict[int, BlockFile] = {}

    def file(block: int) -> BlockFile:
        if block not in files:
            files[block] = BlockFile(Path(root) / method / block_file(block), model_digest)
            made = files[block].metadata.get("settings", {}).get("bias_compensation")
            if allocation == "loss" and made != bias_compensation:
                raise DataError(f"{files[block].path} predicts the loss with bias compensation {made}, not "
                                f"{bias_compensation}; rerun loss-spectra")
        return files[block]

    if allocation == "loss":
        spectra = curve_spectra(spec, shapes, keys, lambda b, n: file(b)[f"{n}.loss"])
    else:
        spectra = layer_spectra(spec, shapes, keys, lambda b, n: factor_spectrum(file(b), n, bias_compensation))
    calibration = {f.metadata.get("calibration_digest") for f in files.values()}
    return spectra, (calibration.pop() if len(calibration) == 1 else None)


def allocated_plan(
    spec: ArchSpec,
    shapes: ModelShapes,
    linears: Sequence[str],
    fraction: float,
    method: str,
    blocks: range,
    allocation: str,
    root: str | Path | None,
    *,
    convention: str,
    groups: str,
    search: str | None = None,
    budget_label: str | None = None,
    **header,
) -> tuple[dict, str | None]:
    """(plan, calibration digest) of `method` at `fraction` over `linears` x `blocks`, its ranks allocated by
    `allocation` (spectral or loss, `criterion_spectra` of `root`). With `search` (a search folder) and
    `budget_label`: that search cut at the budget, the layers it did not decide allocated so (`header`:
    model, model_digest, architecture, bias_compensation)."""
    fixed, uniform, keys = {}, None, [layer_key(b, n) for b in blocks for n in linears]
    if search is not None:
        uniform = budget_plan(spec, shapes, linears, fraction, method, blocks=blocks, convention=convention, **header)
        size = count_params(shapes, uniform)[convention]["compressed"]
        landed = Path(search) / "checkpoints" / f"{budget_label}.json"
        plan = read_json(landed) if landed.is_file() else None
        if plan is not None and plan.get("notes", {}).get("builder") == "search-budget":
            plan = to_size(shapes, plan, size, convention)
            plan["notes"].update({"builder": "searched", "search": search, "completed_layers": 0,
                                  "params_fraction": count_params(shapes, plan)[convention]["fraction"]})
            searched = read_json(Path(search) / "plan.json").get("notes", {}).get("provenance", {})
            return plan, searched.get("calibration_digest")
        decided, order = search_decisions(Path(search))
        fixed = feasible_prefix(decided, order, shapes, keys, method, size, convention, header)
        if len(fixed) < len(order):
            logging.info("the search's first %d of %d decisions fit the budget; the rest is allocated by %s",
                         len(fixed), len(order), allocation)
    spectra, calibration = criterion_spectra(allocation, root, method, spec, shapes, [k for k in keys if k not in fixed],
                                             header.get("model_digest"), header.get("bias_compensation", "intended"))
    plan = spectral_plan(spec, shapes, linears, fraction, method, spectra, blocks=blocks, convention=convention,
                         fixed=fixed, groups=groups, uniform=uniform, criterion=CRITERIA[allocation], **header)
    if search is not None:
        plan["notes"].update({"builder": "searched", "search": search, "completed_layers": len(spectra),
                              "completion": allocation})
    return plan, calibration


def search_decisions(search: Path) -> tuple[dict[str, dict], list[str]]:
    """(the layers of a search's plan.json, their keys in the order the search decided them: its log.jsonl,
    else the plan's own order)."""
    decided = read_json(search / "plan.json")["layers"]
    log_path = search / "log.jsonl"
    order = [json.loads(line)["layer"] for line in log_path.read_text().splitlines()] if log_path.is_file() \
        else list(decided)
    return decided, [k for k in order if k in decided]


def to_size(shapes: ModelShapes, plan: dict, size: int, convention: str) -> dict:
    """A search's plan landed on a budget, its crossing layer's rank lowered (never below the rank the
    search accepted) until the plan keeps at most `size` parameters: the uniform plan's count, which lies
    under the budget by up to a rank step per layer, so every allocation compares at the same size."""
    notes = plan.get("notes", {})
    key, accepted = notes.get("crossing_layer"), notes.get("accepted_rank")
    entry = plan["layers"].get(key, {})
    if entry.get("rank") is None or accepted is None:
        return plan

    def fits(rank: int) -> bool:
        return count_params(shapes, {**plan, "layers": {**plan["layers"], key: {**entry, "rank": rank}}})[convention][
            "compressed"] <= size

    plan["layers"][key] = {**entry, "rank": largest_fitting(fits, min(accepted, entry["rank"]), entry["rank"])}
    return plan


def feasible_prefix(
    decided: Mapping[str, Mapping],
    order: Sequence[str],
    shapes: ModelShapes,
    keys: Iterable[str],
    method: str,
    size: int,
    convention: str,
    header: Mapping,
) -> dict:
    """The search's decisions (`decided`, taken in `order`) up to the last one that still lets the other
    `keys` reach `size` parameters at rank 1 (a search that ends above the budget after covering every
    targeted layer keeps only its top decisions; the completion takes the rest)."""
    keys = list(keys)
    for n in range(len(order), -1, -1):
        fixed = {k: dict(decided[k]) for k in order[:n]}
        trial = new_plan({**{k: {"method": method, "rank": 1} for k in keys if k not in fixed}, **fixed}, **header)
        if count_params(shapes, trial)[convention]["compressed"] <= size:
            return fixed
    return {}


__all__ = ["CRITERIA", "allocated_plan", "criterion_spectra", "feasible_prefix", "search_decisions", "to_size"]
