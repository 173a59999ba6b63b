"""Using a trained checkpoint: evaluation (one loop, one accuracy table), prediction
(:class:`Geolocator`), credible regions and probability maps."""
