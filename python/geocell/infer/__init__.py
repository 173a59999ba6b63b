"""Using a trained checkpoint: the predictive distribution (:mod:`.mixture`, :mod:`.hybrid`,
:mod:`.conformal`), fitting it on held-out images (:mod:`.fitting`), evaluation (one loop, one
accuracy table), prediction (:class:`Geolocator`), retrieval, credible regions and maps."""
