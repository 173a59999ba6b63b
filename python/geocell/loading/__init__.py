"""Batches for training and evaluation: one preprocessing description (:mod:`.preprocess`),
the target tables (:mod:`.labels`), the loader factory :func:`geocell.loading.base.make_loader`
with the shared file checks and per-sample randomness (:mod:`.base`), the torchvision and
NVIDIA DALI backends behind it (:mod:`.torch_backend`, :mod:`.dali_backend`), the compiled
resampling kernel's wrapper (:mod:`.resample`), and image files for inference (:mod:`.files`:
the evaluation transform and an in-order file loader)."""
