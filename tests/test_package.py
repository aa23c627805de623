"""The package's shape: a subpackage per stage whose imports run only downward, no import circle, one
import path per name, modules small enough to read in one sitting, and the math modules free of file
access. Read from the sources (no import of the package needed)."""

from __future__ import annotations

import ast
import re

import pytest

from helpers import REPO
from sfsd.provenance import module_file, package_imports

PACKAGE = REPO / "workflow" / "sfsd"
# every module, dotted and relative to the package ('features.eigen'; a subpackage's __init__ as 'features')
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}
MAX_LINES = 525  # "about 500": the size of a module one reads in one sitting
MAX_MODULES = 12  # per folder: more wants a subpackage of its own
PURE = ("search.algorithm", "decompose.methods", "features.stats", "decompose.allocate", "decompose.lowrank",
        "search.objectives", "search.settings", "resources.needs", "resources.loss_needs", "resources.modes")
# The stages in the order they may import each other: a module may import its own layer and those before
# it, never a later one. Top-level modules other than these are the shared base every stage uses.
LAYERS = ("model", "resources", "tasks", "features", "decompose", "evaluate", "search", "report", "laser",
          "config",  # the whole-config check: it knows every stage's settings
          "cli", "__main__")
SHARED = ("__init__", "errors", "defaults", "io", "provenance")
# python -m sfsd, the `sfsd` script of pyproject.toml, and the config check that rules/common.smk runs
ENTRY_POINTS = ("__main__", "cli.main", "config")


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top in SHARED:
        return -1
    return LAYERS.index(top)


def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


def _imports(module: str) -> set[str]:
    return package_imports(_tree(module), module, PACKAGE) - {module}


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
    """(module, name) of every `from sfsd.module import name` anywhere in the tree (module dotted)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sfsd."):
            for alias in node.names:
                yield node.module.split(".", 1)[1], alias.name


def _misplaced_names(trees: dict[str, ast.AST]) -> list[str]:
    defined = {m: _defined(_tree(m)) for m in MODULES}
    return sorted({f"{where} imports {name} from sfsd.{source}"
                   for where, tree in trees.items() for source, name in _imports_from_package(tree)
                   if source in defined and name not in defined[source] and f"{source}.{name}" not in MODULES})


def test_every_module_belongs_to_a_layer():
    assert not [m for m in MODULES if m.split(".")[0] not in (*LAYERS, *SHARED)]


def test_imports_run_only_downward():
    """A stage's package imports the stages before it and the shared modules, never a later stage; the
    shared modules import no stage."""
    upward = sorted(f"{m} imports {dep}" for m in MODULES for dep in _imports(m) if _layer(dep) > _layer(m))
    assert not upward, upward


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of `graph` that has one (depth-first search)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_circle():
    """No module imports, directly or through others, a module that imports it (imports inside functions
    count too); a subpackage's __init__ imports nothing, so the edges are between modules."""
    graph = {m: {d for d in _imports(m) if d in MODULES and not (PACKAGE / d.replace(".", "/")).is_dir()}
             for m in MODULES}
    assert not _cycles(graph), _cycles(graph)


def _rule_imports() -> set[str]:
    """Modules the rules (rules/*.smk) import themselves, e.g. for the messages a run prints."""
    return {m.group(1) for smk in (PACKAGE.parents[1] / "rules").glob("*.smk")
            for m in re.finditer(r"from sfsd\.([\w.]+) import", smk.read_text())}


def test_every_module_is_imported_or_an_entry_point():
    assert _rule_imports() <= set(MODULES), _rule_imports() - set(MODULES)
    imported = set().union(*(_imports(m) for m in MODULES)) | _rule_imports()
    unused = sorted(set(MODULES) - imported - set(ENTRY_POINTS) - {"__init__"})
    assert not unused, unused


def test_subpackages_say_what_their_stage_does_and_reexport_nothing():
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree) or ""
        assert "Writes" in doc or "command" in doc, f"{init.parent.name}/__init__.py: say what the stage writes"
        assert all(isinstance(n, ast.Expr) for n in tree.body), f"{init.parent.name}/__init__.py: docstring only"


@pytest.mark.parametrize("folder", sorted({p.parent for p in PACKAGE.rglob("*.py")}), ids=lambda p: p.name)
def test_folder_size(folder):
    modules = [p for p in folder.glob("*.py") if p.stem != "__init__"]
    assert len(modules) <= MAX_MODULES, f"{folder.name}/ holds {len(modules)} modules; split it by stage"


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-exports: `from sfsd.x import name` names a function, class or constant x itself defines (or
    a submodule of the package x), so each name has one import path."""
    wrong = _misplaced_names({f"{m}.py": _tree(m) for m in MODULES})
    assert not wrong, wrong


def test_tests_import_names_from_their_defining_module():
    wrong = _misplaced_names({p.name: ast.parse(p.read_text()) for p in sorted((REPO / "tests").glob("*.py"))})
    assert not wrong, wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by job (about 500 at most)"


@pytest.mark.parametrize("module", PURE)
def test_math_and_search_modules_do_no_file_access(module):
    source = MODULES[module].read_text()
    found = re.findall(r"\bopen\(|\.read_text\(|\.write_text\(|\.read_bytes\(|\.write_bytes\(|\bfsync\b|"
                       r"\bjson\.|safe_open|save_file|load_file|\.mkdir\(", source)
    assert not found, f"{module} reads or writes files ({sorted(set(found))}); keep I/O in the stage modules"


def test_the_checks_can_fail():
    """The helpers above catch what they look for, on hand-made sources and graphs."""
    tree = ast.parse("from sfsd.errors import ConfigError\nX = 1\ndef f():\n    pass\nclass C:\n    pass\n")
    assert _defined(tree) == {"X", "f", "C"}
    inner = ast.parse("def g():\n    from sfsd.io import atomic_path\n")
    assert list(_imports_from_package(inner)) == [("io", "atomic_path")]
    assert package_imports(inner, "features.eigen", PACKAGE) == {"io"}
    assert package_imports(ast.parse("from sfsd.features import eigen\n"), "", PACKAGE) == {"features", "features.eigen"}
    assert package_imports(ast.parse("from .stats import x\n"), "features.collect", PACKAGE) == {"features", "features.stats"}
    assert module_file("features", PACKAGE).name == "__init__.py"
    assert _misplaced_names({"t": ast.parse("from sfsd.io import ConfigError\n")}) == [
        "t imports ConfigError from sfsd.io"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("features.eigen") < _layer("search.run") and _layer("io") < _layer("model.stream")
