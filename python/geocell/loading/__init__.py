"""Batches for training and evaluation: one preprocessing description (:mod:`.preprocess`),
the target tables (:mod:`.labels`), the torchvision and NVIDIA DALI backends behind
:func:`geocell.loading.loaders.make_loader`."""
