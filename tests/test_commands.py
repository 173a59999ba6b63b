"""One command convention: every command is a module of geocell.commands (build_parser, main);
the library modules keep the work and no command code; evaluate, predict and serve share one
checkpoint-argument group and load step; serve's page is package data."""

import ast
import importlib
import importlib.resources
import re
import types
from pathlib import Path

import pytest

from geocell.commands import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "geocell"
# the modules that held a command before geocell.commands did
LIBRARY = ("training/trainer.py", "training/scenes.py", "infer/evaluate.py", "infer/predict.py",
           "infer/retrieval.py", "infer/serve.py")


def test_every_command_is_a_module_of_the_commands_package():
    assert sorted(COMMANDS) == sorted(["partition", "data", "scenes", "train", "evaluate", "predict", "index",
                                       "serve"])
    for name, (module, _, _) in COMMANDS.items():
        assert module == f"geocell.commands.{name}"
        assert (PACKAGE / "commands" / f"{name}.py").is_file()
    for gone in ("cli.py", "partition_cli.py", "data/cli.py"):
        assert not (PACKAGE / gone).exists()


@pytest.mark.parametrize("path", LIBRARY)
def test_library_modules_hold_no_command_code(path):
    tree = ast.parse((PACKAGE / path).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "argparse" not in imported
    assert not any(m.startswith("geocell.commands") or m == "geocell.cli" for m in imported)
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not top & {"main", "build_parser"}
    assert "__main__" not in (PACKAGE / path).read_text()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_module_parses_under_its_own_name(name):
    if name != "partition":
        pytest.importorskip("torch")
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)
    assert module.build_parser().prog == f"geocell {name}"


@pytest.mark.parametrize("name", ["evaluate", "predict", "serve"])
def test_evaluate_predict_and_serve_share_the_checkpoint_arguments(name):
    pytest.importorskip("torch")
    module = importlib.import_module(f"geocell.commands.{name}")
    parser = module.build_parser()
    flags = {a.dest: a for a in parser._actions}
    assert flags["checkpoint"].required
    assert flags["index"].metavar == "NPZ" and flags["index"].default is None
    assert flags["no_retrieval"].default is False and flags["device"].default is None
    assert flags["device"].help == "cpu, cuda, cuda:1 (default: cuda if available)"
    extra = ["x.csv"] if name == "evaluate" else []
    args = parser.parse_args(["--checkpoint", "m.pt", "--index", "i.npz", "--no-retrieval", "--device", "cpu",
                              *(["--manifest", *extra] if extra else []), *(["a.jpg"] if name == "predict" else [])])
    assert (args.checkpoint, args.index, args.no_retrieval, args.device) == ("m.pt", "i.npz", True, "cpu")


def test_load_geolocator_says_which_file_and_why(tmp_path, capsys):
    pytest.importorskip("torch")
    from geocell.commands._checkpoint import load_geolocator

    missing = tmp_path / "gone.pt"
    args = types.SimpleNamespace(checkpoint=str(missing), index=None, no_retrieval=False, device="cpu")
    assert load_geolocator(args, "predict") is None
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"geocell predict: cannot load {missing}: ") and "\n" not in err


def test_each_loading_command_exits_1_on_an_unloadable_checkpoint(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "m.csv").write_text("path,lat,lng\na.jpg,1,2\n")
    runs = {"evaluate": ["--checkpoint", str(bad), "--manifest", str(tmp_path / "m.csv")],
            "predict": ["--checkpoint", str(bad), str(tmp_path)],
            "serve": ["--checkpoint", str(bad)]}
    for name, argv in runs.items():
        assert importlib.import_module(f"geocell.commands.{name}").main(argv) == 1
        assert f"geocell {name}: cannot load {bad}: " in capsys.readouterr().err


def test_the_serve_page_is_package_data_with_its_placeholders_filled():
    from geocell.infer import serve

    resource = importlib.resources.files("geocell.infer").joinpath("static", serve.PAGE_FILE)
    template = resource.read_text(encoding="utf-8")
    assert template.startswith("<!doctype html>") and "api/predict" in template
    for slot in ("__CHECKPOINT__", "__FORMAT__", "__MAXK__", "__MAXMB__", "__MAXMPX__"):
        assert slot in template
    service = types.SimpleNamespace(checkpoint_name="<b>run&1</b>.pt", format_version=7,
                                    max_upload_bytes=3 * 1024 * 1024, max_pixels=2_500_000)
    page = serve.render_page(service)
    assert not re.search(r"__[A-Z]+__", page)
    assert "&lt;b&gt;run&amp;1&lt;/b&gt;.pt" in page and "<b>run&1</b>" not in page
    assert "(format 7)" in page and f'max="{serve.MAX_TOP_K}"' in page
    assert "up to 3 MB, 2.5 Mpx each" in page
