"""What an artefact was made from, recorded in its metadata, and the check a consuming stage makes.

Every stage output records `model_digest` (io.model_digest of the checkpoint), `calibration_digest`
(digest of the calibration tokens; None where no calibration data enters, e.g. weight-space SVD),
`settings` (the config values the stage ran with) and `code_version` (package version + digest of
the package's source). A stage refuses an input whose model or calibration differ from the ones it
works with: mixing them would give numbers that are silently wrong. The code version is recorded,
not enforced (Snakemake reruns a stage when its own modules change; see rules/common.smk).
No timestamps: the same inputs give byte-identical files.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import __version__
from .errors import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
# files of a Hugging Face tokenizer: the tokens depend on these and nothing else of the model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


@functools.cache
def code_version() -> str:
    """'<package version>+<sha256 of every module of the package>' (12 hex digits)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def tokenizer_digest(model_dir: str | os.PathLike) -> str:
    """Digest of a model folder's tokenizer files (two models sharing a tokenizer share it)."""
    folder = Path(model_dir)
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            found = True
            h.update(name.encode())
            h.update(path.read_bytes())
    if not found:
        raise DataError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                        "save the tokenizer with the model")
    return h.hexdigest()[:16]


def stamp(model_digest: str | None, calibration_digest: str | None, settings: Mapping, **extra) -> dict:
    """The provenance fields of one artefact's metadata."""
    return {"model_digest": model_digest, "calibration_digest": calibration_digest, "settings": dict(settings),
            "code_version": code_version(), **extra}


def require(path: str | os.PathLike, meta: Mapping, what: str = "", **expected) -> None:
    """DataError naming `path` and the first field whose recorded value differs from the expected one
    (fields expected as None are not checked). `what` says which stage to rerun."""
    for key, want in expected.items():
        if want is None:
            continue
        got = meta.get(key)
        if got != want:
            source = "another model" if key == "model_digest" else (
                "other calibration data" if key == "calibration_digest" else f"another {key}")
            raise DataError(f"{path} was made from {source} ({key} {got!r}, expected {want!r}); "
                            f"rerun {what or 'the stage that makes it'} for this input")


def common_value(items: Iterable[tuple[str, Mapping]], key: str, what: str) -> str | None:
    """The one value of `key` shared by the metadata of several files (path, meta); a DataError names
    the first file that differs: blocks from two runs must not be mixed."""
    first_path, first = None, None
    for path, meta in items:
        value = meta.get(key)
        if first_path is None:
            first_path, first = path, value
        elif value != first:
            raise DataError(f"{path} has {key} {value!r} but {first_path} has {first!r}: the {what} files come "
                            "from different runs; delete them and rerun that stage")
    return first
