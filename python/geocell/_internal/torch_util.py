"""Small torch helpers shared by training and inference."""

from __future__ import annotations

import contextlib

import torch


def autocast_context(device: torch.device, amp_dtype):
    """torch.autocast for ``amp_dtype`` (None: full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)
