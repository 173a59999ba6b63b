"""A training run sized to a wall-clock budget on the machine it runs on.

The same recipe runs at 60 images/s on one 2-core CPU and 200 on another, so a fixed epoch
count is a fixed time on neither. ``--time-budget`` measures the run instead: the stages before
training are timed as they happen, a short probe times real training steps (and the forward
passes that evaluation, the retrieval index and the test pass cost), and :func:`plan_steps`
picks the number of optimizer steps that ends the whole run, those later stages included,
within the budget. The plan is fixed before the first step, so the learning-rate schedule ends
where the budget ends, and it is saved with the run's configuration, so a resumed run follows
the same schedule instead of planning again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

# The built-in dataset's default: the README's "about ten minutes".
DEFAULT_BUDGET_S = 600.0
# Kept back for what the measurements miss: the probe's few steps ran 10 % faster than the
# epochs that followed on the AVX2 kernels of a 2-core EPYC (144 against 122-134 images/s, the
# run 5 % over a 5 % margin), 11 % faster with DALI and land places on the AVX512-BF16 one (266
# against 227-247: 606 s with a 10 % margin), and a shared machine has slower minutes.
SAFETY_SHARE = 0.12


def parse_budget(text) -> float | None:
    """Seconds of a --time-budget value: '600', '600s', '10m', '1h', '1h30m'; None for 'none'
    or '0'. Raises ValueError naming the value otherwise."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        if s in ("none", "off", "0", ""):
            return None
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not parts or not any(parts.groups()):
            raise ValueError(f"--time-budget {text!r}: expected seconds or a duration like 90s, 10m, 1h30m, or none")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"--time-budget {text!r}: must be a finite, non-negative duration")
    return seconds or None


@dataclass(frozen=True)
class Rates:
    """What the probe measured: training images/s (forward, backward, step, with the loader
    feeding), and forward-only images/s in evaluation mode."""

    train_images_per_s: float
    eval_images_per_s: float


@dataclass(frozen=True)
class Plan:
    total_steps: int
    steps_per_epoch: int
    train_s: float       # the steps
    eval_s: float        # the validation pass after each (partial) epoch
    after_s: float       # the stages after training: validation, index, fits, test pass
    available_s: float   # what the budget left for all three when the plan was made

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def epoch_count(self) -> int:
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))

    def describe(self, rates: Rates, budget_s: float) -> str:
        return (f"{self.epochs:.2f} epochs ({self.total_steps} steps) at {rates.train_images_per_s:.0f} images/s "
                f"fit the {budget_s:.0f} s budget: training {self.train_s:.0f} s, validation after each epoch "
                f"{self.eval_s:.0f} s, the stages after training about {self.after_s:.0f} s "
                f"({self.available_s:.0f} s were left)")


def plan_steps(*, budget_s: float, elapsed_s: float, rates: Rates, steps_per_epoch: int, batch_images: int,
               n_val: int, after_images: int, after_fixed_s: float, max_steps: int | None = None) -> Plan:
    """The most optimizer steps that finish the run within ``budget_s``.

    ``elapsed_s``: already spent (dataset, scene helper, loaders, the probe). ``batch_images``:
    images per step over all ranks. Each started epoch ends with a validation pass over
    ``n_val`` images; after training, ``after_images`` more forward passes (the final
    validation pass, the index of the training photos, the test pass) and ``after_fixed_s`` of
    fitting. ``max_steps`` caps the plan (an epoch count asked for as well). At least one step.
    """
    if steps_per_epoch < 1 or batch_images < 1:
        raise ValueError("a plan needs at least one step of at least one image per epoch")
    train_rate, eval_rate = rates.train_images_per_s, rates.eval_images_per_s
    if not (train_rate > 0 and eval_rate > 0):
        raise ValueError(f"measured rates must be positive (got {train_rate}, {eval_rate})")
    after_s = after_images / eval_rate + after_fixed_s
    val_s = n_val / eval_rate
    available = budget_s * (1 - SAFETY_SHARE) - elapsed_s
    step_s = batch_images / train_rate

    def seconds(steps: int) -> float:  # steps, and a validation pass after each started epoch
        return steps * step_s + math.ceil(steps / steps_per_epoch) * val_s

    # seconds() grows with the steps: the most that fit, by bisection
    room = available - after_s
    lo, hi = 0, max(1, int(room / step_s) + 1)
    if max_steps is not None:
        hi = min(hi, max_steps)
    if seconds(hi) <= room:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if seconds(mid) <= room else (lo, mid)
    best = max(1, lo)
    k = math.ceil(best / steps_per_epoch)
    return Plan(total_steps=best, steps_per_epoch=steps_per_epoch, train_s=best * step_s, eval_s=k * val_s,
                after_s=after_s, available_s=available)


class StageClock:
    """Elapsed and remaining time of a run, printed as each stage ends."""

    def __init__(self, budget_s: float | None, start: float | None = None, log=print):
        self.budget_s, self.log = budget_s, log
        self.start = time.perf_counter() if start is None else start
        self._last = self.start
        self.stages: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, stage: str) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        left = f", {self.budget_s - self.elapsed:.0f} s of the {self.budget_s:.0f} s budget left" \
            if self.budget_s else ""
        self.log(f"[{self.elapsed:5.0f} s] {stage}: {seconds:.0f} s{left}")
        return seconds
