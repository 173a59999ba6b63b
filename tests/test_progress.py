"""geocell._internal.progress: one progress-bar rule for every long loop (tqdm when wanted and
installed, else a silent bar with tqdm's surface)."""

import io
import sys

import numpy as np
from PIL import Image

from geocell._internal.progress import NoBar, progress_bar


def test_a_disabled_bar_is_silent_and_still_counts():
    bar = progress_bar(10, False, "x")
    assert isinstance(bar, NoBar)
    bar.update(3)
    bar.update()
    bar.set_postfix(loss="0.1")
    bar.close()
    assert bar.n == 4 and bar.total == 10


def test_an_enabled_bar_is_tqdm_writing_where_it_is_told():
    stream = io.StringIO()
    bar = progress_bar(5, True, "packing", file=stream, mininterval=0)
    bar.update(5)
    bar.close()
    assert type(bar).__name__ == "tqdm" and "packing" in stream.getvalue() and "5/5" in stream.getvalue()


def test_without_tqdm_the_bar_is_silent_and_packing_with_progress_works(monkeypatch, tmp_path, capsys):
    from geocell.data.manifest import read_manifest
    from geocell.data.shards import pack

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert isinstance(progress_bar(3, True, "x"), NoBar)
    rows = ["path,lat,lng"]
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i},{i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    summary = pack(read_manifest(tmp_path / "m.csv"), tmp_path / "out", workers=1, progress=True)
    assert summary["count"] == 3
    assert "packing" not in capsys.readouterr().err
