"""Datasets: manifests (CSV, GeoEstimation metadata, packed shards), EXIF GPS import, image
modes and limits, WebDataset shards, held-out splits, downloads and GeoEstimation's msgpack
shards, and the built-in Earth dataset. No torch."""
