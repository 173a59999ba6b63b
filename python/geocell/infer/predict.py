"""Locate photos with a trained checkpoint: the Python API (:class:`Geolocator`), behind ``geocell predict``.

For each image: the top-k fine cells of the hierarchical prediction (fine probability ×
the probabilities of the coarser cells containing it, renormalised), each partitioning's
own top-k, and the 90 % credible region (fewest fine cells holding 90 % of the
probability) with its area in km². Optionally a probability map per image.

With a retrieval index (``<checkpoint stem>.retrieval.npz``, or ``--index``) and a calibrated
checkpoint the best guess and the credible region are the hybrid's: the cells' mixture joined
by the nearest training photos (:mod:`geocell.infer.retrieval`); ``--no-retrieval`` turns it off.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from geocell.cells import cell_to_token
from geocell._internal.geometry import unit_vectors
from geocell._internal.progress import progress_bar
from geocell.data.images import decode_rgb
from geocell.infer.hybrid import best_guess, neighbour_kernels
from geocell.infer.mixture import Mixture, background_for, combined_log_probs
from geocell.infer.regions import credible_region
from geocell.infer.retrieval import RetrievalIndex, forward_with_embeddings, index_path_for, normalise
from geocell.loading.files import make_transform, stream_files
from geocell.loading.preprocess import Preprocess
from geocell.model.checkpoint import CheckpointError, checkpoint_fingerprint, load_checkpoint, model_from_checkpoint
from geocell.model.records import Calibration, HybridFit, region_groups_from_dict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TTA_COMBINE = ("max", "mean")


# ----------------------------------------------------------------------------- results


@dataclass
class CellGuess:
    """One candidate location: the mean training location of a cell and its probability."""

    lat: float
    lng: float
    probability: float
    cell: str            # S2 token
    partitioning: str
    level: int

    def to_dict(self) -> dict:
        return {"lat": self.lat, "lng": self.lng, "probability": self.probability,
                "cell": self.cell, "partitioning": self.partitioning, "level": self.level}


@dataclass
class Prediction:
    """Everything predicted for one image (``to_dict()`` is the JSON record)."""

    image: str
    top_k: list[CellGuess]                      # hierarchical, most probable first
    hierarchical_top1: CellGuess
    per_partitioning: dict[str, list[CellGuess]]
    region_mass: float
    region_covered: float
    region_area_km2: float
    region_cells: list[str]
    scenes: list[tuple[str, float]] = field(default_factory=list)
    retrieval: dict | None = None  # the hybrid's best guess, its weight and the neighbours, when used
    fine_probs: np.ndarray | None = field(default=None, repr=False)  # kept only when asked (maps)
    region_cell_ids: np.ndarray | None = field(default=None, repr=False)  # credible region, S2 ids (maps)

    @property
    def best_guess(self) -> tuple[float, float]:
        """(lat, lng) of the prediction: with retrieval the hybrid's guess (the top cell's where the
        nearest training photo is too unlike the image: ``retrieval["source"]``), else the top cell."""
        if self.retrieval is not None:
            return self.retrieval["lat"], self.retrieval["lng"]
        return self.hierarchical_top1.lat, self.hierarchical_top1.lng

    def to_dict(self) -> dict:
        lat, lng = self.best_guess
        return {
            "image": self.image,
            "best_guess": {"lat": lat, "lng": lng,
                           "source": self.retrieval.get("source", "hybrid") if self.retrieval is not None else "cells"},
            "retrieval": self.retrieval,
            "top_k": [g.to_dict() for g in self.top_k],
            "hierarchical_top1": self.hierarchical_top1.to_dict(),
            "per_partitioning": {name: [g.to_dict() for g in guesses]
                                 for name, guesses in self.per_partitioning.items()},
            "credible_region": {"mass": self.region_mass, "covered": self.region_covered,
                                "num_cells": len(self.region_cells), "area_km2": self.region_area_km2,
                                "cells": list(self.region_cells)},
            "scenes": [{"name": n, "probability": p} for n, p in self.scenes],
        }


# ----------------------------------------------------------------------------- images


def _to_pil(image):
    """A PIL RGB image from a PIL image, HWC uint8 array or CHW tensor (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from geocell.data.images import to_rgb8

        return to_rgb8(image)
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = t.clamp(0, 1)
        return to_pil_image(t).convert("RGB")
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W, 3) array, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got dtype {a.dtype}")
        return Image.fromarray(a.squeeze(2) if a.shape[2] == 1 else a).convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


HEIF_EXTENSIONS = (".heic", ".heif")


def _heif_enabled() -> bool:
    """Whether HEIC/HEIF photos can be read: with pillow-heif installed, its Pillow opener."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _kind(st_mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(st_mode):
            return name
    return "not a regular file"


def list_inputs(inputs: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to predict, [(file, why it is not predicted)]): files as given; folders replaced
    by the image files under them (recursively, sorted). Every other file under a folder is
    named with its reason (HEIC without pillow-heif, another extension, a named pipe...): only
    regular files are opened, so a pipe cannot hang the run."""
    import stat

    heif = None
    paths, passed = [], []
    for item in inputs:
        if not os.path.isdir(item):
            paths.append(item)  # a missing or special file is reported by the decoder, not dropped
            continue
        found = []
        for root, dirs, files in os.walk(item):
            dirs.sort()
            for f in files:
                path = os.path.join(root, f)
                ext = os.path.splitext(f)[1].lower()
                try:
                    mode = os.stat(path).st_mode
                except OSError as exc:
                    found.append((path, f"cannot be read ({exc.strerror or exc})"))
                    continue
                if not stat.S_ISREG(mode):
                    found.append((path, f"{_kind(mode)}, not a photo file"))
                elif ext in IMAGE_EXTENSIONS:
                    found.append((path, None))
                elif ext in HEIF_EXTENSIONS:
                    heif = _heif_enabled() if heif is None else heif
                    found.append((path, None if heif else
                                  "HEIC/HEIF photo: install pillow-heif (pip install pillow-heif) to "
                                  "read it, or convert it to JPEG"))
                else:
                    found.append((path, f"not a photo extension ({', '.join(IMAGE_EXTENSIONS)})"))
        for path, why in sorted(found):
            (paths.append(path) if why is None else passed.append((path, why)))
    return paths, passed


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """The files ``list_inputs`` predicts."""
    return list_inputs(inputs)[0]


# ----------------------------------------------------------------------------- the predictor


def combine_crops(probs: torch.Tensor, n_crops: int, how: str) -> torch.Tensor:
    """(B * n_crops, C) per-crop probabilities -> (B, C), by max or mean over the crops.
    The max is renormalised so each row stays a distribution (argmax unchanged)."""
    if how not in TTA_COMBINE:
        raise ValueError(f"unknown tta combine {how!r}; choose one of {', '.join(TTA_COMBINE)}")
    p = probs.reshape(-1, n_crops, probs.shape[-1])
    if how == "mean":
        return p.mean(dim=1)
    p = p.amax(dim=1)
    return p / p.sum(dim=1, keepdim=True)


class Geolocator:
    """Predicts where photos were taken, from a self-contained geocell checkpoint.

    >>> geo = Geolocator.from_checkpoint("model.pt")
    >>> result = geo.predict("photo.jpg")            # one Prediction
    >>> results = geo.predict(["a.jpg", pil_image])  # a list
    >>> result.hierarchical_top1.lat, result.region_area_km2

    Images may be paths, PIL images, (H, W, 3) uint8 arrays or (3, H, W) tensors
    (uint8, or float in [0, 1], not normalised); a 4-D array/tensor is a batch.
    """

    def __init__(self, model: torch.nn.Module, partitions: Sequence, hierarchy, *,
                 partition_names: Sequence[str] | None = None, scene_names: Sequence[str] = (),
                 preprocess: Preprocess | dict | None = None, calibration: dict | None = None, device=None,
                 retrieval=None, hybrid: dict | None = None):
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.partitions = list(partitions)
        self.hierarchy = np.asarray(hierarchy, dtype=np.int64)
        self.partition_names = list(partition_names or [f"p{i}" for i in range(len(self.partitions))])
        self.scene_names = list(scene_names)
        # one Preprocess (a checkpoint stores its dict): every transform of this locator is its
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        # uncalibrated checkpoints: the plain product and regions made of fine cells
        self.calibration = Calibration.from_dict(calibration, len(self.partitions))
        if self.hierarchy.shape != (len(self.partitions[-1]), len(self.partitions)):
            raise ValueError(f"hierarchy shape {self.hierarchy.shape} does not match "
                             f"{len(self.partitions)} partitionings with "
                             f"{len(self.partitions[-1])} fine cells")
        self._tokens: list[np.ndarray] | None = None
        self._fine_areas: np.ndarray | None = None
        # retrieval: an index of training photos and the hybrid's fit (the index's, else the calibration's)
        self.notes: list[str] = []   # why retrieval is off although an index was given
        self.retrieval, self.hybrid = None, None
        if retrieval is not None:
            own = hybrid or retrieval.fit  # a fit of its own (index build --fit-split), else the checkpoint's
            fit = HybridFit.from_dict(own) if own else self.calibration.hybrid
            if not self.calibration.calibrated:
                self.notes.append("retrieval off: the checkpoint is not calibrated")
            elif fit is None:
                self.notes.append("retrieval off: no fitted hybrid in the index or the checkpoint "
                                  "(geocell index build --fit-split val)")
            else:
                self.retrieval, self.hybrid = retrieval, fit
                if own and own.get("region_scores"):  # the index's fit brings its regions too
                    self.calibration = dataclasses.replace(self.calibration,
                                                           region_scores=tuple(own["region_scores"]),
                                                           **region_groups_from_dict(own))

    @classmethod
    def from_checkpoint(cls, path, device=None, *, index=None, retrieval: bool = True) -> "Geolocator":
        """Load a checkpoint safely (tensors and plain data only; nothing is executed). With
        ``retrieval``, the index ``index`` or else ``<checkpoint stem>.retrieval.npz`` when it
        exists; an index made by another checkpoint is refused (RetrievalError)."""
        ckpt = load_checkpoint(path, map_location="cpu")
        if not ckpt.get("partitions"):
            raise CheckpointError(f"{os.fspath(path)}: no partitionings (a scene-only checkpoint "
                                  "cannot locate photos)")
        model, partitions, hierarchy = model_from_checkpoint(ckpt)
        names = [str(p.get("name", f"p{i}")) for i, p in enumerate(ckpt["partitions"])]
        found = None
        if retrieval:
            index_path = index if index is not None else index_path_for(path)
            if index is not None or os.path.isfile(index_path):
                found = RetrievalIndex.load(index_path, fingerprint=checkpoint_fingerprint(ckpt))
        return cls(model, partitions, hierarchy, partition_names=names,
                   scene_names=ckpt.get("scene_names", []), preprocess=ckpt.get("preprocess"),
                   calibration=ckpt.get("calibration"), device=device, retrieval=found)

    # -- cached per-cell data

    @property
    def fine(self):
        return self.partitions[-1]

    def tokens(self, p: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = [np.asarray(cell_to_token(np.asarray(q.cells, dtype=np.uint64)))
                            for q in self.partitions]
        return self._tokens[p]

    def _fine_unit(self) -> np.ndarray:
        if getattr(self, "_fine_unit_cache", None) is None:
            self._fine_unit_cache = unit_vectors(*np.asarray(self.fine.centroids, dtype=np.float64).T)
        return self._fine_unit_cache

    @property
    def fine_areas_km2(self) -> np.ndarray:
        if self._fine_areas is None:
            from geocell.infer.regions import cell_area_km2

            self._fine_areas = cell_area_km2(np.asarray(self.fine.cells, dtype=np.uint64))
        return self._fine_areas

    def transform(self, tta: str = "none"):
        return make_transform(self.preprocess, tta)

    # -- the network

    @torch.inference_mode()
    def head_outputs(self, images: torch.Tensor, *, tta_combine: str = "max"
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None, np.ndarray | None]:
        """Normalised images (B, 3, H, W) or crops (B, n, 3, H, W) -> (per-partitioning
        log-probabilities [(B, C_p)] float64 on the CPU, scene probabilities (B, S) or None,
        unit embeddings (B, D) when retrieval is on, else None); crops are combined per head by
        ``tta_combine``, their embeddings averaged."""
        n_crops = 1
        if images.ndim == 5:
            n_crops = images.shape[1]
            images = images.flatten(0, 1)
        x = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        emb = None
        if self.hybrid is not None:
            geo_logits, scene_logits, crops = forward_with_embeddings(self.model, x)
            emb = normalise(crops.reshape(-1, n_crops, crops.shape[1]).mean(axis=1))  # the crops' mean direction
        else:
            geo_logits, scene_logits = self.model(x)
        # float64 so that reported probabilities sum to 1 to the last digit
        scenes = torch.softmax(scene_logits.double(), dim=1) if scene_logits is not None else None
        if n_crops == 1:  # log_softmax stays finite where a softmax would underflow to 0
            return [torch.log_softmax(g.double(), dim=1).cpu() for g in geo_logits], \
                (scenes.cpu() if scenes is not None else None), emb
        probs = [combine_crops(torch.softmax(g.double(), dim=1), n_crops, tta_combine) for g in geo_logits]
        scenes = combine_crops(scenes, n_crops, tta_combine) if scenes is not None else None
        return [torch.log(p).cpu() for p in probs], (scenes.cpu() if scenes is not None else None), emb

    def head_log_probs(self, images: torch.Tensor, *, tta_combine: str = "max"
                       ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """:meth:`head_outputs` without the embeddings."""
        log_probs, scenes, _ = self.head_outputs(images, tta_combine=tta_combine)
        return log_probs, scenes

    def neighbours(self, embeddings) -> tuple[np.ndarray, np.ndarray] | None:
        """(similarities (B, k), locations (B, k, 2)) of the nearest indexed photos, or None
        without retrieval."""
        if self.hybrid is None or embeddings is None:
            return None
        return self.retrieval.neighbours(embeddings, self.hybrid.k)

    def distributions(self, images: torch.Tensor, *, tta_combine: str = "max"
                      ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Normalised images (B, 3, H, W) or crops (B, n, 3, H, W) ->
        (per-partitioning probabilities [(B, C_p)], the calibrated hierarchical distribution
        over the fine cells (B, n_fine), scene probabilities (B, S) or None)."""
        probs, hier, scenes, _ = self._distributions(images, tta_combine)
        return probs, hier, scenes

    def _distributions(self, images, tta_combine):
        log_probs, scenes, emb = self.head_outputs(images, tta_combine=tta_combine)
        hier = torch.exp(combined_log_probs(log_probs, self.hierarchy, self.calibration)).numpy()
        return ([torch.exp(lp).numpy() for lp in log_probs], hier,
                scenes.numpy() if scenes is not None else None, self.neighbours(emb))

    # -- results

    def _guess(self, p: int, index: int, probability: float) -> CellGuess:
        part = self.partitions[p]
        return CellGuess(lat=float(part.centroids[index, 0]), lng=float(part.centroids[index, 1]),
                         probability=float(probability), cell=str(self.tokens(p)[index]),
                         partitioning=self.partition_names[p], level=int(part.levels[index]))

    def _top(self, p: int, probs: np.ndarray, k: int) -> list[CellGuess]:
        k = min(k, probs.size)
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return [self._guess(p, int(i), probs[i]) for i in idx]

    def describe(self, image: str, probs: list[np.ndarray], hier: np.ndarray,
                 scenes: np.ndarray | None, *, top_k: int = 5, mass: float = 0.9,
                 keep_probs: bool = False, neighbours=None) -> Prediction:
        """The Prediction for one image from its distributions (rows of :meth:`distributions`);
        ``neighbours``: this image's (similarities (k,), locations (k, 2)), for the hybrid."""
        fine_p = len(self.partitions) - 1
        top = self._top(fine_p, hier, top_k)
        found = None
        if self.calibration.calibrated:
            # the highest-density region of the calibrated mixture (with retrieval: the hybrid's)
            log_q = np.log(np.maximum(hier, 1e-300))
            kernels = neighbour_kernels(self.hybrid, *neighbours) if self.hybrid is not None and neighbours else None
            mixture = Mixture(log_q, self._fine_unit(), self.calibration.kernel_km, neighbours=kernels,
                              background=background_for(self.calibration, self.partitions[0].centroids,
                                                        self.partitions[0].counts))
            top_similarity = float(neighbours[0][0]) if kernels is not None else None
            # held `mass` of the validation images (of its similarity group, with retrieval)
            region = mixture.region(self.calibration.region_mass(mass, top_similarity))
            region_ids, covered, area = region.cells, region.covered, region.area_km2
            if kernels is not None:
                lat, lng, source = best_guess(self.hybrid, mixture, log_q, self._fine_unit(), kernels,
                                              top_similarity)
                found = {"lat": lat, "lng": lng, "source": source, "weight": kernels.weight,
                         "neighbours": [{"lat": float(a), "lng": float(b), "similarity": float(sim)}
                                        for sim, (a, b) in zip(neighbours[0], neighbours[1])]}
        else:
            cells_region = credible_region(hier, self.fine_areas_km2, mass)
            region_ids = np.asarray(self.fine.cells, dtype=np.uint64)[cells_region.indices]
            covered, area = cells_region.covered, cells_region.area_km2
        scene_list = []
        if scenes is not None and self.scene_names:
            order = np.argsort(-scenes)[: min(3, scenes.size)]
            scene_list = [(self.scene_names[i], float(scenes[i])) for i in order]
        return Prediction(
            image=image, top_k=top, hierarchical_top1=top[0],
            per_partitioning={self.partition_names[p]: self._top(p, probs[p], top_k)
                              for p in range(len(self.partitions))},
            region_mass=float(mass), region_covered=covered, region_area_km2=area,
            region_cells=[str(t) for t in cell_to_token(region_ids)],
            scenes=scene_list, retrieval=found,
            fine_probs=hier.copy() if keep_probs else None,
            region_cell_ids=region_ids if keep_probs else None)

    def predict(self, images_or_paths, top_k: int = 5, *, mass: float = 0.9, tta: str = "none",
                tta_combine: str = "max", batch_size: int = 16, keep_probs: bool = False):
        """Predict one image (-> Prediction) or a sequence/batch of images (-> list[Prediction]).
        An unreadable path raises here; ``geocell predict`` skips and reports it instead."""
        single = isinstance(images_or_paths, (str, os.PathLike)) or (
            not isinstance(images_or_paths, (list, tuple))
            and not (isinstance(images_or_paths, (np.ndarray, torch.Tensor)) and images_or_paths.ndim == 4))
        items = [images_or_paths] if single else list(images_or_paths)
        transform = self.transform(tta)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            names, tensors = [], []
            for j, item in enumerate(chunk):
                if isinstance(item, (str, os.PathLike)):
                    names.append(os.fspath(item))
                    tensors.append(transform(decode_rgb(item)))
                else:
                    names.append(f"<image {start + j}>")
                    tensors.append(transform(_to_pil(item)))
            results += self.predict_inputs(names, torch.stack(tensors), top_k, mass=mass,
                                           tta_combine=tta_combine, keep_probs=keep_probs)
        return results[0] if single else results

    def predict_inputs(self, names: Sequence[str], inputs: torch.Tensor, top_k: int = 5, *,
                       mass: float = 0.9, tta_combine: str = "max", keep_probs: bool = False
                       ) -> list[Prediction]:
        """Predictions for network inputs already made by ``self.transform(tta)`` (a batch, one
        per name): ``serve`` makes them while decoding, so a waiting request holds the small
        input rather than the decoded photo."""
        probs, hier, scenes, nbs = self._distributions(inputs, tta_combine)
        return [self.describe(name, [p[j] for p in probs], hier[j], None if scenes is None else scenes[j],
                              top_k=top_k, mass=mass, keep_probs=keep_probs,
                              neighbours=None if nbs is None else (nbs[0][j], nbs[1][j]))
                for j, name in enumerate(names)]

    def predict_files(self, paths: Sequence[str], top_k: int = 5, *, mass: float = 0.9,
                      tta: str = "none", tta_combine: str = "max", batch_size: int = 16,
                      num_workers: int = 2, keep_probs: bool = False, progress: bool = False
                      ) -> Iterator[tuple[str, Prediction | None, str | None]]:
        """Stream (path, Prediction or None, error or None) for every path, in order; an
        unreadable image gives its error and the stream goes on."""
        batches = stream_files(paths, self.transform(tta), batch_size=batch_size,
                               num_workers=num_workers)
        bar = progress_bar(len(paths), progress, file=sys.stderr, dynamic_ncols=True)
        try:
            for images, indices, failed in batches:
                out: dict[int, tuple] = {i: (paths[i], None, err) for i, err in failed}
                if images is not None:
                    probs, hier, scenes, nbs = self._distributions(images, tta_combine)
                    for j, i in enumerate(indices):
                        out[i] = (paths[i], self.describe(
                            paths[i], [p[j] for p in probs], hier[j],
                            None if scenes is None else scenes[j],
                            top_k=top_k, mass=mass, keep_probs=keep_probs,
                            neighbours=None if nbs is None else (nbs[0][j], nbs[1][j])), None)
                for i in sorted(out):
                    yield out[i]
                bar.update(len(indices) + len(failed))
        finally:
            bar.close()


# ----------------------------------------------------------------------------- output


def csv_header(top_k: int) -> list[str]:
    cols = ["image", "lat", "lng", "probability", "cell", "partitioning", "level",
            "region_cells", "region_area_km2", "region_covered"]
    for r in range(1, top_k + 1):
        cols += [f"top{r}_lat", f"top{r}_lng", f"top{r}_probability", f"top{r}_cell"]
    return cols + ["error"]


def display_name(path) -> str:
    """A file name as text that can always be encoded: bytes of a non-UTF-8 name (held as
    surrogates by os.fsdecode) shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def csv_row(path: str, pred: Prediction | None, error: str | None, top_k: int) -> list:
    path = display_name(path)
    if pred is None:
        return [path] + [""] * (len(csv_header(top_k)) - 2) + [error or ""]
    t = pred.hierarchical_top1
    lat, lng = pred.best_guess
    row = [path, f"{lat:.6f}", f"{lng:.6f}", f"{t.probability:.6g}", t.cell, t.partitioning,
           t.level, len(pred.region_cells), f"{pred.region_area_km2:.6g}", f"{pred.region_covered:.6f}"]
    for r in range(top_k):
        if r < len(pred.top_k):
            g = pred.top_k[r]
            row += [f"{g.lat:.6f}", f"{g.lng:.6f}", f"{g.probability:.6g}", g.cell]
        else:
            row += ["", "", "", ""]
    return row + [""]


def format_prediction(pred: Prediction) -> str:
    t = pred.hierarchical_top1
    lines = [display_name(pred.image)]
    if pred.retrieval is not None:
        r = pred.retrieval
        lines.append(f"  best guess: {r['lat']:.4f}, {r['lng']:.4f}  (hybrid: retrieval weight {r['weight']:.2f}, "
                     f"nearest photo similarity {r['neighbours'][0]['similarity']:.2f})")
        lines.append(f"  top cell:   {t.lat:.4f}, {t.lng:.4f}  (p = {t.probability:.3g}, cell {t.cell}, "
                     f"{t.partitioning}, level {t.level})")
    else:
        lines.append(f"  best guess: {t.lat:.4f}, {t.lng:.4f}  (p = {t.probability:.3g}, cell {t.cell}, "
                     f"{t.partitioning}, level {t.level})")
    lines += [f"  {pred.region_mass:.0%} credible region: {len(pred.region_cells)} cells, "
              f"{pred.region_area_km2:,.0f} km² (holds {pred.region_covered:.1%})",
              "  top-k:"]
    for r, g in enumerate(pred.top_k, 1):
        lines.append(f"    {r}. {g.lat:9.4f} {g.lng:10.4f}  p = {g.probability:.4f}  cell {g.cell}")
    if pred.scenes:
        lines.append("  scene: " + ", ".join(f"{n} {p:.2f}" for n, p in pred.scenes))
    return "\n".join(lines)
