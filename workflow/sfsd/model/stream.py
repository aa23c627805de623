"""Models that do not fit: their blocks' weights read from the safetensors shards one block at a time.

- `BlockStream`: the model built without weights (parameters on the meta device, buffers real), the
  modules outside the blocks loaded, and `block(b)` a context that reads block b's own tensors from the
  checkpoint and drops them again on leaving. `WholeModel` offers the same two names for a model that is
  in memory, so a stage that works block by block (the factor cache, compression) has one code path;
  `open_blocks` picks one by `streamed: always|never` (auto is decided before, by the resource planner:
  `sfsd.resources.decide.decide_streamed`).
- `streamed_moments`, block-streamed stage 1: a first pass runs the decoder over every calibration batch
  with each block replaced by a stand-in that records the block's own arguments (the hidden states and,
  per block, the mask and position tables the decoder hands it: Gemma 2 gives alternate layers other
  masks), up to the last block. Then, block by block: its weights are read, it runs on every batch's hidden
  states with the statistics hooks of `sfsd.features.collect` on its Linears, its outputs replace the hidden
  states, and its weights are dropped again. The lm_head is never loaded.

Peak memory of stage 1: one block's weights, the modules before the blocks, and the hidden states of all
calibration tokens (tokens x hidden: 16k tokens of a 4096-wide model in float32 are 256 MB), kept on the
device up to a quarter of its free memory, then in host memory up to a quarter of what is available, then
on disk (`HiddenStates`). Every block sees exactly the tensors the whole-model pass feeds it, batch by batch in the same
order, so the statistics are bit-identical to `collect.collect_input_moments` on the whole model (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sfsd.defaults import choices
from sfsd.errors import ConfigError, DataError
from sfsd.io import checkpoint_index
from sfsd.model.registry import architecture_of, blocks_of, check_linears, get_arch
from sfsd.model.skeleton import without_weights
from sfsd.model.spec import ArchSpec

log = logging.getLogger(__name__)

STREAMED = choices("streamed")  # the `streamed` setting's values, from the config schema


class Checkpoint:
    """The tensors of a safetensors checkpoint folder (one file or shards with an index), read by name."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.folder = Path(model_dir)
        self.files = checkpoint_index(self.folder)

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise DataError(f"{self.folder}: the checkpoint lacks {missing[:3]} (its tensor names differ from the "
                            "model's); set streamed: never to load it whole")
        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.files[n] for n in names}):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    if self.files[name] == path:
                        # a copy: the tensor safetensors gives may hold the whole shard's mapping alive
                        out[name] = f.get_tensor(name).to(device=device, dtype=dtype, copy=True)
        return out


def empty_model(model_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model of `model_dir` with its parameters on the meta device (no memory) and real buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = without_weights(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
    model.tie_weights()  # transformers 5 ties inside init_weights, which init_empty_weights skips
    return model.eval()


def _meta_parameters(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.is_meta]


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameters: {alias: the first name of the same parameter} (a tied lm_head: its embedding)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    model.get_submodule(owner)._parameters[attr] = value


class BlockStream:
    """A model of `model_dir` whose blocks hold weights only inside `block(b)`; the modules outside the
    blocks (embedding, final norm and, with `head`, the lm_head; tied parameters stay tied) are loaded."""

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device,
                 head: bool = True) -> None:
        self.checkpoint = Checkpoint(model_dir)
        self.model = empty_model(model_dir, dtype)
        self.spec = get_arch(architecture_of(self.model.config))
        check_linears(self.model, self.spec, architecture_of(self.model.config))
        self.blocks = blocks_of(self.model, self.spec)
        self.prefix = self.spec.blocks + "."
        self.dtype, self.device = dtype, device
        aliases = _aliases(self.model)
        outside = [n for n in _meta_parameters(self.model) if not n.startswith(self.prefix)
                   and (head or not n.startswith(self.spec.lm_head))]
        self._load(self.model, "", outside)
        for alias, source in aliases.items():
            if source in outside and (head or not alias.startswith(self.spec.lm_head)):
                _set_parameter(self.model, alias, self.model.get_parameter(source))
        for sub in self.model.modules():  # the buffers (rotary tables) on the device
            for name, buf in sub._buffers.items():
                if buf is not None and not buf.is_meta:
                    sub._buffers[name] = buf.to(device)

    def _load(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        tensors = self.checkpoint.read([prefix + n for n in names], self.dtype, self.device)
        module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)

    @contextlib.contextmanager
    def block(self, b: int) -> Iterator[nn.Module]:
        """Block b with its weights; they are dropped (back on the meta device) on leaving."""
        block = self.blocks[b]
        self._load(block, f"{self.prefix}{b}.", _meta_parameters(block))
        try:
            yield block
        finally:
            for module in block.modules():  # the parameters back on the meta device; buffers stay
                for name, p in module._parameters.items():
                    if p is not None:
                        module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            return_freed_memory()


def return_freed_memory() -> None:
    """Hand the memory freed with a block back to the system (glibc's malloc_trim): glibc keeps freed
    blocks of tensors below its moving mmap threshold in its heap, and the resident set then creeps up
    block by block (measured on a 40-block 2.3B model: a peak of 2.65 GB above the start without it, 1.94
    GB with it), or Linear by Linear where each leaves float64 temporaries (the loss criterion). No-op
    without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class WholeModel:
    """A model in memory, with `BlockStream`'s interface: `block(b)` gives block b as it is."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.spec = get_arch(architecture_of(model.config))
        self.blocks = blocks_of(model, self.spec)

    @contextlib.contextmanager
    def block(self, b: int) -> Iterator[nn.Module]:
        yield self.blocks[b]


def host_available(cgroups: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup"),
                   address_limit: int | None = None) -> int:
    """Bytes of host memory this process may still use: the system's available memory, or less where a
    memory cgroup (a SLURM job's --mem, a container; v1 or v2) limits the process, or where an address-space
    limit (`ulimit -v`, RLIMIT_AS; `address_limit` overrides it) is lower. The address-space limit is the
    whole of what a job process may map, its interpreter included, as the planner's needs count it
    (`sfsd.resources.needs.PROCESS_BYTES`). (`cgroups` lists the process's groups, `root` is where they are
    mounted.)"""
    import psutil

    available = psutil.virtual_memory().available
    limit = address_limit if address_limit is not None else _address_limit()
    if limit is not None:
        available = min(available, limit)
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return available
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2
            files = (root / group.lstrip("/") / "memory.max", root / group.lstrip("/") / "memory.current")
        elif "memory" in controllers.split(","):  # v1
            folder = root / "memory" / group.lstrip("/")
            files = (folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = (f.read_text().strip() for f in files)
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                available = min(available, int(limit) - int(used))
        except (OSError, ValueError):
            pass
    return max(available, 0)


def _address_limit() -> int | None:
    """The soft RLIMIT_AS of this process in bytes; None where there is none."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def use_stream(streamed: str) -> bool:
    """The `streamed` setting once decided, always or never (logged). auto is decided before the model is
    opened, by the resource planner (`sfsd.resources.decide.decide_streamed`): it counts what the stage
    holds beside the weights (statistics, hidden states, factors), which this module does not know."""
    if streamed not in ("always", "never"):
        raise ConfigError(f"streamed {streamed!r}: decide auto with sfsd.resources.decide.decide_streamed first "
                          f"(values: {', '.join(STREAMED)})")
    stream = streamed == "always"
    log.info("%s (streamed: %s)", "one block at a time" if stream else "the whole model loaded", streamed)
    return stream


def open_blocks(model_dir: str | os.PathLike, streamed: str, dtype: str = "auto",
                device: str = "cpu") -> BlockStream | WholeModel:
    """The model of `model_dir` for a stage that works block by block, streamed or loaded whole (`streamed`
    always or never, `use_stream`), in the dtype of the `dtype` setting (`loading.run_dtype`: auto = the
    checkpoint's own)."""
    from sfsd.model.loading import check_device_dtype, load_model, resolve_dtype, run_dtype
    from sfsd.model.placement import resolve_device

    torch_device = resolve_device(device)
    name = run_dtype(model_dir, dtype)
    check_device_dtype(name, torch_device)
    if use_stream(streamed):
        return BlockStream(model_dir, resolve_dtype(name), torch_device)
    return WholeModel(load_model(model_dir, dtype=name, device=device)[0])


class HiddenStates:
    """The calibration hidden states between blocks, one tensor per batch: on the device while they take
    at most `device_bytes`, then in host memory up to `host_bytes`, then in files of a temporary folder
    (removed by `close`). A batch keeps its place when it is replaced by a block's output of the same size."""

    def __init__(self, device: torch.device, device_bytes: float, host_bytes: float) -> None:
        self.device, self.limits = device, {"device": device_bytes, "host": host_bytes}
        self.used = {"device": 0, "host": 0, "disk": 0}
        self.where: dict[int, tuple[str, int]] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        self.folder: Path | None = None

    def put(self, i: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        if i in self.where:
            place, old = self.where.pop(i)
            self.used[place] -= old
        place = next((p for p in ("device", "host") if self.used[p] + size <= self.limits[p]), "disk")
        self.used[place] += size
        self.where[i] = (place, size)
        if place == "device":
            self.tensors[i] = x
        elif place == "host":
            self.tensors[i] = x.to("cpu")
        else:
            from safetensors.torch import save_file

            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="sfsd-hidden-"))
            self.tensors.pop(i, None)
            save_file({"x": x.detach().contiguous().cpu()}, str(self.folder / f"{i}.safetensors"))

    def get(self, i: int) -> torch.Tensor:
        if self.where[i][0] == "disk":
            from safetensors.torch import load_file

            return load_file(str(self.folder / f"{i}.safetensors"))["x"].to(self.device)
        return self.tensors[i].to(self.device)

    def close(self) -> None:
        self.tensors.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

HIDDEN_SHARE = 0.25  # of the free device memory (and of the available host memory) for the hidden states


def hidden_budgets(device: torch.device) -> tuple[float, float]:
    """(device bytes, host bytes) the calibration hidden states may take before they move on: a quarter of
    the device's free memory and a quarter of the host's available memory (on the CPU, one budget: the
    host's); past both, they go to disk."""
    host = HIDDEN_SHARE * host_available()
    if device.type == "cuda":
        return HIDDEN_SHARE * torch.cuda.mem_get_info(device)[0], host
    return host, 0.0


class _Done(Exception):
    """Raised by the last block's stand-in: the first pass has what it needs (nothing after the blocks runs)."""


class _Record(nn.Module):
    """Stands in for a block in the first pass: records the block's arguments (and, for the first block,
    its input hidden states, into `states`). It hands the hidden states on as they came; where a decoder
    takes the first element of a block's output (GPT-J), the next stand-in receives a slice instead, which
    does not matter: only the first block's hidden states are kept, and the last stand-in ends the pass."""

    def __init__(self, calls: list, states: HiddenStates | None, last: bool) -> None:
        super().__init__()
        self.calls, self.states, self.last = calls, states, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.states is not None:
            self.states.put(len(self.calls), hidden_states)
        self.calls.append((args, kwargs))
        if self.last:
            raise _Done
        return hidden_states


def streamed_moments(
    model_dir: str | os.PathLike,
    spec: ArchSpec,
    hooks_for: Callable[[int, nn.Module], list],
    batches: list[tuple[torch.Tensor, torch.Tensor, Callable[[], None]]],
    dtype: torch.dtype,
    device: torch.device,
    after_batch: Callable[[int], None] | None = None,
    after_block: Callable[[int], None] | None = None,
    progress: bool = True,
    hidden_bytes: tuple[float, float] | None = None,
) -> int:
    """Run the blocks of `model_dir` one at a time over `batches` ((input_ids, attention_mask, select) on
    `device`; `select()` is called before a batch runs, so the hooks know which tokens are real).
    `hooks_for(block, module)` registers the statistics hooks on a block and returns their handles;
    `after_batch(batch)` runs after each batch of each block, `after_block(block)` after each block (its
    weights already dropped). The hidden states between blocks stay on the device up to `hidden_bytes[0]`,
    then in host memory up to `hidden_bytes[1]`, then on disk (`HiddenStates`; default `hidden_budgets`).
    Returns the number of blocks."""
    stream = BlockStream(model_dir, dtype, device, head=False)
    states = HiddenStates(device, *(hidden_bytes or hidden_budgets(device)))
    try:
        calls = _record_block_arguments(stream, spec, batches, states)
        n_tokens = sum(int(mask.sum()) for _, mask, _ in batches)
        bar = tqdm(total=n_tokens * len(calls), unit="tok", unit_scale=True, disable=not progress,
                   desc="collect (streamed)")
        for b in range(len(calls)):
            with stream.block(b) as block:
                handles = hooks_for(b, block)
                try:
                    with torch.inference_mode():
                        for i, (_, mask, select) in enumerate(batches):
                            select()
                            args, kwargs = calls[b][i]
                            out = block(states.get(i), *args, **kwargs)
                            states.put(i, out[0] if isinstance(out, tuple) else out)
                            bar.update(int(mask.sum()))
                            if after_batch is not None:
                                after_batch(i)
                finally:
                    for h in handles:
                        h.remove()
            calls[b] = []
            if after_block is not None:
                after_block(b)
        bar.close()
    finally:
        states.close()
    return len(calls)


def _record_block_arguments(stream: BlockStream, spec: ArchSpec, batches: list, states: HiddenStates) -> list[list]:
    """The first pass: per block, per batch, the (args, kwargs) the decoder hands it; block 0's input hidden
    states go into `states`. Only the modules before the blocks run."""
    blocks = stream.blocks
    originals = list(blocks)
    calls: list[list] = [[] for _ in originals]
    for i in range(len(originals)):
        blocks[i] = _Record(calls[i], states if i == 0 else None, last=i == len(originals) - 1)
    try:
        with torch.inference_mode():
            for ids, mask, _ in batches:
                try:
                    stream.model.get_submodule(spec.decoder)(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Done:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if states.used["host"] or states.used["disk"]:
        log.info("calibration hidden states: %.3g GB on %s, %.3g GB in host memory, %.3g GB on disk",
                 states.used["device"] / 1e9, states.device, states.used["host"] / 1e9, states.used["disk"] / 1e9)
    return calls
