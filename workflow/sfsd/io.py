"""All file access of the library: atomic writes, safetensors with metadata, checkpoint weights.

Every writer goes through a temporary name in the same folder and an os.replace, so a job killed
mid-write leaves no file under the final name that a rerun could mistake for a finished output; what it
renames gets the permissions the umask gives ordinary files (`share_permissions`), not the private ones of
a temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sfsd.errors import DataError


def umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only be read by
    setting it, which would briefly give files made by other threads other permissions)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def share_permissions(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions the umask gives what open() and
    mkdir() make: mkstemp and mkdtemp make 0600 files and 0700 folders (as do some writers inside a folder,
    e.g. transformers' save_pretrained), which others could not read in a shared results folder. Folders and
    executable files get 0777, other files 0666, less the umask (0755 and 0644 under umask 022)."""
    mask = umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in items:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o100
        os.chmod(item, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to `path` (with the umask's permissions,
    `share_permissions`), on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        share_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` as a whole, it and everything in it
    with the umask's permissions (`share_permissions`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        share_permissions(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"missing file {path}; run the stage that makes it first") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it and rerun its stage") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict,
                 raw: dict[str, str] | None = None) -> None:
    """Save tensors atomically; metadata values are JSON-encoded (safetensors only stores strings), those
    of `raw` stored as they are (e.g. {"format": "pt"}, which other readers of model.safetensors expect)."""
    meta = {**{k: json.dumps(v) for k, v in metadata.items()}, **dict(raw or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors (all, or `keys`) and the decoded metadata; a corrupt file is a DataError."""
    f = TensorFile(path)
    names = keys if keys is not None else list(f.keys)
    missing = [k for k in names if k not in f]
    if missing:
        raise DataError(f"{f.path} lacks tensors {missing[:3]}; it was made by another config, delete and rerun")
    return {k: f[k] for k in names}, f.metadata


class TensorFile:
    """One safetensors file open for reading tensor by tensor. Every tensor read shares the file's one
    mapping: a safe_open per read maps the whole file again and each tensor keeps its mapping alive, so
    the rank search, reading a block's factors one Linear at a time, held 15 mappings of one 88 MB file
    (1.3 GB of address space, which an address-space limit counts). A missing, corrupt or truncated file,
    or a tensor it lacks, is a DataError."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"missing file {self.path}; run the stage that makes it first")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self.keys: list[str] = list(self._file.keys())  # in the file's order
            self.metadata = _decoded(self._file.metadata())
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{self.path} is corrupt or truncated ({err}); delete it and rerun its stage") from None
        self._names = frozenset(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise DataError(f"{self.path} lacks tensors {[key]}; it was made by another config, delete and rerun")
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{self.path} is corrupt or truncated ({err}); delete it and rerun its stage") from None


def _decoded(metadata: dict | None) -> dict:
    """Metadata as save_tensors wrote it: JSON values decoded, raw strings (not JSON) kept as they are."""
    out = {}
    for key, value in (metadata or {}).items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a safetensors file, from its header alone (opening the file as torch tensors maps it,
    twice over for a moment: a 3 GB file then takes 6 GB of address space)."""
    if not Path(path).exists():
        raise DataError(f"missing file {path}; run the stage that makes it first")
    try:
        header = json.loads(safetensors_header(path))
    except DataError:
        raise DataError(f"{path} is corrupt or truncated; delete it and rerun its stage") from None
    return _decoded(header.get("__metadata__") or {})


def shard_bytes_of(model_dir: str | os.PathLike) -> int:
    """The weight-shard size to write a model derived from the checkpoint in `model_dir` with: its largest
    safetensors file, at most `MAX_SHARD_BYTES` (a reader that could open the source's shards opens these)."""
    files = [p.stat().st_size for p in Path(model_dir).glob("*.safetensors")]
    return min(MAX_SHARD_BYTES, max(files)) if files else MAX_SHARD_BYTES


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # weight shards written of at most 5 GiB (a single larger tensor: a shard of its own)


class ShardWriter:
    """Writes a checkpoint's tensors into `folder` shard by shard, as transformers does: one
    model.safetensors when they fit in `max_bytes`, else model-0000i-of-0000n.safetensors and
    model.safetensors.index.json. A shard is written as soon as the next tensor would take it past
    `max_bytes` (a larger tensor gets a shard of its own), so a caller that adds one block at a time holds
    at most one shard and one block. `metadata` (JSON values)
    goes into the single file's header or the index's "metadata"; every shard carries `raw` ({"format":
    "pt"}, which transformers checks)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int, raw: dict[str, str] | None = None) -> None:
        self.folder, self.max_bytes, self.raw = Path(folder), max_bytes, dict(raw or {})
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # names per written shard
        self.names: set[str] = set()
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name} added twice")
            if t.is_meta:
                raise ValueError(f"tensor {name} has no data (meta device)")
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t.detach()
            self.names.add(name)
            self.pending_bytes += size
            self.total += size

    def _shard_path(self, i: int) -> Path:
        return self.folder / f".shard-{i:05d}.safetensors"

    def _flush(self) -> None:
        if self.pending:
            with atomic_path(self._shard_path(len(self.shards))) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in self.pending.items()}, str(tmp), metadata=self.raw)
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self, metadata: dict) -> list[Path]:
        """Write what is pending and the index; returns the weight files."""
        if not self.shards:
            save_tensors(self.folder / SINGLE_FILE, self.pending, metadata, raw=self.raw)
            self.pending = {}
            return [self.folder / SINGLE_FILE]
        self._flush()
        n, weight_map, files = len(self.shards), {}, []
        for i, names in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._shard_path(i), final)
            weight_map.update({name: final.name for name in names})
            files.append(final)
        write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": self.total, **metadata},
                                              "weight_map": weight_map})
        return files


def checkpoint_metadata(model_dir: str | os.PathLike) -> dict:
    """The metadata a `ShardWriter` wrote: the index's (without total_size) or the single file's (without
    the raw "format" every shard carries), so both layouts give the same dict."""
    index = Path(model_dir) / INDEX_FILE
    if index.exists():
        return {k: v for k, v in read_json(index).get("metadata", {}).items() if k != "total_size"}
    return {k: v for k, v in read_metadata(Path(model_dir) / SINGLE_FILE).items() if k != "format"}


def safetensors_header(path: str | os.PathLike) -> bytes:
    """The raw JSON header of a safetensors file, after checking that the file is exactly as long as
    the header says: a truncated copy or download is a DataError naming the file, not a traceback
    from deep inside a model loader. Reads only the header (cheap even for a 10 GB shard)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= header_len <= size - 8:
                raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
            raw = f.read(header_len)
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        raise DataError(f"missing file {path}; run the stage that makes it first") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise DataError(f"{path} is not a valid safetensors file ({err}); delete it and make it again") from None
    if 8 + header_len + end != size:
        raise DataError(f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes, the file "
                        f"has {size}; delete it and copy, download or make it again")
    return raw


def checkpoint_index(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every parameter name of a HF checkpoint folder to the safetensors file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index)["weight_map"]
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise DataError(
            f"{model_dir} holds no model.safetensors (or its index); save the model with safe_serialization=True"
        )
    header = json.loads(safetensors_header(single))
    return {name: single for name in header if name != "__metadata__"}


def check_checkpoint(model_dir: str | os.PathLike) -> None:
    """DataError unless every safetensors file of the checkpoint is present and complete."""
    for file in sorted(set(checkpoint_index(model_dir).values())):
        safetensors_header(file)


def read_parameters(
    model_dir: str | os.PathLike, names: list[str], index: dict[str, Path] | None = None
) -> dict[str, torch.Tensor]:
    """Read a few parameters of a checkpoint without loading the model (a 7B model stays on disk).
    `index`: the checkpoint_index of model_dir, when the caller already has it."""
    index = checkpoint_index(model_dir) if index is None else index
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"checkpoint {model_dir} has no parameter(s) {missing[:3]}")
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    out = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out


def has_parameter(model_dir: str | os.PathLike, name: str) -> bool:
    return name in checkpoint_index(model_dir)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir: str | os.PathLike, samples: int = 64, chunk: int = 1 << 16) -> str:
    """Cheap identity of a checkpoint: its config, every safetensors header (names, shapes, offsets),
    file size, and `samples` chunks of the weights at fixed, evenly spaced offsets (all of a small
    file). The weight samples tell apart two checkpoints of one architecture (a base model and its
    fine-tune share every header); hashing all 13 GB of a 7B model on every job would cost minutes."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise DataError(f"{model_dir} is not a model folder (no config.json); fix models.<name>.path")
    h = hashlib.sha256(config.read_bytes())
    for file in sorted(set(checkpoint_index(model_dir).values())):
        header = safetensors_header(file)  # also refuses a truncated shard
        size = file.stat().st_size
        h.update(header)
        h.update(str(size).encode())
        start = 8 + len(header)
        with open(file, "rb") as f:
            if size - start <= samples * chunk:
                f.seek(start)
                h.update(f.read())
            else:
                step = (size - start - chunk) // (samples - 1)
                for i in range(samples):
                    f.seek(start + i * step)
                    h.update(f.read(chunk))
    return h.hexdigest()[:16]
