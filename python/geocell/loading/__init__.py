"""Batches for training and evaluation: one preprocessing description (:mod:`.preprocess`),
the target tables (:mod:`.labels`), the loader factory :func:`geocell.loading.loaders.make_loader`
(:mod:`.loaders`), the shared file checks and per-sample randomness of its loaders (:mod:`.base`),
the torchvision and NVIDIA DALI backends (:mod:`.torch_backend`, :mod:`.dali_backend`), the
compiled resampling kernel's wrapper (:mod:`.resample`), and image files for inference
(:mod:`.files`: the evaluation transform and an in-order file loader)."""
