"""The NVIDIA DALI backend: fn.readers.file over the manifest's images (the label is the
manifest row, looked up in the label table on the host) or fn.readers.webdataset over packed
shards; decode on the GPU (device='mixed') when the loader's device is CUDA, on the CPU
otherwise (pipeline device_id=None). On the GPU the pipeline also resizes, mirrors and
normalizes; on the CPU it stops at the decoded uint8 crops (ROI decode) and ``_HostBatches``
finishes them with the core's resampling kernel (``geocell.loading.resample``): DALI's CPU resize
cost more than the JPEG decode itself.

Training epochs are reproducible from (seed, epoch), whatever the number of threads:

- image files: each iteration builds a pipeline (cheap) whose fn.readers.file gets this rank's
  slice of the epoch permutation (``epoch_rows``, the torch backend's order) as an explicit,
  unshuffled file list, cut to whole batches. Crop and flip do not come from DALI's random
  operators: an external source feeds, per sample, the area fraction times and over the aspect
  ratio, the window's relative (x, y), and the flip, drawn from
  ``sample_uniforms((seed, epoch), rows)``; the pipeline turns them into a relative crop window
  with the image's aspect ratio (``fn.peek_image_shape``), clamped to the image (instead of
  torchvision's retries), decoded with ``fn.decoders.image_slice``.
  ``skip_batches(k)`` starts the file list at batch k (mid-epoch resume reads nothing twice).
- packed shards (fn.readers.webdataset): any subset of a packed folder's rows (a split drawn
  inside a folder packed as one split, e.g. the default held-out split of a downloaded
  dataset) reads through copies of the shard indexes that list only its samples
  (``shard_indexes``), so DALI still reads and decodes natively. LIMIT. The reader streams tar files through a shuffle
  buffer, so the epoch order cannot be the (seed, epoch) permutation; it is DALI's shuffle-buffer
  order, with the reader seed derived from (seed, epoch), the pipeline rebuilt per epoch and the
  rank's shard rotated by the epoch (as DALI does without ``stick_to_shard``). Augmentation
  parameters come from (seed, epoch, shard, position in the epoch). That is deterministic as far
  as the reader is (not checked by the tests); ``skip_batches`` reads and drops the batches.
  Ranks may differ by one sample per epoch; every rank yields ``len(loader)`` batches.

Evaluation reads every sample of the shard exactly once (DALI sharding with padding, the
padding duplicates dropped on the host).

Images that pass the up-front check but do not decode break a DALI pipeline; ``_recover``
then decodes every image with Pillow, counts the bad ones in ``skipped_paths`` and rebuilds:

- image files, training: a bad row keeps its place in the epoch permutation, its file replaced
  by a good one whose sample is dropped on the host, so batch k of an epoch holds the same rows
  (less the bad ones) whether the bad image was found in this run or not: a resumed run is
  exact. Evaluation leaves the bad rows out.
- packed shards: the bad samples are left out of copies of the shards' index files (in a
  temporary folder), which the webdataset reader then follows."""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref

import numpy as np
import torch

from geocell.loading.base import Loader, epoch_rows, sample_uniforms
from geocell.loading.resample import BatchWriter, centre_crop_boxes
from geocell.data.images import decode_rgb
from geocell.data.shards import read_sample, sample_locations, shard_indexes, write_index_without

log = logging.getLogger("geocell.loading.base")

_READER = "Reader"
_DROP = -1  # the label of a stand-in sample (an undecodable row's slot), dropped on the host


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, manifest, labels, **kw):
        super().__init__(manifest, labels, **kw)
        self._shards = bool(getattr(manifest, "shards", None))
        self._index_dir = None  # index copies: subsets of shards, or shards less bad samples
        if self._shards:
            self._tars = shard_indexes(manifest, self._index_folder())
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
            f"CPU pipeline, {self.num_workers} threads, resampling by geocell's kernel"
        self._start = 0
        self._iter = None
        self._undecodable: set = set()  # manifest rows found not to decode at run time
        if not self.gpu:
            spec = self.preprocess
            self._writer = BatchWriter(spec.image_size, spec.mean, spec.std, threads=max(1, self.num_workers))
        if not self.train:
            self._iter = self._build_eval()

    def _index_folder(self) -> str:
        """A temporary folder for index copies, removed with the loader."""
        if self._index_dir is None:
            self._index_dir = tempfile.mkdtemp(prefix="geocell-dali-index-")
            weakref.finalize(self, shutil.rmtree, self._index_dir, True)
        return self._index_dir

    # -- pipelines -------------------------------------------------------------------------------

    def _device_id(self):
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _decode(self, jpegs, params=None, flip=None):
        """Training (``params``: per-sample (area * ratio, area / ratio) and (x, y) in [0, 1)):
        the random-resized crop, decoded straight from the JPEG (ROI decode). Evaluation: the
        whole image. On the GPU
        the pipeline also resizes, mirrors and normalizes (CHW float); on the CPU it returns
        the uint8 images and ``BatchWriter`` does that on the host (DALI's CPU resize costs
        several times more than the core's kernel)."""
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath

        spec = self.preprocess
        S, R = spec.image_size, spec.resize_size
        decoder_device = "mixed" if self.gpu else "cpu"
        if params is not None:
            # params: (area * ratio, area / ratio) and the window's relative (x, y), so the
            # relative window is a few whole-batch expressions (each DALI op costs per batch).
            area_ratio, xy = params
            hw = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
            h, w = hw[0], hw[1]
            shape = dmath.min(dmath.sqrt(area_ratio * fn.stack(h / w, w / h)), 1.0)  # "WH"
            start = xy * (1.0 - shape)
            images = fn.decoders.image_slice(jpegs, start, shape, device=decoder_device,
                                             output_type=types.RGB)
            if not self.gpu:
                return images
            images = fn.resize(images, resize_x=S, resize_y=S, antialias=True)
            mirror, crop = flip, None
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            if not self.gpu:
                return images
            images = fn.resize(images, resize_shorter=R, antialias=True)
            mirror, crop = 0, (S, S)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
            mean=[m * 255 for m in spec.mean], std=[s * 255 for s in spec.std])

    def _iterator(self, pipe, train):
        """Batches as DALIGenericIterator gives them: a list with one dict of "images", "ids"."""
        if not self.gpu:
            return _HostBatches(pipe, train, self._writer, self.preprocess.resize_size)
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
        scale, aspect, hflip = self.preprocess.crop_scale, self.preprocess.crop_ratio, self.preprocess.hflip
        pipe_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        shards = self._shards
        nb = len(rows) // B if not shards else 0

        def draw(key, ids):
            u = sample_uniforms(key, ids, 5)
            area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
            ratio = np.exp(np.log(aspect[0]) + (np.log(aspect[1]) - np.log(aspect[0])) * u[:, 1])
            # Dense batches (no per-sample objects): see _decode for the window.
            return (np.stack([area * ratio, area / ratio], 1).astype(np.float32),
                    np.ascontiguousarray(u[:, 2:4], dtype=np.float32), (u[:, 4] < hflip).astype(np.int32))

        def params(info):
            # Called in batch order (also ahead, for prefetching); wraps like the reader does.
            if shards:
                pos = info.iteration * B
                return draw((seed, epoch, self.num_shards, shard), np.arange(pos, pos + B))
            i = info.iteration % nb
            return draw((seed, epoch), rows[i * B:(i + 1) * B])

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
                files, labels = self._files_and_labels(rows)
                jpegs, ids = fn.readers.file(
                    files=files, labels=labels,
                    random_shuffle=False, shuffle_after_epoch=False, name=_READER)
            area_ratio, xy, flip = fn.external_source(
                source=params, num_outputs=3, batch=True, batch_info=True,
                dtype=[types.FLOAT, types.FLOAT, types.INT32])
            if not self.gpu:
                return self._decode(jpegs, (area_ratio, xy)), ids, flip
            return self._decode(jpegs, (area_ratio, xy), flip), ids

        return self._iterator(pipeline(), True)

    def _files_and_labels(self, rows):
        """The reader's file list for ``rows``: a row found undecodable keeps its slot with a
        stand-in file and the label _DROP (so the batches keep their rows)."""
        paths = self.manifest.paths
        if not self._undecodable:
            return [paths[r] for r in rows], [int(r) for r in rows]
        stand_in = next((paths[r] for r in self.rows if int(r) not in self._undecodable), None)
        if stand_in is None:
            raise ValueError(f"no decodable images ({self.skipped} skipped: {self.skipped_paths[:3]})")
        bad = self._undecodable
        return ([stand_in if int(r) in bad else paths[r] for r in rows],
                [_DROP if int(r) in bad else int(r) for r in rows])

    # -- the Loader interface --------------------------------------------------------------------

    def __len__(self):
        if self.train:
            n = len(self.manifest) - len(self._undecodable) if self._shards else len(self.rows)
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
                    images, rows = out["images"], self._rows_of(out["ids"])
                    keep = rows != _DROP
                    done += 1
                    if bool(keep.all()):
                        yield images.to(self.device), self._targets(rows)
                    elif bool(keep.any()):
                        idx = keep.nonzero().reshape(-1)
                        yield (images.index_select(0, idx.to(images.device)).to(self.device),
                               self._targets(rows[idx]))
                    if done >= steps:
                        break
                return
            except RuntimeError as e:
                if not self._recover(e):
                    raise
                steps = min(steps, len(self))

    def _recover(self, error) -> bool:
        """A decoder error inside DALI breaks the pipeline: find the images that do not decode
        (full decode with Pillow), count them and rebuild (see the module doc for how each case
        goes on). False when every image decodes (the error was something else)."""
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("DALI pipeline failed (%s); checking every image by decoding it", msg)
        if self._shards:
            return self._recover_shards()
        rows = [int(r) for r in self.rows if int(r) not in self._undecodable]
        paths = self.manifest.paths
        bad = _undecodable([paths[r] for r in rows], _read_file)
        if not bad:
            return False
        for pos, reason in bad:
            self.skipped_paths.append((paths[rows[pos]], reason))
            self._undecodable.add(rows[pos])
        if not self.train:
            keep = np.array([int(r) not in self._undecodable for r in self.rows], dtype=bool)
            self.rows = self.rows[keep]
            self._iter = self._build_eval()
        return True

    def _recover_shards(self) -> bool:

        tars, tar_of, offset, size = sample_locations(self.manifest)
        rows = [r for r in range(len(self.manifest)) if r not in self._undecodable]
        bad = _undecodable(rows, lambda r: read_sample(tars[tar_of[r]], offset[r], size[r]))
        if not bad:
            return False
        ids = np.asarray(self.manifest.ids, dtype=np.int64)
        for pos, reason in bad:
            r = rows[pos]
            self._undecodable.add(r)
            self.skipped_paths.append((f"{self.manifest.paths[r]} (sample {int(ids[r])} of "
                                       f"{tars[tar_of[r]]})", reason))
        drop_ids = {int(ids[r]) for r in self._undecodable}
        tars_now = []
        for k, (tar, idx) in enumerate(self._tars):
            filtered = f"{self._index_folder()}/{len(self._undecodable)}-{k}.idx"  # never one read
            if write_index_without(idx, drop_ids, filtered):
                tars_now.append((tar, filtered))
        if not tars_now:
            raise ValueError(f"no decodable samples in the shards ({self.skipped} skipped)")
        self._tars = tars_now
        if not self.train:
            self._iter = self._build_eval()
        return True


class _HostBatches:
    """Runs a CPU pipeline whose outputs are uint8 images (any size), manifest rows or sample
    ids, and (training) mirror flags, and turns each batch into normalized float images with a
    ``BatchWriter``. Training: endless (the loader stops after its batches). Evaluation: one pass
    over the shard, the padding of the last batch dropped (DALI's PARTIAL policy)."""

    def __init__(self, pipe, train, writer, resize_size):
        pipe.build()
        self.pipe, self.train, self.writer = pipe, train, writer
        self.resize_size = resize_size
        meta = pipe.reader_meta(_READER)
        n, shards, shard = meta["epoch_size"], meta["number_of_shards"], meta["shard_id"]
        # DALI's split of the samples between shards (as its framework iterators compute it).
        self.shard_size = (n * (shard + 1)) // shards - (n * shard) // shards
        self.batch_size = pipe.max_batch_size
        self._unread = 0  # batches of an abandoned evaluation pass still in the pipeline

    def __len__(self):
        return -(-self.shard_size // self.batch_size)

    def __iter__(self):
        for _ in range(self._unread):  # the next pass must start at the shard's first sample
            self.pipe.run()
        self._unread = 0 if self.train else len(self)
        remaining = self.shard_size
        while self.train or remaining > 0:
            outs = self.pipe.run()
            self._unread = max(0, self._unread - 1)
            images, ids = outs[0], outs[1].as_array().reshape(-1)
            n = len(ids) if self.train else min(len(ids), remaining)
            remaining -= n
            views = [np.asarray(images[i]) for i in range(n)]
            if self.train:
                batch = self.writer(views, flip=outs[2].as_array().reshape(-1)[:n])
            else:
                boxes = centre_crop_boxes([v.shape[0] for v in views], [v.shape[1] for v in views],
                                          self.resize_size, self.writer.size)
                batch = self.writer(views, boxes)
            yield [{"images": batch, "ids": torch.from_numpy(np.array(ids[:n], dtype=np.int64))}]


def _read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _undecodable(items, read) -> list:
    """(position, reason) of the items whose bytes (``read(item)``) do not decode with Pillow
    (the shared pixel limit included)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item):
        try:
            decode_rgb(read(item))
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(4) as ex:
        reasons = list(ex.map(check, items))
    return [(i, r) for i, r in enumerate(reasons) if r is not None]
