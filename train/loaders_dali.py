"""The NVIDIA DALI backend: fn.readers.file over the manifest's images (the label is the
manifest row, looked up in the label table on the host) or fn.readers.webdataset over packed
shards; decode on the GPU (device='mixed') when the loader's device is CUDA, on the CPU
otherwise (pipeline device_id=None)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from geocell.train.loaders import MEAN, RATIO, SCALE, STD, Loader

log = logging.getLogger("geocell.train.loaders")

_READER = "Reader"


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, manifest, labels, **kw):
        super().__init__(manifest, labels, **kw)
        self._shards = bool(getattr(manifest, "shards", None))
        if self._shards:
            from geocell.train.shards import whole_shards

            self._tars = whole_shards(manifest)
            ids = np.asarray(manifest.ids, dtype=np.int64)
            # Sample id (from KEY.id) -> manifest row.
            self._id_to_row = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
            self._id_to_row[ids] = np.arange(len(ids))
            if self.train and self.num_shards > 1:
                log.info("packed shards: DALI splits samples between %d ranks; ranks may differ "
                         "by one batch when the shard sizes do", self.num_shards)
        self.gpu = self.device.type == "cuda"
        self.detail = ("GPU decode (mixed) on " + str(self.device)) if self.gpu else \
            f"CPU pipeline, {self.num_workers} threads"
        self._build()

    # Training ranks get equally many samples (the tail of a seeded permutation is left out of
    # every epoch) so that data-parallel ranks run the same number of steps.
    def _reader_rows(self) -> np.ndarray:
        rows = self.rows
        if self.train and self.num_shards > 1 and len(rows) % self.num_shards:
            order = np.random.default_rng([self.seed, 7]).permutation(len(rows))
            rows = np.sort(rows[order[: len(rows) - len(rows) % self.num_shards]])
        return rows

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        train = self.train
        S, R = self.image_size, self.resize_size
        gpu = self.gpu
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None
        shard_kw = dict(shard_id=self.shard_id, num_shards=self.num_shards,
                        pad_last_batch=not train, stick_to_shard=not train, name=_READER)
        if self._shards:
            tars = [t for t, _ in self._tars]
            idxs = [i for _, i in self._tars]
            self._n_reader = len(self.manifest)
        else:
            rows = self._reader_rows()
            files = [self.manifest.paths[r] for r in rows]
            self._n_reader = len(rows)
            if self._n_reader == 0:
                raise ValueError("no usable images in the manifest "
                                 f"({self.skipped} skipped: {self.skipped_paths[:3]})")

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                      device_id=device_id, seed=self.seed, prefetch_queue_depth=2)
        def pipeline():
            if self._shards:
                jpegs, ids = fn.readers.webdataset(
                    paths=tars, index_paths=idxs, ext=["jpg", "id"],
                    dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                    random_shuffle=train, initial_fill=min(4096, max(1, self._n_reader)),
                    seed=self.seed, **shard_kw)
            else:
                # Manifest rows travel as the file labels (int32 suffices below 2**31 rows).
                jpegs, ids = fn.readers.file(
                    files=files, labels=[int(r) for r in rows], shuffle_after_epoch=train,
                    seed=self.seed, **shard_kw)
            decoder_device = "mixed" if gpu else "cpu"
            if train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=decoder_device, output_type=types.RGB,
                    random_area=list(SCALE), random_aspect_ratio=list(RATIO), num_attempts=10)
                images = fn.resize(images, resize_x=S, resize_y=S, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
                crop = None
            else:
                images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=R, antialias=True)
                mirror = 0
                crop = (S, S)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
                mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])
            return images, ids

        self._pipe = pipeline()
        self._pipe.build()
        self._iter = DALIGenericIterator(
            [self._pipe], ["images", "ids"], reader_name=_READER, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
            prepare_first_batch=False)

    def __len__(self):
        return len(self._iter)

    def set_epoch(self, epoch: int) -> None:
        # DALI reshuffles by itself after every epoch from its seed; the epoch number is
        # recorded for callers but cannot re-seed a built pipeline.
        self.epoch = int(epoch)

    def _rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1).to(torch.int64).cpu()
        if self._shards:
            return torch.from_numpy(self._id_to_row[ids.numpy()])
        return ids

    def __iter__(self):
        seen = set() if not self.train else None
        while True:
            try:
                for batch in self._iter:
                    out = batch[0]
                    rows = self._rows_of(out["ids"])
                    images = out["images"]
                    if seen is not None:
                        # After a pipeline rebuild the epoch restarts; never repeat a sample.
                        fresh = [i for i, r in enumerate(rows.tolist()) if r not in seen]
                        if len(fresh) != len(rows):
                            if not fresh:
                                continue
                            rows, images = rows[fresh], images[fresh]
                        seen.update(rows.tolist())
                    yield images.to(self.device), self._targets(rows)
                return
            except RuntimeError as e:
                if not self._recover(e):
                    raise

    def _recover(self, error) -> bool:
        """A decoder error inside DALI breaks the pipeline: find the images that do not decode
        (full decode with Pillow), exclude and count them, rebuild, and go on."""
        if self._shards:
            return False  # shards hold only images that decoded while packing
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("DALI pipeline failed (%s); checking every image by decoding it", msg)
        bad = _undecodable([self.manifest.paths[r] for r in self.rows])
        if not bad:
            return False
        for pos, reason in bad:
            self.skipped_paths.append((self.manifest.paths[self.rows[pos]], reason))
        keep = np.ones(len(self.rows), dtype=bool)
        keep[[p for p, _ in bad]] = False
        self.rows = self.rows[keep]
        self._build()
        return True


def _undecodable(paths) -> list:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def check(p):
        try:
            with Image.open(p) as im:
                im.load()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(4) as ex:
        reasons = list(ex.map(check, paths))
    return [(i, r) for i, r in enumerate(reasons) if r is not None]
