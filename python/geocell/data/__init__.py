"""Datasets: manifests (CSV, GeoEstimation metadata, packed shards), EXIF GPS import, WebDataset
shards and the built-in Earth dataset. numpy (and Pillow for images) only; no torch."""
