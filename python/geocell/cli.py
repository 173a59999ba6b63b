"""The ``geocell`` command: dispatches its first word to the module that owns it.

Command modules are imported only when their command runs, so ``geocell
partition`` starts without importing torch.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int, one-line help, needs the train extra)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "partition": ("geocell.partition_cli", "build adaptive S2 partitionings from photo locations", False),
    "data": ("geocell.data.cli", "datasets: from-exif, pack (WebDataset shards), download (URL lists), earth (built-in)", True),
    "scenes": ("geocell.training.scenes", "the scene helper network: train, label", True),
    "train": ("geocell.training.trainer", "train the multitask geolocation model", True),
    "evaluate": ("geocell.infer.evaluate", "accuracy table and error CDF of a checkpoint on a manifest", True),
    "predict": ("geocell.infer.predict", "locate photos: top-k cells, credible region, probability map", True),
    "index": ("geocell.infer.retrieval", "retrieval index of photos for a checkpoint: index build", True),
    "serve": ("geocell.infer.serve", "a local web page and JSON API to locate photos", True),
}


def _usage() -> str:
    from . import __version__

    width = max(map(len, COMMANDS))
    lines = [
        f"geocell {__version__}: photo geolocation over adaptive S2 cells",
        "",
        "usage: geocell <command> [options]   (geocell <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"geocell {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"geocell: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, needs_train = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if needs_train:
            print(
                f"geocell {name} needs the training extra ({exc}); install it with: "
                "pip install 'geocell[train]'",
                file=sys.stderr,
            )
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
