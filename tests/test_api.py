"""The public surface agrees with itself: the compiled module with its stubs, the package's
``__all__`` with what it defines, and the README's examples run as written."""

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import geocell
from geocell import _core

REPO = Path(__file__).resolve().parent.parent
STUBS = Path(geocell.__file__).with_name("_core.pyi")


def _stub_functions():
    tree = ast.parse(STUBS.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_stubs_match_the_compiled_module():
    compiled = {name for name in dir(_core) if not name.startswith("_") and callable(getattr(_core, name))}
    assert set(_stub_functions()) == compiled


def test_stub_parameters_match_the_compiled_signatures():
    for name, node in _stub_functions().items():
        doc = getattr(_core, name).__doc__ or ""
        # pybind11 writes "name(arg: type, ...) -> ret" as the first line of the docstring
        first = doc.strip().splitlines()[0]
        compiled = re.findall(r"(\w+):", first[first.index("(") + 1:first.rindex(")")])
        assert [a.arg for a in node.args.args] == compiled, name


def test_all_lists_exactly_the_public_names():
    for module in (geocell, geocell.cells):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"
    public = {n for n, v in vars(geocell.cells).items() if not n.startswith("_")
              and (inspect.isfunction(v) and v.__module__ == "geocell.cells")}
    assert public <= set(geocell.cells.__all__)
    assert set(geocell.cells.__all__) <= set(geocell.__all__)


def _readme_blocks(lang):
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_s2_and_partition_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes cells.csv into the working directory
    code = [b for b in _readme_blocks("python") if "geocell.latlng_to_cell" in b or "geocell.partition(" in b]
    assert len(code) == 2
    scope: dict = {}
    exec(compile("\n".join(code), "README.md", "exec"), scope)
    assert len(scope["p"]) > 100 and len(scope["ps"]) == 3
    # what the README's comment promises for its two example points
    assert list(geocell.cell_to_token(scope["cells"])) == ["47e66ff", "6b12ae7"]
    assert (tmp_path / "cells.csv").is_file()


def test_readme_partition_command_runs_as_written(tmp_path):
    line = next(ln for b in _readme_blocks("sh") for ln in b.splitlines() if ln.startswith("$ geocell partition"))
    args = line[len("$ geocell "):].split()
    args = [str(REPO / a) if a.endswith(".csv.gz") else a for a in args]
    args[args.index("-o") + 1] = str(tmp_path / "cells")
    out = subprocess.run([sys.executable, "-m", "geocell", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cells_50_1000" in out.stdout and (tmp_path / "cells" / "hierarchy.csv").exists()


@pytest.mark.parametrize("command", ["partition", "data", "scenes", "train", "evaluate", "predict"])
def test_every_command_has_help(command):
    pytest.importorskip("torch")
    from geocell.commands import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
