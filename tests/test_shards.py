"""WebDataset packing: round trip through a plain tar read and DALI's webdataset reader,
broken images skipped and reported, index files identical to DALI's wds2idx."""

import json
import shutil
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from geocell.commands.data import main as data_main
from geocell.loading.labels import LabelTable
from geocell.data.dataset import read_dataset
from geocell.data.manifest import read_manifest
from geocell.data.shards import read_index


def _dataset(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,lat,lng,scene,split"]
    for i in range(n):
        w, h = (200, 120) if i % 2 else (90, 150)
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=80)
        rows.append(f"{i}.jpg,{-60 + 10 * i},{-170 + 25 * i},{['water', 'coast', 'land'][i % 3]},"
                    f"{'val' if i % 4 == 0 else 'train'}")
    # Broken inputs: truncated JPEG, text with a .jpg name, empty file.
    good = (folder / "0.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    rows += ["trunc.jpg,1,1,land,train", "text.jpg,2,2,land,train", "empty.jpg,3,3,land,val"]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    manifest = _dataset(base / "src")
    out = base / "packed"
    code = data_main(["pack", str(manifest), "-o", str(out), "--shorter-side", "64",
                      "--shard-size", "4", "--workers", "2", "-q"])
    assert code == 0
    return manifest, out


def test_pack_skips_and_reports_broken_images(packed):
    _, out = packed
    meta = json.loads((out / "shards.json").read_text())
    assert meta["count"] == 12 and meta["skipped"] == 3
    report = (out / "pack_report.csv").read_text()
    for name in ("trunc.jpg", "text.jpg", "empty.jpg"):
        assert name in report
    assert {s["split"] for s in meta["shards"]} == {"train", "val"}


def test_plain_tar_read_back(packed):
    src_manifest, out = packed
    src = read_manifest(src_manifest)
    by_path = {p: i for i, p in enumerate(src.paths)}
    seen = 0
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert int(members[f"{key}.cls"]) == meta["id"] == struct.unpack("<q", members[f"{key}.id"])[0]
            row = by_path[meta["path"]]
            assert meta["lat"] == src.lat[row] and meta["scene"] == src.scene[row]
            img = Image.open(__import__("io").BytesIO(members[f"{key}.jpg"]))
            assert min(img.size) == 64 and img.format == "JPEG"
            with Image.open(meta["path"]) as orig:
                ow, oh = orig.size
            assert abs(img.size[0] / img.size[1] - ow / oh) < 0.05
            seen += 1
        # The index is DALI's v1.2 format and points at the member data.
        index = read_index(str(tar_path)[:-4] + ".idx")
        assert len(index) == len(keys)
        raw = tar_path.read_bytes()
        for key, sample in zip(keys, index):
            off, size = sample["jpg"]
            assert raw[off:off + size] == members[f"{key}.jpg"]
    assert seen == 12


def test_index_matches_dali_wds2idx(packed, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    _, out = packed
    tar_path = sorted(out.glob("*.tar"))[0]
    ic = wds2idx.IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False)
    ic.create_index()
    ic.close()
    assert (tmp_path / "ref.idx").read_text() == (tar_path.with_suffix(".idx")).read_text()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_read_shards(packed, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from geocell.loading.loaders import make_loader
    from geocell.loading.preprocess import Preprocess

    _, out = packed
    m = read_dataset(out)
    assert m.shards and len(m) == 12
    labels = LabelTable(geo=np.arange(12)[:, None] * 3, scene=m.scene, latlng=np.stack([m.lat, m.lng], 1))
    val = m.with_split("val")
    for part, expected in ((m, 12), (val, 3)):
        lt = labels.take(np.flatnonzero(m.split == "val")) if part is val else labels
        ld = make_loader(part, lt, train=False, batch_size=5, preprocess=Preprocess(32, 40),
                         backend=backend, num_workers=1 if backend == "dali" else 0)
        idx, geo = [], []
        for x, t in ld:
            assert x.shape[1:] == (3, 32, 32) and x.dtype.is_floating_point
            idx += t["index"].tolist()
            geo += t["geo"][:, 0].tolist()
        assert sorted(idx) == list(range(expected)) and len(idx) == expected
        assert geo == lt.geo[idx, 0].tolist()
        assert ld.skipped == 0
