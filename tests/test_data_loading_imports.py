"""The data and loading floors read one way: no import cycle reaches a module of
geocell/data or geocell/loading (top-level and function-level imports alike, found by parsing
the sources), and no module there takes another module's private name."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "geocell"
FLOORS = ("geocell.data", "geocell.loading")


def _modules() -> dict:
    """{dotted module name: source path} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("geocell",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict):
    """(imported module, [names taken from it]) for every import statement of a module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, []) if sub in modules else (base, [alias.name])


def _graph():
    modules = _modules()
    edges, private = {m: set() for m in modules}, []
    for name, path in modules.items():
        for target, names in _imports(name, path, modules):
            if target in modules and target != name:
                edges[name].add(target)
                taken = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if taken and name.startswith(FLOORS) and target.startswith(FLOORS):
                    private.append(f"{name} takes {', '.join(taken)} from {target}")
    return edges, private


def _cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_reaches_the_data_or_loading_floors():
    edges, _ = _graph()
    assert edges["geocell.loading.loaders"] >= {"geocell.loading.base", "geocell.loading.torch_backend",
                                                "geocell.loading.dali_backend"}  # the scan sees function-level imports
    assert "geocell.data.shards" in edges["geocell.data.dataset"]
    bad = [c for c in _cycles(edges) if any(m.startswith(FLOORS) for m in c)]
    assert not bad, bad


def test_the_floors_take_no_private_names_from_each_other():
    _, private = _graph()
    assert not private, private


def test_the_scan_finds_a_cycle_and_a_private_import(tmp_path):
    # the checks above would pass on a scan that sees nothing: show it sees both on a made-up graph
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from geocell.data.manifest import _hidden, Manifest\n")
    modules = {"geocell.data.m": mod, "geocell.data.manifest": mod}
    assert list(_imports("geocell.data.m", mod, modules)) == [("geocell.data.manifest", ["_hidden"]),
                                                               ("geocell.data.manifest", ["Manifest"])]
