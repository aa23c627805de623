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

from sfsd import __version__
from sfsd.errors import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
# files of a Hugging Face tokenizer: the tokens depend on these and nothing else of the model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


@functools.cache
def code_version() -> str:
    """'<package version>+<sha256 of every module of the package>' (12 hex digits)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def module_file(module: str, package_dir: str | os.PathLike = PACKAGE_DIR) -> Path | None:
    """The source of package module `module` (dotted, relative to the package: 'features.eigen', or a
    subpackage 'features' for its __init__.py); None where no such module exists."""
    base = Path(package_dir).joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def package_imports(tree, module: str = "", package_dir: str | os.PathLike = PACKAGE_DIR) -> set[str]:
    """Package modules (dotted, relative to the package) imported anywhere in `tree`, module level or
    inside functions: `from sfsd.x.y import name` gives x.y, and x.y.name where that is a module itself;
    `import sfsd.x.y` gives x.y; relative imports are resolved against `module`, the importing module.
    Every module comes with the subpackages that hold it (importing sfsd.x.y runs x/__init__.py)."""
    import ast

    found: set[str] = set()
    here = module.split(".")[:-1] if module else []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "sfsd" or node.module.startswith("sfsd.")):
                parts = node.module.split(".")[1:]
            else:
                continue
            base = ".".join(parts)
            if base:
                found.add(base)
            found.update(f"{base}.{a.name}".lstrip(".") for a in node.names
                         if module_file(f"{base}.{a.name}".lstrip("."), package_dir))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("sfsd."))
    out: set[str] = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if module_file(m, package_dir)}


CLI_PACKAGE = "cli"  # the subpackage of the command line; every command imports all of its modules


def command_modules(command: str, package_dir: str | os.PathLike = PACKAGE_DIR) -> list[str]:
    """The package modules (dotted, relative to the package) that `python -m sfsd <command>` can run:
    the entry points (every module of cli/, whose module-level imports every command runs), the modules
    its `cmd_<command>` function (and the helpers of its own module it calls) imports, and every package
    module those import, transitively. A rule puts their digest (`command_digest`) into its params, so an
    edit of any of them reruns it and an edit of any other module does not."""
    import ast

    package_dir = Path(package_dir)
    cli_names = sorted(f"{CLI_PACKAGE}.{p.stem}" for p in (package_dir / CLI_PACKAGE).glob("*.py")
                       if p.stem != "__init__")
    trees = {m: ast.parse(module_file(m, package_dir).read_text()) for m in cli_names}
    name = "cmd_" + command.replace("-", "_")
    owner = next((m for m in cli_names for n in trees[m].body if isinstance(n, ast.FunctionDef) and n.name == name),
                 None)
    if owner is None:
        raise KeyError(f"sfsd has no command {command!r} (no {name} in "
                       f"{', '.join(m.replace('.', '/') + '.py' for m in cli_names)})")
    modules = {"__init__", "__main__", CLI_PACKAGE, *cli_names}
    for module, tree in trees.items():  # what every command imports before it runs
        modules |= package_imports(ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)],
                                              type_ignores=[]), module, package_dir)
    functions = {n.name: n for n in trees[owner].body if isinstance(n, ast.FunctionDef)}
    seen_functions, todo = set(), [name]
    while todo:  # the command function and the helpers of its module it calls
        fn = functions[todo.pop()]
        seen_functions.add(fn.name)
        modules |= package_imports(fn, owner, package_dir)
        todo += [n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions
                 and n.id not in seen_functions and n.id != fn.name]
    pending = sorted(modules - {"__init__", "__main__", *cli_names})
    while pending:  # transitively through the package
        module = pending.pop()
        for dep in package_imports(ast.parse(module_file(module, package_dir).read_text()), module, package_dir):
            if dep not in modules:
                modules.add(dep)
                pending.append(dep)
    return sorted(modules)


def command_digest(command: str, package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """sha256 (12 hex digits) of the sources of `command_modules(command)`."""
    h = hashlib.sha256()
    for module in command_modules(command, package_dir):
        h.update(module.encode())
        h.update(module_file(module, package_dir).read_bytes())
    return h.hexdigest()[:12]


def value_digest(obj) -> str:
    """A short digest of a JSON-like value (keys sorted; anything else by its str)."""
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
