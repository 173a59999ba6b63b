"""A trained model on other real photo locations: the ones of the location pool the Earth
dataset does not use.

    python bench/study_unseen_places.py RUN_DIR DATA_DIR OUT_DIR [N] [MIN_KM]   # e.g. runs/X data/earth /tmp/places

The held-out test split is whole S2 blocks, built to hold places at every distance from the
training photos in known shares. Photo locations themselves are not drawn that way: most of the
pool's unused locations lie a few km from one the dataset trains on. This draws N (default
2000) of the pool's locations that neither the GPS dataset nor the scene dataset uses, at
least MIN_KM (default 5, the held-out split's own buffer) from every training location,
renders their patches into OUT_DIR the way the dataset's are rendered, prints the shares of
their distances to the nearest training photo, and evaluates RUN_DIR/best.pt on them with
``geocell evaluate`` (retrieval on, the run's calibration).
"""

from __future__ import annotations

import sys

import numpy as np

from geocell.data.earth import _unused, build_earth, default_locations
from geocell.data.manifest import read_manifest
from geocell.data.splits import min_distance_km
from geocell.commands import evaluate


def unused_locations(data_dir: str) -> np.ndarray:
    """The pool's locations that no image of the GPS or the scene dataset of ``data_dir`` uses."""
    used = []
    for name in ("manifest.csv", "scenes.csv"):
        try:
            m = read_manifest(f"{data_dir}/{name}")
        except FileNotFoundError:
            continue
        used.append(np.stack([m.lat, m.lng], axis=1))
    return _unused(default_locations(), np.concatenate(used))


def main(argv: list[str]) -> int:
    run_dir, data_dir, out_dir = argv[:3]
    n = int(argv[3]) if len(argv) > 3 else 2000
    min_km = float(argv[4]) if len(argv) > 4 else 5.0
    gps = read_manifest(f"{data_dir}/manifest.csv")
    train = np.asarray(gps.split) == "train"
    pool = unused_locations(data_dir)
    nearest = min_distance_km(pool[:, 0], pool[:, 1], gps.lat[train], gps.lng[train])
    eligible = np.flatnonzero(nearest >= min_km)
    print(f"{len(pool)} unused pool locations, {len(eligible)} at least {min_km:g} km from every training one")
    pick = np.sort(np.random.default_rng(0).choice(eligible, size=min(n, len(eligible)), replace=False))
    bands = np.histogram(nearest[pick], bins=[0, 25, 100, 300, np.inf])[0] / len(pick)
    print("nearest training photo of the drawn ones: "
          + ", ".join(f"{label} {100 * s:.1f}%" for label, s in zip(("<= 25 km", "25-100", "100-300", "> 300"), bands)))
    manifest = build_earth(out_dir, locations=pool[pick], progress=False)
    return evaluate.main(["--checkpoint", f"{run_dir}/best.pt", "--manifest", str(manifest), "--no-progress"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
