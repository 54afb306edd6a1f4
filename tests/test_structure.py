"""The shape of the code: no import cycles inside `variator_jax`, no reference to a document
that is not in the repository, a one-line statement of purpose at the top of every module.

Everything is read with `ast` and `re` from the files themselves; nothing is imported.
"""
import ast
import glob
import os
import re
import subprocess

import pytest

import test_utils as tu

PACKAGE = "variator_jax"


# -- The import graph ---------------------------------------------------------------------------
def _modules() -> dict[str, str]:
    """Module name -> path, for every .py file of the package."""
    out = {}
    for path in sorted(glob.glob(os.path.join(tu.REPO, PACKAGE, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, tu.REPO)[:-3].split(os.sep)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, at module level?) for every import; `if TYPE_CHECKING:` blocks skipped.

    Module level means executed when the module is imported: the module body, and `if`,
    `try`, `with` and class bodies inside it; not function bodies."""
    def walk(nodes, top):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, top
            elif isinstance(node, ast.If) and _is_type_checking(node):
                yield from walk(node.orelse, top)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), False)
            else:
                yield from walk(ast.iter_child_nodes(node), top)
    yield from walk(tree.body, True)


def _targets(node, module: str, is_package: bool, modules) -> set[str]:
    """The package modules an import statement executes (parents' __init__ left out: every
    submodule import runs them, and they only re-export)."""
    def known(name):  # The longest prefix of `name` that is a module of the package.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        found = {known(alias.name) for alias in node.names}
    else:
        base = node.module or ""
        if node.level:  # Relative: from the package holding this module.
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base)
                 for alias in node.names}
    return {t for t in found if t and t != module}


def _graph():
    """module -> {module: line} at module level, and [(module, target, line)] inside functions."""
    modules = _modules()
    top, inner = {m: {} for m in modules}, []
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        for node, at_top in _imports(tree):
            for target in _targets(node, module, is_package, modules):
                if at_top:
                    top[module].setdefault(target, node.lineno)
                else:
                    inner.append((module, target, node.lineno))
    return modules, top, inner


def _path(graph, start, goal):
    """A path start -> ... -> goal along the graph's edges, or None."""
    stack, seen = [[start]], {start}
    while stack:
        path = stack.pop()
        if path[-1] == goal:
            return path
        for nxt in graph[path[-1]]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(path + [nxt])
    return None


def test_the_graph_sees_the_imports_it_must():
    """The parser is not vacuous: edges known to exist are found, at the right level."""
    _, top, inner = _graph()
    assert "variator_jax.t5" in top["variator_jax.model"]
    assert {"variator_jax.engine", "variator_jax.policy"} <= set(top["variator_jax.serving"])
    assert "variator_jax.serving" not in top["variator_jax.simulation"]  # TYPE_CHECKING only.
    assert ("variator_jax.convert", "variator_jax.data") in {(m, t) for m, t, _ in inner}
    assert "variator_jax.configs.common" in top["variator_jax.configs.plugin"]


def test_no_import_cycles_inside_the_package():
    """Imports form an acyclic graph, those inside functions included: an import deferred into
    a function hides a cycle, it does not remove it. What two modules share lives in the
    lower one."""
    modules, top, inner = _graph()
    graph = {m: dict(targets) for m, targets in top.items()}
    for module, target, line in inner:
        graph[module].setdefault(target, line)
    cycles = []
    for module in modules:
        for target, line in graph[module].items():
            back = _path(graph, target, module)
            if back:
                cycles.append(f"{modules[module]}:{line}: " + " -> ".join([module] + back))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


# -- References to documents ----------------------------------------------------------------------
# A document named in prose: a path ending in .md, optionally followed by a section, "§3" or
# "§1.1". Upper-case names (README.md, DESIGN.md) and names with a directory are references;
# other bare names (results.md, serve.md) and templates (speed-<name>.md, {out}/serve.md) are
# files that programs write, not documents to follow.
_REFERENCE = re.compile(r"(?<![\w/.<>{}*-])((?:[\w.*-]+/)*[\w*-]+\.md)(?:\s*§\s*(\d+(?:\.\d+)*))?")


def _tracked_text_files():
    files = subprocess.run(["git", "ls-files"], cwd=tu.REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    skip = ("benchmarks/results/", "tests/data/",  # Generated; test data.
            "tests/test_structure.py")  # Quotes made-up references as examples.
    return [f for f in files if f.endswith((".py", ".md", ".toml", ".cfg", ".txt", "Makefile"))
            and not f.startswith(skip) and os.path.exists(os.path.join(tu.REPO, f))]


def _resolve(reference: str, source: str) -> list[str]:
    """Existing files a reference can mean: from the repository root or the citing file's
    directory; a glob (results/compile-*.md) means every file it matches."""
    out = []
    for base in (tu.REPO, os.path.dirname(os.path.join(tu.REPO, source))):
        out += glob.glob(os.path.join(base, reference))
    return sorted(set(out))


def _headings(path: str) -> set[str]:
    """The section numbers of a Markdown file's headings: '## 1. The plugin' -> '1'."""
    with open(path) as f:
        return set(re.findall(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", f.read(), flags=re.M))


def _references():
    for source in _tracked_text_files():
        with open(os.path.join(tu.REPO, source), errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                for m in _REFERENCE.finditer(line):
                    name = m.group(1)
                    if "/" in name or name[0].isupper():
                        yield source, line_no, name, m.group(2)


def test_every_document_reference_is_in_the_repository():
    refs = list(_references())
    # Not vacuous: the design document is cited, with sections, from code and docs.
    cited = {(os.path.basename(n), s) for _, _, n, s in refs}
    assert {("DESIGN.md", "1"), ("DESIGN.md", "2")} <= cited and len(refs) > 30
    missing, no_section = [], []
    for source, line, name, section in refs:
        found = _resolve(name, source)
        if not found:
            missing.append(f"{source}:{line}: {name}")
        elif section and not any(section in _headings(p) for p in found):
            no_section.append(f"{source}:{line}: {name} §{section}")
    assert not missing, "references to documents not in the repository:\n" + "\n".join(missing)
    assert not no_section, "references to sections that do not exist:\n" + "\n".join(no_section)


def test_reference_pattern():
    def found(text):
        return [(m.group(1), m.group(2)) for m in _REFERENCE.finditer(text)]

    assert found("see docs/DESIGN.md §1.1, and README.md") == [("docs/DESIGN.md", "1.1"),
                                                                ("README.md", None)]
    assert found("writes RUN/eval/results.md") == [("RUN/eval/results.md", None)]
    assert found("speed-<name>.md and {args.out}/serve.md") == []
    assert _headings(os.path.join(tu.REPO, "docs", "DESIGN.md")) >= {"1", "1.1", "2", "6"}


# -- Module docstrings ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(_modules().values()), ids=os.path.basename)
def test_every_module_states_its_responsibility_in_its_first_line(path):
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert doc, f"{path}: no module docstring"
    first = doc.splitlines()[0]
    assert first.endswith(".") and len(first) <= 100, (
        f"{path}: the docstring's first line should be one sentence saying what the module "
        f"is for, got {first!r}")


# -- Functions named by the design document -------------------------------------------------------
# docs/DESIGN.md §1 names the function behind each equation as `module.function` (or
# `module.Class.method`); each must be defined where it says, so a rename cannot leave it stale.
_DOTTED = re.compile(r"\b([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
_FILE_SUFFIXES = {"py", "md", "json", "jsonl", "txt", "safetensors"}


def _definitions(path: str) -> dict[str, set[str]]:
    """A module's top-level names (functions, classes, assignments) -> a class's methods."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = {n.name for n in getattr(node, "body", [])
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = set()
    return out


def test_design_section_1_names_functions_that_exist():
    with open(os.path.join(tu.REPO, "docs", "DESIGN.md")) as f:
        text = f.read()
    section = text[text.index("\n## 1."):text.index("\n## 2.")]
    modules = _modules()
    named, missing = set(), []
    for m in _DOTTED.finditer(section):
        module, name, member = m.groups()
        if f"{PACKAGE}.{module}" not in modules or name in _FILE_SUFFIXES:
            continue
        named.add(f"{module}.{name}")
        defs = _definitions(modules[f"{PACKAGE}.{module}"])
        if name not in defs or (member and defs[name] and member not in defs[name]):
            missing.append(m.group(0))
    # Not vacuous: the merge, the expansion, the whole block and each compressor are named.
    assert {"plugins.merge", "plugins.expand", "plugins.compressed_ffn", "compressors.mean_pool",
            "compressors.strided", "compressors.tome", "t5.LayerFF"} <= named, named
    assert not missing, "docs/DESIGN.md §1 names what its module does not define: " + ", ".join(
        sorted(set(missing)))
