"""Output flags checked before a command's work starts, not after it (exit 2, the flag named)."""

from __future__ import annotations

import os
import tempfile


def writable_folder(folder: str) -> str | None:
    """None if a file can be created in ``folder``, else why not (tried, not guessed from
    permission bits: root, read-only mounts and ACLs all answer truthfully)."""
    folder = folder or "."
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist" if not os.path.exists(folder) else \
            f"{folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def map_target_problem(map_path: str) -> str | None:
    """Why maps cannot be written at ``map_path`` (a file, or a folder made on demand), or None."""
    if map_path.endswith(("/", os.sep)) or os.path.isdir(map_path):
        folder = map_path.rstrip("/" + os.sep) or os.sep
        while folder and not os.path.exists(folder):  # created on demand: check where it starts
            folder = os.path.dirname(folder)
        return writable_folder(folder or ".")
    return writable_folder(os.path.dirname(map_path))
