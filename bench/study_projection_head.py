"""Retrieval embeddings: the trunk's pooled features, or a projection head trained for retrieval?

    python bench/study_projection_head.py RUN_DIR DATA_DIR   # e.g. runs/X data/earth

On the validation split of a finished run (its best.pt and best.retrieval.npz), compares
nearest-neighbour geolocation with the trunk's L2-normalised 512-d features (what the index
stores) against a 128-d linear projection of them trained on the training photos with a
supervised contrastive loss (positives: photos in the same fine cell; temperature 0.1, Adam,
30 epochs, batches of 512), then L2-normalised. Prints the share within 25 / 200 / 750 / 2500 km
and the median error of the single nearest photo and of the medoid of the five nearest.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import geocell
from geocell.data.manifest import read_manifest
from geocell.infer.retrieval import RetrievalIndex, Searcher, embed_paths, normalise
from geocell.model.checkpoint import load_checkpoint, model_from_checkpoint


def report(name, locations, neighbours, true):
    def line(label, pred):
        d = geocell.great_circle_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])
        print(f"{name:26s} {label:13s} " + " ".join(f"{100 * np.mean(d <= t):5.1f}%" for t in (25, 200, 750, 2500))
              + f"  median {np.median(d):.0f} km", flush=True)

    line("nearest photo", locations[neighbours[:, 0]])
    medoids = []
    for row in neighbours[:, :5]:
        p = locations[row]
        d = geocell.great_circle_km(np.repeat(p[:, 0], 5), np.repeat(p[:, 1], 5), np.tile(p[:, 0], 5), np.tile(p[:, 1], 5))
        medoids.append(p[d.reshape(5, 5).sum(axis=1).argmin()])
    line("medoid of 5", np.array(medoids))


def main(run: str, data: str) -> None:
    torch.manual_seed(0)
    ckpt = load_checkpoint(f"{run}/best.pt")
    model, partitions, _ = model_from_checkpoint(ckpt)
    index = RetrievalIndex.load(f"{run}/best.retrieval.npz")
    manifest = read_manifest(f"{data}/manifest.csv")
    val = manifest.subset(manifest.split == "val")
    queries, read, _ = embed_paths(model, ckpt["preprocess"], val.paths, num_workers=0)
    true = np.stack([val.lat[read], val.lng[read]], axis=1)
    train = index.embeddings.astype(np.float32)
    locations = np.stack([index.lat, index.lng], axis=1)
    report(f"trunk ({train.shape[1]}-d)", locations, Searcher(train).search(queries, 5)[1], true)

    cells = torch.as_tensor(np.asarray(partitions[-1].assign(index.lat, index.lng), dtype=np.int64))
    head = torch.nn.Linear(train.shape[1], 128)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    x = torch.as_tensor(train)
    for _ in range(30):
        for batch in torch.randperm(len(x)).split(512):
            z = torch.nn.functional.normalize(head(x[batch]), dim=1)
            logits = (z @ z.T / 0.1).fill_diagonal_(-1e9)
            positive = (cells[batch][:, None] == cells[batch][None, :]).float().fill_diagonal_(0)
            has = positive.sum(1) > 0
            loss = -((logits.log_softmax(1) * positive).sum(1)[has] / positive.sum(1)[has]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        projected, projected_q = normalise(head(x).numpy()), normalise(head(torch.as_tensor(queries)).numpy())
    report("projection head (128-d)", locations, Searcher(projected).search(projected_q, 5)[1], true)


if __name__ == "__main__":
    main(*sys.argv[1:3])
