"""The package's import graph has no cycles and each floor imports only the floors below it.

Read from the source with ``ast`` (every import, also those inside functions), so a cycle that
only shows when some command runs is caught here. The package's ``__init__`` is the public face
and sits above everything (it may import any module lazily); nothing inside imports it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "python"
PACKAGE = ROOT / "geocell"

# Floors, lowest first: a module may import its own floor and those below.
FLOORS = (
    ("geocell._version", "geocell._internal", "geocell._core"),
    ("geocell.cells", "geocell.partition"),
    ("geocell.data",),
    ("geocell.loading",),
    ("geocell.model",),
    ("geocell.infer",),
    ("geocell.training",),
    ("geocell.commands", "geocell.__main__"),
)


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*"):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = defaultdict(set)
    for name, path in mods.items():
        if path.suffix == ".pyi":
            continue
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                # "from a import b": the module a.b when there is one, else a
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("geocell") and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


# The package's face (its __init__: lazy imports of what it exports) and ``python -m geocell``
# sit above every floor.
ENTRY_POINTS = ("geocell", "geocell.__main__")


def floor_of(module: str) -> int:
    for i, floor in enumerate(FLOORS):
        if any(module == f or module.startswith(f + ".") for f in floor):
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def folder_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "geocell"


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # the scanner itself, on a made-up package: a function-level and a relative import close a cycle
    pkg = tmp_path / "geocell"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from geocell.b import y\n")
    (pkg / "b.py").write_text("from .a import x\n")
    global ROOT, PACKAGE
    saved = ROOT, PACKAGE
    ROOT, PACKAGE = tmp_path, pkg
    try:
        mods = modules()
        assert cycles(import_edges(mods)) == [["geocell.a.x", "geocell.b"]]
    finally:
        ROOT, PACKAGE = saved


def test_no_module_imports_the_package_face():
    edges = import_edges(modules())
    assert not sorted(m for m, ws in edges.items() if "geocell" in ws)


def test_no_import_cycle_between_modules():
    assert cycles(import_edges(modules())) == []


def test_no_import_cycle_between_folders():
    folder_edges = defaultdict(set)
    for module, targets in import_edges(modules()).items():
        if module in ENTRY_POINTS:
            continue
        for t in targets:
            if folder_of(t) != folder_of(module):
                folder_edges[folder_of(module)].add(folder_of(t))
    assert cycles(folder_edges) == []


def test_each_floor_imports_only_the_floors_below():
    wrong = [f"{m} -> {t}" for m, ts in import_edges(modules()).items() if m not in ENTRY_POINTS
             for t in ts if floor_of(t) > floor_of(m)]
    assert wrong == []


def private_imports(mods: dict[str, Path]) -> list[str]:
    """"module: source.name" for every private name one module takes from another."""
    taken = []
    for name, path in mods.items():
        if path.suffix == ".pyi":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("geocell"):
                taken += [f"{name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")
                          and f"{node.module}.{a.name}" not in mods]
    return taken


def test_no_module_takes_another_modules_private_names():
    assert private_imports(modules()) == []


def test_the_private_name_scan_sees_one_inside_a_function(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from geocell.data.manifest import _hidden, Manifest\n")
    assert private_imports({"geocell.data.m": mod}) == ["geocell.data.m: geocell.data.manifest._hidden"]


def test_the_loader_factory_alone_reaches_the_backends():
    # base.py holds what both backends share and imports neither (the factory does, in functions)
    edges = import_edges(modules())
    backends = {"geocell.loading.torch_backend", "geocell.loading.dali_backend"}
    assert edges["geocell.loading.loaders"] >= backends | {"geocell.loading.base"}
    assert not edges["geocell.loading.base"] & backends


def test_the_dataset_opener_sits_above_manifest_and_shards():
    edges = import_edges(modules())
    assert {"geocell.data.manifest", "geocell.data.shards"} <= edges["geocell.data.dataset"]
    assert "geocell.data.shards" not in edges["geocell.data.manifest"]
