"""The package's shape: one import path per name, modules small enough to read in one sitting, and the
math modules free of file access. Read from the sources (no import of the package needed)."""

from __future__ import annotations

import ast
import re

import pytest

from helpers import REPO

PACKAGE = REPO / "workflow" / "sfsd"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}
MAX_LINES = 525  # "about 500": the size of a module one reads in one sitting
PURE = ("search", "methods", "stats", "allocate", "lowrank", "objectives", "search_settings")


def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


def _defined(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _imports_from_package(tree: ast.AST):
    """(module, name) of every `from .module import name` anywhere in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                yield node.module, alias.name


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-exports: `from .x import name` names a function, class or constant x itself defines, so
    each name has one import path."""
    defined = {m: _defined(_tree(m)) for m in MODULES}
    wrong = sorted({f"{m}.py imports {name} from {source}"
                    for m in MODULES for source, name in _imports_from_package(_tree(m))
                    if source in defined and name not in defined[source]})
    assert not wrong, wrong


def test_tests_import_names_from_their_defining_module():
    defined = {m: _defined(_tree(m)) for m in MODULES}
    wrong = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sfsd."):
                source = node.module.split(".", 1)[1]
                wrong += [f"{path.name}: {alias.name} from sfsd.{source}" for alias in node.names
                          if source in defined and alias.name not in defined[source]]
    assert not wrong, wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}.py has {lines} lines; split it by job (about 500 at most)"


@pytest.mark.parametrize("module", PURE)
def test_math_and_search_modules_do_no_file_access(module):
    source = MODULES[module].read_text()
    found = re.findall(r"\bopen\(|\.read_text\(|\.write_text\(|\.read_bytes\(|\.write_bytes\(|\bfsync\b|"
                       r"\bjson\.|safe_open|save_file|load_file|\.mkdir\(", source)
    assert not found, f"{module}.py reads or writes files ({sorted(set(found))}); keep I/O in the stage modules"


def test_the_checks_can_fail():
    """The helpers above catch what they look for, on hand-made sources."""
    tree = ast.parse("from .errors import ConfigError\nX = 1\ndef f():\n    pass\nclass C:\n    pass\n")
    assert _defined(tree) == {"X", "f", "C"}
    assert list(_imports_from_package(ast.parse("def g():\n    from .io import atomic_path\n"))) == [("io", "atomic_path")]
