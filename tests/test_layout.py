"""The package's shape (../shared/DESIGN.md, README "Layout"): no import cycle, nothing reaching up,
one module registering with transformers, a cheap `import stem_cli`.

The import graph is read from the source with `ast` (module- and function-level imports alike), so
a lazy import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir mapping)
PACKAGES = {"stem_cli": "stem_cli", "kernels": "stem_cli.kernels", "tasks": "stem_cli.tasks"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (`from a import b`: a, and a.b if a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


# Floors, lowest first: a module may import its own floor and those below, never one above.
# The hook imports nothing of ours (calls flow down through it to a handler; imports need not),
# so it sits with the leaves and selectors may use its helpers (attention_modules).
FLOORS = [
    ("leaves", ["stem_cli.config", "stem_cli.units", "stem_cli.timing", "stem_cli.nvml", "stem_cli.environment",
                "stem_cli.errors", "stem_cli.index", "stem_cli.methods.knob", "stem_cli.hook", "stem_cli.gguf_file"]),
    ("kernels", ["stem_cli.kernels"]),
    ("executor", ["stem_cli.executor"]),
    ("selectors", ["stem_cli.methods", "stem_cli.decode", "stem_cli.elastic.config", "stem_cli.elastic.headmap",
                   "stem_cli.elastic.router", "stem_cli.elastic.modes"]),
    ("registry", ["stem_cli.registry"]),
    ("integration", ["stem_cli.integration"]),
]
UPPER = ["stem_cli.runs", "stem_cli.cli", "stem_cli.__main__"]  # nothing below these imports them


def floor_of(module: str) -> int | None:
    best = None
    for rank, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def test_nothing_imports_upward():
    graph = import_graph()
    wrong = []
    for module, deps in graph.items():
        mine = floor_of(module)
        for dep in deps:
            theirs = floor_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} ({FLOORS[mine][0]}) imports {dep} ({FLOORS[theirs][0]})")
            if mine is not None and any(dep == u or dep.startswith(u + ".") for u in UPPER):
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_kernels_import_only_the_index():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("stem_cli.kernels"):
            assert {d for d in deps if not d.startswith("stem_cli.kernels")} <= {"stem_cli.index"}, module


def test_one_module_registers_with_transformers():
    """Only stem_cli/hook.py calls AttentionInterface.register (and the mask interface's)."""
    registering = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("Interface")):
                registering.add(name)
    assert registering == {"stem_cli.hook"}


@pytest.mark.parametrize("statement", ["import stem_cli", "import stem_cli.registry as r; print(list(r.METHODS))"])
def test_import_is_cheap(statement):
    """`import stem_cli` (and listing method names) loads neither torch nor transformers."""
    code = f"{statement}; import sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]"


def test_the_wheel_lists_every_package():
    """Every package folder is in pyproject's package list (an editable install finds them anyway; a wheel would not)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found == listed
    for package in listed:
        folder = tool["package-dir"][package]
        assert (ROOT / folder / "__init__.py").is_file(), package


def test_the_checkout_s_kernels_folder_never_shadows_an_installed_kernels_package(tmp_path):
    """From a checkout's root (python -m, pytest's pythonpath) kernels/ is importable as a bare `kernels`, the name of
    Hugging Face's package that transformers imports (5.25+): the installed one is what `import kernels` gives, the
    checkout's stays stem_cli.kernels, and with none installed the bare name is missing, not this folder."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    mark = f"installed-{tmp_path.name}"
    (fake / "__init__.py").write_text(f"MARK = {mark!r}\nfrom kernels.part import PART\n")
    (fake / "part.py").write_text("PART = 'its own submodule'\n")
    code = ("import sys; sys.path[:0] = [{root!r}, {site!r}]; import kernels; print(kernels.MARK, kernels.PART); "
            "import stem_cli.kernels.launch as launch; print(launch.__file__)")
    out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), site=str(fake.parent))], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout.split("\n")
    assert out[0] == f"{mark} its own submodule"
    assert Path(out[1]).resolve() == ROOT / "kernels" / "launch.py"
    bare = ("import sys; sys.path[:] = [{root!r}] + [p for p in sys.path if p and 'packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)")
    out = subprocess.run([sys.executable, "-c", bare.format(root=str(ROOT))], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "missing kernels"
