"""The NVIDIA DALI backend: fn.readers.file over the manifest's images (the label is the
manifest row, looked up in the label table on the host) or fn.readers.webdataset over packed
shards; decode on the GPU (device='mixed') when the loader's device is CUDA, on the CPU
otherwise (pipeline device_id=None).

Training epochs are reproducible from (seed, epoch), whatever the number of threads:

- image files: each iteration builds a pipeline (cheap) whose fn.readers.file gets this rank's
  slice of the epoch permutation (``epoch_rows``, the torch backend's order) as an explicit,
  unshuffled file list, cut to whole batches. Crop and flip do not come from DALI's random
  operators: an external source feeds, per sample, (area fraction, aspect ratio, x, y, flip)
  drawn from ``sample_rng(seed, epoch, row)``; the pipeline turns them into a relative crop
  window with the image's aspect ratio (``fn.peek_image_shape``), clamped to the image
  (instead of torchvision's retries), decoded with ``fn.decoders.image_slice``.
  ``skip_batches(k)`` starts the file list at batch k (mid-epoch resume reads nothing twice).
- packed shards (fn.readers.webdataset): LIMIT. The reader streams tar files through a shuffle
  buffer, so the epoch order cannot be the (seed, epoch) permutation; it is DALI's shuffle-buffer
  order, with the reader seed derived from (seed, epoch), the pipeline rebuilt per epoch and the
  rank's shard rotated by the epoch (as DALI does without ``stick_to_shard``). Augmentation
  parameters come from (seed, epoch, shard, position in the epoch). That is deterministic as far
  as the reader is (not checked by the tests); ``skip_batches`` reads and drops the batches.
  Ranks may differ by one sample per epoch; every rank yields ``len(loader)`` batches.

Evaluation reads every sample of the shard exactly once (DALI sharding with padding, the
padding duplicates dropped on the host)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from geocell.train.loaders import MEAN, RATIO, SCALE, STD, Loader, epoch_rows, sample_rng

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
                         "by one sample when the shard sizes do", self.num_shards)
        elif len(self.rows) == 0:
            raise ValueError("no usable images in the manifest "
                             f"({self.skipped} skipped: {self.skipped_paths[:3]})")
        self.gpu = self.device.type == "cuda"
        self.detail = ("GPU decode (mixed) on " + str(self.device)) if self.gpu else \
            f"CPU pipeline, {self.num_workers} threads"
        self._start = 0
        self._iter = None
        if not self.train:
            self._iter = self._build_eval()

    # -- pipelines -------------------------------------------------------------------------------

    def _device_id(self):
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _decode(self, jpegs, params=None, flip=None):
        """Decoded, cropped, resized, normalized CHW float images. ``params``: per-sample
        (area, ratio, x, y) for training, None for evaluation."""
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath

        S, R = self.image_size, self.resize_size
        decoder_device = "mixed" if self.gpu else "cpu"
        if params is not None:
            hw = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
            aspect = hw[0] / hw[1]  # H / W
            w_rel = dmath.min(dmath.sqrt(params[0] * params[1] * aspect), 1.0)
            h_rel = dmath.min(dmath.sqrt(params[0] / params[1] / aspect), 1.0)
            start = fn.stack(params[2] * (1.0 - w_rel), params[3] * (1.0 - h_rel))
            shape = fn.stack(w_rel, h_rel)  # axis_names "WH"
            images = fn.decoders.image_slice(jpegs, start, shape, device=decoder_device,
                                             output_type=types.RGB)
            images = fn.resize(images, resize_x=S, resize_y=S, antialias=True)
            mirror, crop = flip, None
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=R, antialias=True)
            mirror, crop = 0, (S, S)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
            mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])

    def _iterator(self, pipe, train):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe.build()
        return DALIGenericIterator(
            [pipe], ["images", "ids"], reader_name=_READER, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
            prepare_first_batch=False)

    def _build_eval(self):
        from nvidia.dali import fn, pipeline_def, types

        shard_kw = dict(shard_id=self.shard_id, num_shards=self.num_shards, pad_last_batch=True,
                        stick_to_shard=True, name=_READER)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                      device_id=self._device_id(), seed=self.seed, prefetch_queue_depth=2)
        def pipeline():
            if self._shards:
                jpegs, ids = fn.readers.webdataset(
                    paths=[t for t, _ in self._tars], index_paths=[i for _, i in self._tars],
                    ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                    missing_component_behavior="error", random_shuffle=False, **shard_kw)
            else:
                # Manifest rows travel as the file labels (int32 suffices below 2**31 rows).
                jpegs, ids = fn.readers.file(
                    files=[self.manifest.paths[r] for r in self.rows],
                    labels=[int(r) for r in self.rows], random_shuffle=False, **shard_kw)
            return self._decode(jpegs), ids

        return self._iterator(pipeline(), False)

    def _build_train(self, rows, first):
        """Files: a pipeline over ``rows`` (whole batches, in order); batch i of it is batch
        ``first + i`` of the epoch. Packed shards: the epoch's reader (``rows`` unused)."""
        from nvidia.dali import fn, pipeline_def, types

        B, seed, epoch = self.batch_size, self.seed, self.epoch
        pipe_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        shards = self._shards
        nb = len(rows) // B if not shards else 0

        def draw(rng):
            return (np.array([rng.uniform(SCALE[0], SCALE[1]),
                              np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1]))),
                              rng.random(), rng.random()], dtype=np.float32),
                    np.array(rng.random() < 0.5, dtype=np.int32))

        def params(info):
            # Called in batch order (also ahead, for prefetching); wraps like the reader does.
            if shards:
                pos = info.iteration * B
                out = [draw(np.random.default_rng([seed, epoch, self.num_shards, shard, pos + k, 1]))
                       for k in range(B)]
            else:
                i = info.iteration % nb
                out = [draw(sample_rng(seed, epoch, r)) for r in rows[i * B:(i + 1) * B]]
            return [o[0] for o in out], [o[1] for o in out]

        shard = (self.shard_id + epoch) % self.num_shards

        @pipeline_def(batch_size=B, num_threads=max(1, self.num_workers),
                      device_id=self._device_id(), seed=pipe_seed, prefetch_queue_depth=2)
        def pipeline():
            if shards:
                jpegs, ids = fn.readers.webdataset(
                    paths=[t for t, _ in self._tars], index_paths=[i for _, i in self._tars],
                    ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                    missing_component_behavior="error", random_shuffle=True,
                    initial_fill=min(4096, max(1, len(self.manifest))), seed=pipe_seed,
                    shard_id=shard, num_shards=self.num_shards, pad_last_batch=False,
                    stick_to_shard=True, name=_READER)
            else:
                jpegs, ids = fn.readers.file(
                    files=[self.manifest.paths[r] for r in rows], labels=[int(r) for r in rows],
                    random_shuffle=False, shuffle_after_epoch=False, name=_READER)
            crop, flip = fn.external_source(source=params, num_outputs=2, batch=True,
                                            batch_info=True, dtype=[types.FLOAT, types.INT32])
            return self._decode(jpegs, crop, flip), ids

        return self._iterator(pipeline(), True)

    # -- the Loader interface --------------------------------------------------------------------

    def __len__(self):
        if self.train:
            n = len(self.manifest) if self._shards else len(self.rows)
            return (n // self.num_shards) // self.batch_size
        return len(self._iter)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_batches(self, count: int) -> None:
        if not self.train:
            raise ValueError("skip_batches is for training loaders")
        self._start = int(count)

    def _rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1).to(torch.int64).cpu()
        if self._shards:
            return torch.from_numpy(self._id_to_row[ids.numpy()])
        return ids

    def __iter__(self):
        if self.train:
            yield from self._iter_train()
            return
        seen = set()
        while True:
            try:
                for batch in self._iter:
                    out = batch[0]
                    rows = self._rows_of(out["ids"])
                    images = out["images"]
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

    def _iter_train(self):
        first, self._start = self._start, 0
        steps = len(self)
        done = first  # batches of the epoch yielded (or skipped) so far
        while done < steps:
            if self._shards:
                it, drop = self._build_train(None, 0), done
            else:
                rows = epoch_rows(self.rows, self.seed, self.epoch, self.shard_id, self.num_shards)
                rows = rows[done * self.batch_size:steps * self.batch_size]
                it, drop = self._build_train(rows, done), 0
            try:
                for batch in it:
                    if drop:
                        drop -= 1
                        continue
                    out = batch[0]
                    yield out["images"].to(self.device), self._targets(self._rows_of(out["ids"]))
                    done += 1
                    if done >= steps:
                        break
                return
            except RuntimeError as e:
                if not self._recover(e):
                    raise

    def _recover(self, error) -> bool:
        """A decoder error inside DALI breaks the pipeline: find the images that do not decode
        (full decode with Pillow), exclude and count them, rebuild, and go on (training: from the
        next batch of the epoch permutation of the remaining rows)."""
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
        if not self.train:
            self._iter = self._build_eval()
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
