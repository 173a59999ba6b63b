"""The ``geocell`` command: dispatches its first word to its module in this package.

Each command is one module here (``geocell.commands.<name>``) with ``build_parser()`` and
``main(argv) -> int``: argument parsing, the call into the library and the printing; the work is
the library's. Command modules are imported only when their command runs, so ``geocell
partition`` starts without importing torch.

No traceback reaches a user for an input or environment problem: a missing optional dependency
(wherever it is imported) names the extra that installs it, a ValueError or OSError (the
project's bad-input errors, which name the file) prints as one line; both exit with 2. Any
other exception is a bug: one line saying so (exit 1), its traceback with ``--debug`` (any
place on the command line) or ``GEOCELL_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import sys

from geocell._internal.extras import missing_extra, needs_extra_message

# command -> (module with main(argv) -> int, one-line help, needs the train extra)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "partition": ("geocell.commands.partition", "build adaptive S2 partitionings from photo locations", False),
    "data": ("geocell.commands.data", "datasets: from-exif, pack (WebDataset shards), download (URL lists), earth (built-in)", True),
    "scenes": ("geocell.commands.scenes", "the scene helper network: train, label", True),
    "train": ("geocell.commands.train", "train the multitask geolocation model", True),
    "evaluate": ("geocell.commands.evaluate", "accuracy table and error CDF of a checkpoint on a manifest", True),
    "predict": ("geocell.commands.predict", "locate photos: top-k cells, credible region, probability map", True),
    "index": ("geocell.commands.index", "retrieval index of photos for a checkpoint: index build", True),
    "serve": ("geocell.commands.serve", "a local web page and JSON API to locate photos", True),
}


def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("GEOCELL_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage() -> str:
    from geocell._version import __version__

    width = max(map(len, COMMANDS))
    lines = [
        f"geocell {__version__}: photo geolocation over adaptive S2 cells",
        "",
        "usage: geocell <command> [options]   (geocell <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "--debug (or GEOCELL_DEBUG=1): show the traceback of an error"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from geocell._version import __version__

        print(f"geocell {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"geocell: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, needs_train = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"geocell {name}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:
        extra = missing_extra(exc) or ("train" if needs_train and module_name not in sys.modules else None)
        if debug or extra is None:
            if debug:
                raise
            return _bug(name, exc)
        print(needs_extra_message(name, exc, extra), file=sys.stderr)
        return 2
    # bad input or environment, the message naming the file; a loss gone to NaN names its remedy
    except (ValueError, OSError, FloatingPointError) as exc:
        if debug:
            raise
        print(f"geocell {name}: {_one_line(exc) or type(exc).__name__} "
              "(GEOCELL_DEBUG=1 shows where it was raised)", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        return _bug(name, exc)


def _bug(name: str, exc: BaseException) -> int:
    print(f"geocell {name}: internal error ({type(exc).__name__}: {_one_line(exc)}). This is a bug in "
          "geocell: run the command again with --debug (or GEOCELL_DEBUG=1) to see the traceback, "
          "and report it with that traceback and the command line.", file=sys.stderr)
    return 1

