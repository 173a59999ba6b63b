"""Progress bars: a tqdm bar when one is wanted and tqdm is installed, else a bar that counts
and shows nothing (tqdm is an optional dependency, and bars are off in logs and tests)."""

from __future__ import annotations


class NoBar:
    """tqdm's surface as the callers use it (``update``, ``set_postfix``, ``close``, ``n``), silent."""

    def __init__(self, total=None):
        self.total, self.n = total, 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(total: int | None, enabled: bool = True, desc: str | None = None, unit: str = "img", **kwargs):
    """A tqdm bar over ``total`` items (``kwargs`` go to tqdm, e.g. ``file``, ``leave``), or a
    :class:`NoBar` when ``enabled`` is false or tqdm is missing."""
    if not enabled:
        return NoBar(total)
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar(total)
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)
