"""The one way a user's file is written: beside its final name, flushed to disk, then renamed
over it. A failure at any point (disk full, a crash, an exception in the writer) leaves the
previous file as it was and no temporary behind."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFull(OSError):
    """A write failed for lack of space (ENOSPC, EFBIG, EDQUOT); the message names the file."""


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The OSError saying 'no space' behind ``exc`` (itself, or a cause or context: torch.save
    wraps it in a RuntimeError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None,
                 errors: str | None = None, prefix: str | None = None, suffix: str = ".tmp"):
    """``with atomic_write(path, "w") as f: ...`` writes ``path`` atomically: a temporary file in
    the same folder (``prefix``: its name's start, default ``.<name>.``), fsync, os.replace. On
    any error the temporary is removed and ``path`` is untouched; a full disk is raised as
    :class:`DiskFull` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{os.path.basename(path)}.",
                               suffix=suffix, dir=folder)
    try:
        text = {} if "b" in mode else {"encoding": encoding, "newline": newline, "errors": errors}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = disk_full_cause(exc)
        if full is not None and not isinstance(exc, DiskFull):
            raise DiskFull(full.errno, f"disk full: cannot write {path} ({os.strerror(full.errno)}); "
                                       "the previous file, if any, is unchanged") from exc
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
