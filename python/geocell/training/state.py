"""Where a training run is: counters, optimiser, schedule, scaler and the RNG states.

One object, updated in place by the training loop, so that a checkpoint written at any step
(end of epoch, every N steps, or a stop) records where the run really is, and a resumed run
restores everything from one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from geocell.training import engine


@dataclass
class TrainState:
    optimizer: object
    scheduler: object
    scaler: object = None
    epoch: int = 0               # epochs completed
    step: int = 0                # optimizer steps completed, in total
    step_in_epoch: int = 0       # steps of epoch ``epoch`` already done (a mid-epoch checkpoint)
    best_metric: float = -math.inf

    def to_dict(self, rngs: list, config: dict) -> dict:
        """The ``train_state`` entry of a checkpoint; ``rngs``: every rank's RNG state."""
        return {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rngs, "best_metric": self.best_metric, "config": config}

    def restore(self, saved: dict, rank: int = 0):
        """Loads a checkpoint's ``train_state``; returns this rank's saved RNG state (to apply once
        the loader has skipped to the saved step) or None."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.epoch, self.step = int(saved["epoch"]), int(saved["step"])
        self.step_in_epoch = int(saved["step_in_epoch"])
        self.best_metric = float(saved.get("best_metric", -math.inf))
        rngs = saved.get("rng")
        return rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else None


def gather_rng(info) -> list:
    """Every rank's RNG state (they differ per rank), on every rank."""
    state = engine.rng_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    states = [None] * info.world
    dist.all_gather_object(states, state)
    return states
