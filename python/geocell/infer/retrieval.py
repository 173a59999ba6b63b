"""Retrieval over the training photos: the index and its search (``geocell index build`` makes one).

The index holds one embedding per training photo, the trained trunk's penultimate layer (the
pooled features the heads read) L2-normalised, with the photo's location, and a fingerprint of
the checkpoint that made them: an index is refused by any other checkpoint, whose embedding
space it does not share. The trainer writes ``best.retrieval.npz`` beside ``best.pt``;
``geocell index build`` makes one for any manifest.

Search is by inner product (cosine similarity of unit vectors) through faiss:

* exact (``IndexFlatIP``) while the vectors take at most ``FLAT_BUDGET_BYTES`` as float32
  (2 GiB: a million 512-d vectors, or 260,000 2048-d ones);
* past that, an inverted file with product-quantised codes (``IndexIVFPQ``): about
  4 sqrt(N) lists (a power of two), D/8 one-byte codes per vector, 32 lists probed per query.
  MP-16's 4.7 M ResNet-50 vectors (2048-d) then take 4.7 M x 256 bytes = 1.2 GB instead of
  38 GB (ResNet-18's 512-d ones 0.3 GB). The search is approximate: see the README for its
  measured recall.

Without faiss a blocked numpy product finds the same exact neighbours in bounded memory
(slower; meant for small indexes and for machines without faiss).

How the neighbours join the cells' distribution: :mod:`geocell.infer.hybrid`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from geocell._internal.atomic import atomic_write
from geocell._internal.progress import progress_bar

INDEX_FORMAT = "geocell-retrieval"
INDEX_VERSION = 1
FLAT_BUDGET_BYTES = 2 * 1024 ** 3   # exact search while the float32 vectors fit in this
NUMPY_BLOCK_BYTES = 64 * 1024 ** 2  # the numpy fallback's working memory per block product
IVF_PROBES = 32


class RetrievalError(ValueError):
    """An index that cannot be used: unreadable, damaged, edited, or made by another checkpoint."""


def index_path_for(checkpoint_path) -> str:
    """Where a checkpoint's own index lies: ``runs/x/best.pt`` -> ``runs/x/best.retrieval.npz``."""
    root, _ = os.path.splitext(os.fspath(checkpoint_path))
    return root + ".retrieval.npz"


# ----------------------------------------------------------------------------- the index file


@dataclass
class RetrievalIndex:
    """Embeddings (N, D) of photos at (lat, lng), made by the checkpoint with ``fingerprint``."""

    embeddings: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    fingerprint: str
    source: str = ""                              # what was indexed, for people reading the file
    fit: dict = field(default_factory=dict)       # a hybrid fit made with this index (HybridFit.to_dict)

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings)
        self.lat = np.asarray(self.lat, dtype=np.float64).reshape(-1)
        self.lng = np.asarray(self.lng, dtype=np.float64).reshape(-1)
        if self.embeddings.ndim != 2 or self.embeddings.dtype not in (np.float16, np.float32):
            raise RetrievalError(f"embeddings must be a float16/float32 (N, D) array, got "
                                 f"{self.embeddings.dtype} {self.embeddings.shape}")
        if not len(self.embeddings) == len(self.lat) == len(self.lng):
            raise RetrievalError(f"{len(self.embeddings)} embeddings but {len(self.lat)} latitudes and "
                                 f"{len(self.lng)} longitudes")
        if len(self.lat) and (np.abs(self.lat).max() > 90 or np.abs(self.lng).max() > 180
                              or not np.isfinite(self.embeddings).all()):
            raise RetrievalError("locations out of range or embeddings not finite")
        self._searcher = None

    def __len__(self) -> int:
        return len(self.lat)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (INDEX_FORMAT, str(INDEX_VERSION), self.fingerprint, self.source,
                     json.dumps(self.fit, sort_keys=True), str(self.embeddings.dtype), str(self.embeddings.shape)):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
        for a in (self.embeddings, self.lat, self.lng):
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        return h.hexdigest()

    def save(self, path) -> None:
        """Write atomically (a temporary file in the same folder, then renamed)."""
        with atomic_write(path, "wb", prefix=".tmp-retrieval-", suffix=".npz") as f:
            np.savez(f, format=np.array(INDEX_FORMAT), version=np.array(INDEX_VERSION),
                     fingerprint=np.array(self.fingerprint), source=np.array(self.source),
                     fit=np.array(json.dumps(self.fit, sort_keys=True)), embeddings=self.embeddings,
                     lat=self.lat, lng=self.lng, digest=np.array(self.digest()))

    @classmethod
    def load(cls, path, fingerprint: str | None = None) -> "RetrievalIndex":
        """Read an index; with ``fingerprint`` (the checkpoint's), refuse one made by another model."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise RetrievalError(f"{path}: no such retrieval index")
        try:
            fields = _read_npz(path)
        except RetrievalError:
            raise
        except Exception as exc:  # not a zip, truncated, pickled objects...
            raise RetrievalError(f"{path}: not a readable retrieval index ({type(exc).__name__}: {exc})") from exc
        if str(fields.get("format", "")) != INDEX_FORMAT:
            raise RetrievalError(f"{path}: not a geocell retrieval index (no 'format': '{INDEX_FORMAT}')")
        if int(fields.get("version", -1)) != INDEX_VERSION:
            raise RetrievalError(f"{path}: index version {fields.get('version')} is not supported "
                                 f"(this geocell reads {INDEX_VERSION})")
        missing = {"fingerprint", "embeddings", "lat", "lng", "digest"} - set(fields)
        if missing:
            raise RetrievalError(f"{path}: incomplete index (missing {', '.join(sorted(missing))})")
        try:
            index = cls(fields["embeddings"], fields["lat"], fields["lng"], str(fields["fingerprint"]),
                        source=str(fields.get("source", "")), fit=json.loads(str(fields.get("fit", "{}"))))
        except (RetrievalError, ValueError) as exc:
            raise RetrievalError(f"{path}: {exc}") from exc
        if index.digest() != str(fields["digest"]):
            raise RetrievalError(f"{path}: checksum mismatch: the index is damaged or was edited after "
                                 "it was written; build it again with geocell index build")
        if fingerprint is not None and index.fingerprint != fingerprint:
            raise RetrievalError(f"{path}: made by another checkpoint (fingerprint {index.fingerprint[:12]}, "
                                 f"this checkpoint's is {fingerprint[:12]}): its embeddings are not this "
                                 "model's; build it again with geocell index build")
        return index

    # -- search

    def searcher(self, **kwargs) -> "Searcher":
        if self._searcher is None or kwargs:
            self._searcher = Searcher(self.embeddings, **kwargs)
        return self._searcher

    def neighbours(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (B, k), neighbour locations (B, k, 2)) of unit queries (B, D)."""
        sims, idx = self.searcher().search(queries, k)
        return sims, np.stack([self.lat[idx], self.lng[idx]], axis=-1)


# ----------------------------------------------------------------------------- search


# np.savez stores members uncompressed; a member may inflate to this many times its stored bytes
# (plus MEMBER_SLACK_BYTES) before the index is refused, unread.
MAX_INFLATION = 4
MEMBER_SLACK_BYTES = 1 << 20


def _read_npz(path: str) -> dict:
    """The arrays of an .npz, each member's size checked before it is inflated: its declared
    size against its stored size (MAX_INFLATION), and the array its .npy header announces
    against the member's declared size (zipfile never returns more than that)."""
    import zipfile

    fields = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.file_size > MAX_INFLATION * info.compress_size + MEMBER_SLACK_BYTES:
                raise RetrievalError(f"{path}: member {name!r} inflates from {info.compress_size:,} to "
                                     f"{info.file_size:,} bytes, over the limit of {MAX_INFLATION}x; "
                                     "refused unread (geocell index build writes uncompressed members)")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                if dtype.hasobject:
                    raise RetrievalError(f"{path}: member {name!r} holds Python objects")
                need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if need > info.file_size:
                    raise RetrievalError(f"{path}: member {name!r} announces {need:,} bytes of data "
                                         f"but holds {info.file_size:,}")
            with zf.open(info) as f:
                fields[name] = np.lib.format.read_array(f, allow_pickle=False)
    return fields


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def ivfpq_shape(n: int, dim: int) -> tuple[int, int]:
    """(lists, code bytes per vector) of the IVF-PQ index for n vectors of dim: about 4 sqrt(n)
    lists, a power of two with at least 39 training vectors each; dim/8 sub-quantisers (the
    largest divisor of dim not above it)."""
    lists = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while lists > 1 and n < 39 * lists:
        lists //= 2
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return lists, m


class Searcher:
    """Top-k inner-product search over unit vectors (N, D); ``kind``: "flat" (faiss, exact),
    "ivfpq" (faiss, approximate, past ``memory_budget`` bytes of float32 vectors) or "numpy"
    (exact; without faiss, or asked for with ``backend="numpy"``)."""

    def __init__(self, embeddings, *, memory_budget: int = FLAT_BUDGET_BYTES, backend: str = "auto",
                 train_sample: int = 262144, seed: int = 0):
        if backend not in ("auto", "faiss", "numpy"):
            raise ValueError(f"unknown backend {backend!r}")
        faiss = _faiss() if backend != "numpy" else None
        if backend == "faiss" and faiss is None:
            raise RetrievalError("faiss is not installed (pip install 'geocell[retrieval]')")
        self.n, self.dim = embeddings.shape
        if faiss is None:
            self.kind, self.vectors = "numpy", np.asarray(embeddings)
            return
        if self.n * self.dim * 4 <= memory_budget:
            self.kind, self.index = "flat", faiss.IndexFlatIP(self.dim)
            self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
            return
        # float32 copies of the training sample and of one slice at a time, never of them all
        lists, m = ivfpq_shape(self.n, self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, lists, m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.arange(self.n) if self.n <= train_sample else np.sort(rng.choice(self.n, train_sample, replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
        for start in range(0, self.n, 1 << 16):
            index.add(np.ascontiguousarray(embeddings[start:start + (1 << 16)], dtype=np.float32))
        index.nprobe = min(IVF_PROBES, lists)
        self.kind, self.index, self._quantizer = "ivfpq", index, quantizer

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (B, k) float32, indices (B, k) int64), most similar first; k is at most N."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        k = min(int(k), self.n)
        if k < 1:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.kind == "numpy":
            return _numpy_top_k(self.vectors, q, k)
        sims, idx = self.index.search(q, k)
        short = (idx < 0).any(axis=1)
        if short.any():  # an IVF query whose probed lists hold fewer than k: probe them all
            self.index.nprobe, probes = self.index.nlist, self.index.nprobe
            sims[short], idx[short] = self.index.search(q[short], k)
            self.index.nprobe = probes
        return sims.astype(np.float32), idx.astype(np.int64)


def _numpy_top_k(vectors: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by blocked matrix products: at most NUMPY_BLOCK_BYTES of scores at a time."""
    n, b = len(vectors), len(q)
    rows = max(k, NUMPY_BLOCK_BYTES // (4 * max(1, b) + 4 * vectors.shape[1]))
    best_s = np.full((b, 0), -np.inf, np.float32)
    best_i = np.zeros((b, 0), np.int64)
    for start in range(0, n, rows):
        block = np.asarray(vectors[start:start + rows], dtype=np.float32)
        s = q @ block.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.lexsort((best_i, -best_s), axis=1) if b else np.zeros((0, k), np.int64)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


# ----------------------------------------------------------------------------- embedding photos


def normalise(features) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    f = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norm, 1e-12)


def forward_with_embeddings(net, images):
    """(geo logits, scene logits or None, retrieval embeddings (B, D) float32): a photo's
    embedding is its pooled trunk features L2-normalised, the one definition used to index the
    training photos and to query with new ones."""
    geo, scene, feats = net.forward_with_features(images)
    return geo, scene, normalise(feats.float().cpu().numpy())


def embed_paths(model, preprocess, paths, *, device="cpu", batch_size: int = 64, num_workers: int = 2,
                progress: bool = False):
    """(unit embeddings (n_read, D) float32, indices of the paths read, [(path, error), ...])."""
    import torch

    from geocell.loading.files import make_transform, stream_files  # torch: only when embedding

    device = torch.device(device)
    model = model.to(device).eval()
    chunks, read, skipped = [], [], []
    bar = progress_bar(len(paths), progress, "embedding", file=sys.stderr, dynamic_ncols=True)
    with torch.inference_mode():
        for images, indices, failed in stream_files(paths, make_transform(preprocess), batch_size=batch_size,
                                                    num_workers=num_workers):
            skipped += [(paths[i], err) for i, err in failed]
            if images is not None:
                chunks.append(forward_with_embeddings(model, images.to(device))[2])
                read += list(indices)
            bar.update(len(indices) + len(failed))
    bar.close()
    dim = getattr(model, "feature_dim", 0)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return emb, np.asarray(read, dtype=np.int64), skipped


def select_split(manifest, split, name):
    """The rows of ``manifest`` in ``split``; RetrievalError (naming the flag ``name``) when none."""
    if manifest.split is None:
        raise RetrievalError(f"the manifest has no split column ({name} {split})")
    keep = np.asarray(manifest.split) == split
    if not keep.any():
        raise RetrievalError(f"no rows of split {split!r} in the manifest ({name})")
    return manifest.subset(np.flatnonzero(keep))
